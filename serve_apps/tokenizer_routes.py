"""vLLM's tokenizer routes, so clients can use the pool's tokenizer over HTTP.

* ``POST /tokenize`` ``{prompt, add_special_tokens=true}`` -> ``{"tokens", "count", "max_model_len"}``
  (``max_model_len``: the longest prompt this server reads, ``max_prompt_tokens``);
* ``POST /detokenize`` ``{tokens}`` -> ``{"prompt"}``;
* ``GET /tokenizer_info`` -> the special tokens and the chat template.

lm-eval's ``local-completions`` looks for these (``tokenizer_backend=auto``) and then needs no local
tokenizer. A pool without a tokenizer answers 400 naming the field. Where the pool's members tokenize
differently, each route reads the tokenizer of the member named by ``model`` (a query parameter of
``/tokenizer_info``), and answers 400 without one; where they share one, ``model`` is ignored.
"""
from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from serve_apps.planner import Planner
from serve_apps.requests import RequestError

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TokenizeRequest(_Strict):
    prompt: str = Field(..., description="text to tokenize")
    add_special_tokens: bool = Field(True, description="add the tokenizer's special tokens (e.g. BOS)")
    model: str | None = Field(None, max_length=256, description="the member whose tokenizer to use: needed where the "
                                                                "members tokenize differently, else ignored")


class DetokenizeRequest(_Strict):
    tokens: list[int] = Field(..., max_length=1_000_000)
    model: str | None = Field(None, max_length=256, description="as for /tokenize")


def add_tokenizer_routes(app: FastAPI, planner: Planner) -> None:
    def tokenizer(field: str, model: str | None):
        tok = planner.tokenizer_of(model)  # a pool of one tokenizer: its own, whatever ``model`` says
        if tok is None:
            raise RequestError(400, f"{field}: this pool has no tokenizer", param=field)
        return tok

    def member(model: str | None) -> str | None:
        return model if planner.mixed else None

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        tokenizer("prompt", req.model)
        ids = planner.encode(req.prompt, "prompt", special=req.add_special_tokens, model=member(req.model))
        return {"tokens": ids, "count": len(ids), "max_model_len": planner.opts.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        tok = tokenizer("tokens", req.model)
        ids = planner.ids(req.tokens, "tokens", allow_empty=True, model=member(req.model))
        return {"prompt": tok.decode(ids)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None) -> dict:
        tok = tokenizer("tokenizer", model)
        return {"eos_token": tok.eos_token, "bos_token": tok.bos_token, "pad_token": tok.pad_token,
                "unk_token": tok.unk_token, "vocab_size": planner.vocab_of(member(model)),
                "chat_template": getattr(tok, "chat_template", None), "tokenizer_class": type(tok).__name__}
