"""OpenAI-compatible routes and the Σ context store routes.

* ``POST /v1/completions`` / ``POST /v1/chat/completions``: ``model`` answers; the
  extension field ``kvlingua`` (:class:`~serve_apps.openai_schemas.KvlinguaOptions`) names
  the source model, the hand-off, a stored context. The answer carries ``usage`` and a
  ``kvlingua`` object (``source``, ``handoff``, ``handoff_used``, ``handoff_reason``,
  ``context_id``, ``timings``). ``stream: true`` answers OpenAI's chunks as server-sent
  events ending with ``data: [DONE]``; ``stream_options.include_usage`` adds the usage chunk.
* Chat prompts are rendered with the pool tokenizer's chat template when it has one
  (``add_generation_prompt=True``), otherwise with :data:`PLAIN_TEMPLATE`: one line
  ``"<role>: <content>"`` per message, then ``"assistant:"``.
* ``GET /v1/models``: OpenAI's list shape; each entry adds ``kvlingua`` (cache layout, fingerprint).
* ``GET /v1/modules``: the served modules (OpenAI's list shape), each with the model it was learned on.
* ``/v1/contexts``: store (``POST {model, text | tokens}``), list, read, delete Σ contexts.

Errors use OpenAI's shape (see :mod:`serve_apps.api`).
"""
from __future__ import annotations

import json
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from serve_apps.ingress import PoolIngress
from serve_apps.requests import Prepared, RequestError, request_seed
from serve_apps.openai_schemas import ChatRequest, CompletionRequest, ContextRequest

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/modules", "/v1/contexts")
PLAIN_TEMPLATE = "{role}: {content}\n"  # per message; the prompt ends with "assistant:"
DEFAULT_MAX_TOKENS = 16
FINISH = {"eos": "stop", "length": "length"}


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat prompt text: the tokenizer's chat template, else :data:`PLAIN_TEMPLATE`."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"


def _plan(ingress: PoolIngress, req, ids: list[int], route: str) -> Prepared:
    k = req.kvlingua
    n = req.max_tokens if req.max_tokens is not None else getattr(req, "max_completion_tokens", None)
    n = ingress._n(n if n is not None else DEFAULT_MAX_TOKENS, "max_tokens")
    params = dict(max_new_tokens=n, temperature=req.temperature, top_p=req.top_p, seed=request_seed(req.seed),
                  stop_at_eos=not k.ignore_eos)
    return ingress.plan(target=req.model, source=k.source, handoff=k.handoff, strict=k.strict, ids=ids,
                        context_id=k.context_id, handoff_tokens=k.handoff_tokens, use_store=k.use_store,
                        params=params, route=route, field_prefix="kvlingua.", module=k.module)


def _extension(p: Prepared, done: dict) -> dict:
    return {"source": p.source, "handoff": p.handoff, "handoff_used": p.handoff_used, "handoff_reason": p.reason,
            "context_id": p.context.key.id if p.context else None, "module": p.module, "handed_over_positions": p.positions
            if p.handoff_used not in ("none", "text") else 0, "seed": done["seed"],
            "timings": {k: done.get(k, 0.0) for k in ("prefill_s", "translate_s", "decode_s")},
            "decoded": bool(done.get("decoded", False)),  # this request ran OUT_target (False: a kept copy or none)
            **({"stopped": done["stopped"]} if "stopped" in done else {})}


def _usage(p: Prepared, n: int) -> dict:
    return {"prompt_tokens": len(p.ids), "completion_tokens": n, "total_tokens": len(p.ids) + n}


def add_openai_routes(app: FastAPI, ingress: PoolIngress, errors: dict) -> None:
    """Add the OpenAI-compatible and context routes to ``app``."""

    def answer(p: Prepared, done: dict, chat: bool, rid: str) -> dict:
        text = ingress.text(done["tokens"]) or ""
        choice = {"index": 0, "finish_reason": FINISH.get(done["finish_reason"], "length"), "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": p.target, "choices": [choice], "usage": _usage(p, len(done["tokens"])),
                "kvlingua": _extension(p, done)}

    async def respond(p: Prepared, req, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            return answer(p, await ingress.run(p), chat, rid)
        events = await ingress.events(p)  # the first token (or a 4xx/5xx) before any byte is sent
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj, created = ("chat.completion.chunk" if chat else "text_completion"), int(time.time())

        def chunk(choices: list, **extra) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": p.target, "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        def piece(content: str | None, finish: str | None, role: bool = False) -> dict:
            if chat:
                delta = {} if content is None else {"content": content}
                if role:
                    delta["role"] = "assistant"
                return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": content or "", "finish_reason": finish, "logprobs": None}

        async def sse():
            tokens, sent = [], ""
            try:
                if chat:
                    yield chunk([piece("", None, role=True)])
                async for ev in events:
                    if "token" in ev:
                        tokens.append(ev["token"])
                        text = ingress.text(tokens) or ""
                        if len(text) > len(sent) and text.startswith(sent):
                            yield chunk([piece(text[len(sent):], None)])
                            sent = text
                        continue
                    text = ingress.text(ev["tokens"]) or ""
                    tail = text[len(sent):] if text.startswith(sent) else ""
                    yield chunk([piece(tail if tail else (None if chat else ""),
                                       FINISH.get(ev["finish_reason"], "length"))], kvlingua=_extension(p, ev))
                    if include_usage:
                        yield chunk([], usage=_usage(p, len(ev["tokens"])))
            except Exception as e:  # the status line is sent: report in-band, OpenAI's error shape
                err = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                                 "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": m.name, "object": "model", "created": ingress.created, "owned_by": "kvlingua",
                 "kvlingua": {"fingerprint": m.fingerprint, **m.summary.to_dict()}} for m in ingress.members.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/modules")
    async def modules() -> dict:
        return {"object": "list", "data": ingress.module_list()}

    @app.post("/v1/completions", responses=errors)
    async def completions(req: CompletionRequest):
        allow_empty = req.kvlingua.context_id is not None
        ids = ingress._ids(req.prompt, allow_empty=allow_empty)
        return await respond(_plan(ingress, req, ids, "/v1/completions"), req, chat=False)

    @app.post("/v1/chat/completions", responses=errors)
    async def chat(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        text = render_chat(ingress.tokenizer, messages) if ingress.tokenizer is not None else None
        if text is None:
            raise RequestError(400, "messages: this pool has no tokenizer; use /v1/completions with token ids",
                               param="messages")
        ids = ingress.encode(text, "messages", special=not req.kvlingua.context_id)
        return await respond(_plan(ingress, req, ids, "/v1/chat/completions"), req, chat=True)

    @app.post("/v1/contexts", responses=errors)
    async def add_context(req: ContextRequest) -> dict:
        if (req.text is None) == (req.tokens is None):
            raise RequestError(400, "give exactly one of text and tokens", param="text")
        ids = ingress._ids(req.text if req.text is not None else req.tokens,
                           "text" if req.text is not None else "tokens")
        ctx = await ingress.add_context(req.model, ids)
        decoded = await ingress.predecode(ctx, req.decode_for or [])
        return ingress.context_info(ctx) | ({"decoded_for": decoded} if req.decode_for else {})

    @app.get("/v1/contexts")
    async def list_contexts() -> dict:
        s = ingress.store
        return {"object": "list", "data": [ingress.context_info(c) for c in s.list()], "bytes": s.bytes,
                "budget_bytes": s.budget, "evictions": s.evictions, "hits": s.hits, "misses": s.misses}

    def _get(context_id: str):
        ctx = ingress.store.peek(context_id)
        if ctx is None:
            raise RequestError(404, f"no stored context {context_id!r}", param="context_id", code="context_not_found")
        return ctx

    @app.get("/v1/contexts/{context_id}")
    async def get_context(context_id: str) -> dict:
        return ingress.context_info(_get(context_id))

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str) -> dict:
        _get(context_id)
        ingress.store.delete(context_id)
        return {"id": context_id, "object": "context.deleted", "deleted": True}
