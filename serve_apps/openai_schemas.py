"""Bodies of the OpenAI-compatible routes and of the Σ context store.

``model`` is the model that answers (the *target*). How the prompt reaches it is the
documented extension field ``kvlingua`` (:class:`KvlinguaOptions`); with the official
``openai`` client, pass it as ``extra_body={"kvlingua": {"source": "a"}}``. Without it a
request is plain generation on ``model``.

``model`` may also name a path, ``TARGET@SOURCE`` (listed by ``GET /v1/models`` for every trained
path): the same as ``model: TARGET`` with ``kvlingua.source: SOURCE`` (a latent hand-off);
``TARGET@SOURCE:text`` / ``:identity`` pick the other hand-offs.

Implemented as vLLM answers them: ``stop``, ``logprobs`` (completions: an integer, the top-k
per token; chat: ``logprobs: true`` + ``top_logprobs``), ``echo`` (completions; with
``max_tokens: 0`` it scores the prompt), ``prompt`` as a list (one choice each), ``n``, ``seed``,
``presence_penalty`` / ``frequency_penalty``, ``logit_bias``. Anything else is refused (400 naming
the field) rather than ignored. Unknown fields are refused, non-finite numbers too.
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
    handoff_tokens: int | None = Field(None, ge=1, description="leading prompt tokens the source reads and hands "
                                       "over (default: all but the last); with echo, tokens 0..handoff_tokens get "
                                       "null log-probabilities and the target scores the rest")
    use_store: bool = Field(True, description="reuse a stored context the prompt starts with (between models of "
                                              "one tokenizer)")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence tokens")
    module: str | None = ModuleName


class StreamOptions(_Strict):
    include_usage: bool = False


MAX_N = 16
"""Most choices per prompt (``n``)."""
MAX_PROMPTS = 64
"""Most prompts in one completions request (``prompt`` as a list)."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives reported per token (``logprobs`` / ``top_logprobs``)."""

StopField = Field(None, description="a string or up to 16 strings: generation stops before the first one found in "
                                    "the text, which is not returned")


class _Common(_Strict):
    model: str = Field(..., min_length=1, max_length=256, description="the model that answers, or a path alias "
                                                                      "TARGET@SOURCE (GET /v1/models)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt; with seed s, choice i samples with seed s + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stop: str | list[str] | None = StopField
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted from tokens already generated")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="subtracted per time a token was generated")
    logit_bias: dict[str, float] | None = Field(None, max_length=1024, description="token id (as a string) -> bias "
                                                                                   "in [-100, 100] added to its logit")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    kvlingua: KvlinguaOptions = Field(default_factory=KvlinguaOptions)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(
        ..., description="text, token ids of the pool's tokenizer (where members tokenize differently: the "
                         "answering model's, from a source of the same tokenizer), or a list of either (one "
                         "choice each)")
    max_tokens: int | None = Field(None, ge=0, description="tokens to generate at most (default 16); 0 with echo "
                                                           "scores the prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probability of each token and "
                                                                              "of the k most likely ones")
    echo: bool = Field(False, description="return the prompt before the completion (with logprobs: scored)")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(..., max_length=1_000_000)
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default 16)")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: bool = Field(False, description="log-probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="with logprobs: the k most "
                                                                                  "likely tokens at each position")


class ContextRequest(_Strict):
    model: str = Field(..., min_length=1, max_length=256, description="the source model that reads the context")
    text: str | None = Field(None, description="the context as text")
    tokens: list[int] | None = Field(None, description="the context as token ids (instead of text)")
    decode_for: list[str] | None = Field(None, max_length=64,
                                         description="targets that decode the stored latent now (OUT_target once "
                                         "each, kept by their replica), so that their first request reads only "
                                         "what follows the context")
