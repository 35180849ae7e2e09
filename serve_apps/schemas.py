"""Request and response bodies of the HTTP API (pydantic; FastAPI derives the OpenAPI schema).

Types are strict (``"5"`` is not an integer), non-finite numbers (``NaN``, ``Infinity``)
and unknown fields are refused, so a malformed request is answered 422 naming the field.
Limits that depend on the served options (prompt length, ``max_new_tokens`` ceiling) are
checked by the routes (400). The OpenAI-compatible bodies are in :mod:`serve_apps.openai_schemas`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Handoff = Literal["latent", "text", "identity"]
ContextId = Field(None, min_length=1, max_length=64, pattern=r"^[0-9a-f]+$",
                  description="id of a stored context (POST /v1/contexts): the prompt continues after it")


ModuleName = Field(None, min_length=1, max_length=256,
                   description="a module (GET /v1/modules) the target reads before the prompt, ported through Σ "
                               "from the model it was learned on; no source, context_id or handoff_tokens with it")


class Sampling(_Strict):
    temperature: float = Field(0.0, ge=0.0, le=100.0, description="0 = greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="fixed seed => same output")
    ignore_eos: bool = Field(False, description="keep generating past end-of-sequence tokens (benchmarks)")


class GenerateRequest(Sampling):
    source: str | None = Field(None, description="model that reads the prompt; null: plain generation on target")
    target: str = Field(..., description="model that writes the answer")
    prompt: str | list[int] = Field(..., description="text, or token ids of the pool's tokenizer (where members "
                                                    "tokenize differently: the target's, and only from a source of "
                                                    "the same tokenizer)")
    max_new_tokens: int = Field(32, ge=1, description="tokens to generate at most")
    handoff: Handoff = Field("latent", description="how the prompt's cache reaches target")
    stream: bool = Field(False, description="answer with server-sent events, one per token")
    strict: bool = Field(False, description="refuse (400) instead of falling back to text when a latent hand-off "
                                            "is outside what the pool was trained for")
    context_id: str | None = ContextId
    handoff_tokens: int | None = Field(None, ge=1, description="leading prompt tokens the source reads and hands "
                                                               "over; the target reads the rest (default: all but the last)")
    use_store: bool = Field(True, description="reuse a stored context the prompt starts with (latent hand-off "
                                              "between models of one tokenizer)")
    module: str | None = ModuleName


class Segment(_Strict):
    model: str
    max_new_tokens: int = Field(..., ge=1)


class MixedRequest(Sampling):
    prompt: str | list[int] = Field(..., description="text, or token ids of the pool's tokenizer (where the "
                                                    "schedule's models tokenize differently: text only)")
    schedule: list[Segment] = Field(..., min_length=1, description="models in turn; the cache is translated at each switch")


class Timings(BaseModel):
    prefill_s: float
    translate_s: float
    decode_s: float
    total_s: float


class GenerateResponse(BaseModel):
    source: str | None
    target: str
    handoff: str
    handoff_used: str
    handoff_reason: str | None = None
    context_id: str | None = None
    module: str | None = None
    text: str | None
    tokens: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    seed: int
    timings: Timings


class SwitchInfo(BaseModel):
    source: str
    target: str
    positions: int


class SwitchSpan(SwitchInfo):
    """A switch between models that tokenize differently: ``target``'s positions ``[start, end)`` (in its own
    tokens of the text so far) read ``source``'s own positions through Σ along the token map."""

    start: int
    end: int


class MixedResponse(BaseModel):
    text: str | None = Field(..., description="what the schedule wrote (where its models tokenize differently: "
                                              "each segment's text, concatenated)")
    tokens: list[int] = Field(..., description="generated token ids, each in the vocabulary of the model that wrote "
                                               "it (models[i]); across tokenizers read text")
    models: list[str]
    switches: list[SwitchSpan | SwitchInfo]
    prompt_tokens: int = Field(..., description="the prompt's tokens (the first model's)")
    new_tokens: int
    finish_reason: str
    seed: int
    timings: Timings


class ModelInfo(BaseModel):
    name: str
    model_type: str
    num_layers: int
    n_kv_heads: int
    head_dim: int
    width: int
    vocab_size: int
    hidden_size: int
    fingerprint: str


class ModelList(BaseModel):
    models: list[ModelInfo]
    q_dim: int
    tokenizer: bool
    max_prompt_tokens: int
    max_new_tokens: int
