"""Bodies of the OpenAI-compatible routes and of the Σ context store.

``model`` is the model that answers (the *target*). How the prompt reaches it is the
documented extension field ``kvlingua`` (:class:`KvlinguaOptions`); with the official
``openai`` client, pass it as ``extra_body={"kvlingua": {"source": "a"}}``. Without it a
request is plain generation on ``model``.

Only what this server implements is accepted: one choice (``n = 1``), no ``echo``, no
log-probabilities, no penalties, no stop strings; anything else is refused (400) rather
than ignored. Unknown fields are refused, non-finite numbers too.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_apps.schemas import ContextId, Handoff, ModuleName


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class KvlinguaOptions(_Strict):
    """The ``kvlingua`` extension field: who reads the prompt and how its cache reaches ``model``."""

    source: str | None = Field(None, description="model that reads the prompt (null: ``model`` reads it itself)")
    handoff: Handoff = Field("latent", description="latent (through Σ), text (the target re-reads), identity")
    strict: bool = Field(False, description="refuse (400) a latent hand-off outside what the pool was trained for "
                                            "instead of falling back to text")
    context_id: str | None = ContextId
    handoff_tokens: int | None = Field(None, ge=1, description="leading prompt tokens the source hands over")
    use_store: bool = Field(True, description="reuse a stored context the prompt starts with")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence tokens")
    module: str | None = ModuleName


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str = Field(..., min_length=1, max_length=256, description="the model that answers")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default 16)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    kvlingua: KvlinguaOptions = Field(default_factory=KvlinguaOptions)


class CompletionRequest(_Common):
    prompt: str | list[int] = Field(..., description="text, or token ids of the pool's tokenizer (one prompt)")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(..., max_length=1_000_000)
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")


class ContextRequest(_Strict):
    model: str = Field(..., min_length=1, max_length=256, description="the source model that reads the context")
    text: str | None = Field(None, description="the context as text")
    tokens: list[int] | None = Field(None, description="the context as token ids (instead of text)")
    decode_for: list[str] | None = Field(None, max_length=64,
                                         description="targets that decode the stored latent now (OUT_target once "
                                         "each, kept by their replica), so that their first request reads only "
                                         "what follows the context")
