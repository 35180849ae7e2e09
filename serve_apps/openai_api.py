"""OpenAI-compatible routes and the Σ context store routes.

* ``POST /v1/completions`` / ``POST /v1/chat/completions``: ``model`` answers (a pool model, or a
  path alias ``TARGET@SOURCE``, see :mod:`serve_apps.openai_plan`); the extension field
  ``kvlingua`` (:class:`~serve_apps.openai_schemas.KvlinguaOptions`) names the source model, the
  hand-off, a stored context. Stop strings, log-probabilities, echo, list prompts, ``n``,
  penalties and ``logit_bias`` as vLLM answers them (:mod:`serve_apps.decoding`,
  :mod:`serve_apps.openai_format`). The answer carries ``usage`` and a ``kvlingua`` object
  (``source``, ``handoff``, ``handoff_used``, ``handoff_reason``, ``context_id``,
  ``handed_over_positions``, ``timings``; the first choice's, and each choice's own when there
  are several). ``stream: true`` answers OpenAI's chunks as server-sent events ending with
  ``data: [DONE]`` (choices interleaved, each with its ``index``; text that could be the start of
  a stop string is held back until it is not); ``stream_options.include_usage`` adds the usage chunk.
* Chat prompts are rendered with the pool tokenizer's chat template when it has one
  (``add_generation_prompt=True``), otherwise with :data:`PLAIN_TEMPLATE`: one line
  ``"<role>: <content>"`` per message, then ``"assistant:"``. Where the pool's members tokenize
  differently, the answering model's tokenizer renders the chat, reads the prompt, finds stop
  strings and writes the text (:mod:`serve_apps.crosstok`).
* ``GET /v1/models``: OpenAI's list shape: each pool model (``kvlingua``: cache layout, fingerprint),
  then ``TARGET@SOURCE`` for each trained path.
* ``GET /v1/modules``: the served modules (OpenAI's list shape), each with the model it was learned on.
* ``/v1/contexts``: store (``POST {model, text | tokens}``), list, read, delete Σ contexts.

Errors use OpenAI's shape (see :mod:`serve_apps.api`). The handlers call the public methods of the
:class:`~serve_apps.service.PoolService` parts: planning (:mod:`serve_apps.openai_plan` over the
:class:`~serve_apps.planner.Planner`), :class:`~serve_apps.router.Router` ``run``/``events``, the
:class:`~serve_apps.contexts.ContextService`; streamed chunks go through :func:`serve_apps.sse.sse`.
"""
from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from serve_apps.contexts import context_info
from serve_apps.decoding import cut_at_stop, held_back
from serve_apps.openai_format import chat_logprobs, completion_logprobs, finish_reason, usage
from serve_apps.openai_plan import model_list, plan_choices, resolve_model
from serve_apps.openai_schemas import ChatRequest, CompletionRequest, ContextRequest
from serve_apps.planner import Planner
from serve_apps.requests import Prepared, RequestError
from serve_apps.service import PoolService
from serve_apps.sse import DONE, sse

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/modules", "/v1/contexts",
                   "/tokenize", "/detokenize", "/tokenizer_info")
PLAIN_TEMPLATE = "{role}: {content}\n"  # per message; the prompt ends with "assistant:"


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PREFIXES)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The chat prompt text: the tokenizer's chat template, else :data:`PLAIN_TEMPLATE`."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"


def _extension(p: Prepared, done: dict) -> dict:
    return {"source": p.source, "handoff": p.handoff, "handoff_used": p.handoff_used, "handoff_reason": p.reason,
            "context_id": p.context.key.id if p.context else None, "module": p.module, "handed_over_positions": p.positions
            if p.handoff_used not in ("none", "text") else 0, "seed": done["seed"],
            "timings": {k: done.get(k, 0.0) for k in ("prefill_s", "translate_s", "decode_s")},
            "decoded": bool(done.get("decoded", False)),  # this request ran OUT_target (False: a kept copy or none)
            **({"stopped": done["stopped"]} if "stopped" in done else {})}


def _prompts(planner: Planner, prompt, allow_empty: bool, model: str | None = None
             ) -> list[tuple[list[int], str | None]]:
    """Each prompt's ids (as ``model`` reads them) and, for text prompts, its text (what echo returns)."""
    many = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    items = prompt if many else [prompt]
    out = []
    for i, item in enumerate(items):
        field = f"prompt[{i}]" if many else "prompt"
        out.append((planner.ids(item, field, allow_empty=allow_empty, model=model),
                    item if isinstance(item, str) else None))
    return out


def _answering(planner: Planner, req) -> str | None:
    """The model that answers ``req`` where the pool's members tokenize differently (None where they share one: the
    request is read before its model is checked, as always)."""
    if not planner.mixed:
        return None
    target = resolve_model(planner, req)[0]
    planner.model(target, "model")
    return target


def add_openai_routes(app: FastAPI, ingress: PoolService, errors: dict) -> None:
    """Add the OpenAI-compatible and context routes to ``app``."""
    planner, router, contexts = ingress.planner, ingress.router, ingress.contexts

    def tokenizer(p: Prepared):
        """The tokenizer of the model that answers ``p`` (the pool's where its members share one)."""
        return planner.tokenizers.of(p.target) if planner.mixed else planner.tokenizer

    def text(tokens: list[int], stops: list[str], model: str) -> str:
        return cut_at_stop(planner.text(tokens, model) or "", stops)[0]

    def choice(i: int, p: Prepared, done: dict, chat: bool, echo: tuple[list[int], str | None] | None) -> dict:
        stops, tok = p.decoding["stop"], tokenizer(p)
        out = text(done["tokens"], stops, p.target)
        c = {"index": i, "finish_reason": finish_reason(done), "logprobs": None}
        if chat:
            c["message"] = {"role": "assistant", "content": out}
            if "logprobs" in done:
                c["logprobs"] = chat_logprobs(tok, done["tokens"], done["logprobs"])
            return c
        head = ""
        if echo is not None:
            ids, given = echo
            head = given if given is not None else (planner.text(ids, p.target) or "")
        c["text"] = head + out
        if "logprobs" in done:
            ids = echo[0] if echo is not None else []  # echo: the prompt as sent (a stored context's tokens left out)
            scored = done.get("prompt_logprobs") or [None] * len(ids)
            scored = scored[len(scored) - len(ids):]
            c["logprobs"] = completion_logprobs(tok, ids + done["tokens"], scored + done["logprobs"])
        return c

    async def respond(plans: list[Prepared], req, chat: bool, prompts: list):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        n_prompt = sum(len(plans[i * req.n].ids) for i in range(len(prompts)))
        if not req.stream:
            dones = await asyncio.gather(*(router.run(p) for p in plans))
            echo = getattr(req, "echo", False)
            choices = [choice(i, p, d, chat, prompts[i // req.n] if echo else None)
                       for i, (p, d) in enumerate(zip(plans, dones))]
            if len(choices) > 1:
                for c, p, d in zip(choices, plans, dones):
                    c["kvlingua"] = _extension(p, d)
            return {"id": rid, "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": req.model, "choices": choices,
                    "usage": usage(n_prompt, sum(len(d["tokens"]) for d in dones)),
                    "kvlingua": _extension(plans[0], dones[0])}
        # the first token of every choice (or a 4xx/5xx) before any byte is sent
        streams = await asyncio.gather(*(router.events(p) for p in plans))
        return StreamingResponse(_sse(rid, req, plans, streams, chat, n_prompt), media_type="text/event-stream")

    async def _sse(rid: str, req, plans: list[Prepared], streams: list, chat: bool, n_prompt: int):
        obj, created = ("chat.completion.chunk" if chat else "text_completion"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list, **extra) -> str:
            return sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices, **extra})

        def piece(i: int, content: str | None, finish: str | None, tokens: list[int], entries: list[dict],
                  role: bool = False) -> dict:
            lp, tok = None, tokenizer(plans[i])
            if plans[i].decoding["top_logprobs"] is not None and tokens:
                lp = chat_logprobs(tok, tokens, entries) if chat else completion_logprobs(tok, tokens, entries)
            if chat:
                delta = {} if content is None else {"content": content}
                if role:
                    delta["role"] = "assistant"
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}
            return {"index": i, "text": content or "", "finish_reason": finish, "logprobs": lp}

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, events) -> None:
            try:
                async for ev in events:
                    await queue.put((i, ev))
            except Exception as e:  # noqa: BLE001 -- reported in-band below
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        state = [{"tokens": [], "entries": [], "sent": "", "reported": 0} for _ in plans]
        completion = 0
        try:
            if chat:
                for i in range(len(plans)):
                    yield chunk([piece(i, "", None, [], [], role=True)])
            left = len(plans)
            while left:
                i, ev = await queue.get()
                if ev is None:
                    left -= 1
                    continue
                if isinstance(ev, Exception):
                    raise ev
                st, stops = state[i], plans[i].decoding["stop"]
                final = "token" not in ev
                if not final:
                    st["tokens"].append(ev["token"])
                    if "logprob" in ev:
                        st["entries"].append({"logprob": ev["logprob"], "top": ev["top"]})
                shown = text(ev["tokens"] if final else st["tokens"], stops, plans[i].target)
                if not final:
                    shown = shown[:len(shown) - held_back(shown, stops)]
                new = shown[len(st["sent"]):] if len(shown) > len(st["sent"]) and shown.startswith(st["sent"]) else ""
                if not new and not final:
                    continue
                st["sent"] += new
                tokens, entries = st["tokens"][st["reported"]:], st["entries"][st["reported"]:]
                st["reported"] = len(st["tokens"])
                if final:
                    completion += len(ev["tokens"])
                    yield chunk([piece(i, new if new else (None if chat else ""), finish_reason(ev), tokens, entries)],
                                kvlingua=_extension(plans[i], ev))
                else:
                    yield chunk([piece(i, new, None, tokens, entries)])
            if include_usage:
                yield chunk([], usage=usage(n_prompt, completion))
        except Exception as e:  # the status line is sent: report in-band, OpenAI's error shape
            err = {"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None,
                             "code": None}}
            yield sse(err)
        finally:
            for t in tasks:
                t.cancel()
        yield sse(DONE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": model_list(planner, ingress.created)}

    @app.get("/v1/modules")
    async def modules() -> dict:
        return {"object": "list", "data": router.module_list()}

    @app.post("/v1/completions", responses=errors)
    async def completions(req: CompletionRequest):
        prompts = _prompts(planner, req.prompt, allow_empty=req.kvlingua.context_id is not None,
                           model=_answering(planner, req))
        plans = plan_choices(planner, req, [ids for ids, _ in prompts], "/v1/completions", chat=False,
                             texts=[given for _, given in prompts])
        return await respond(plans, req, chat=False, prompts=prompts)

    @app.post("/v1/chat/completions", responses=errors)
    async def chat(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        target = _answering(planner, req)
        tok = planner.tokenizers.of(target) if target is not None else planner.tokenizer
        if tok is None:
            raise RequestError(400, "messages: this pool has no tokenizer; use /v1/completions with token ids",
                               param="messages")
        rendered = render_chat(tok, messages)
        ids = planner.encode(rendered, "messages", special=not req.kvlingua.context_id, model=target)
        plans = plan_choices(planner, req, [ids], "/v1/chat/completions", chat=True, texts=[rendered])
        return await respond(plans, req, chat=True, prompts=[(ids, None)])

    @app.post("/v1/contexts", responses=errors)
    async def add_context(req: ContextRequest) -> dict:
        if (req.text is None) == (req.tokens is None):
            raise RequestError(400, "give exactly one of text and tokens", param="text")
        ids = planner.ids(req.text if req.text is not None else req.tokens,
                          "text" if req.text is not None else "tokens", model=req.model if planner.mixed else None)
        ctx = await contexts.add(req.model, ids, text=req.text)
        decoded = await contexts.predecode(ctx, req.decode_for or [])
        return context_info(ctx) | ({"decoded_for": decoded} if req.decode_for else {})

    @app.get("/v1/contexts")
    async def list_contexts() -> dict:
        return contexts.listing()

    @app.get("/v1/contexts/{context_id}")
    async def get_context(context_id: str) -> dict:
        return context_info(contexts.get(context_id))

    @app.delete("/v1/contexts/{context_id}")
    async def delete_context(context_id: str) -> dict:
        contexts.delete(context_id)
        return {"id": context_id, "object": "context.deleted", "deleted": True}
