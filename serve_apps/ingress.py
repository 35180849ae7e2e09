"""The HTTP ingress: validates requests, tokenizes, and routes caches between model deployments.

Latent hand-off ``source -> target``: the source deployment prefills the first ``h``
prompt tokens (default: all but the last) and encodes its cache into Σ (``IN_source``);
the resulting response is passed straight to the target deployment, which decodes it
(``OUT_target``), reads the rest of the prompt itself and generates. ``text``: the target
re-reads the prompt; ``identity``: the raw source cache (equal layouts only).

**Context store** (:mod:`serve_apps.contexts`): a request naming a stored context (or, with a latent
hand-off from its source, whose prompt starts with its tokens) sends the stored latent to the target,
which decodes it once and keeps the result. Caches cross Ray as :class:`~workers.wire.WireTensor` s.

**Modules.** A request naming a ``module`` (:mod:`serve_apps.modules`) takes the same latent
path: the replica of the model the module was learned on encodes it into Σ once (kept here), and
the target decodes it once (kept in its replica, like a stored context) and reads the whole
prompt after it. ``GET /v1/modules`` counts both per module.

**Limits.** A latent hand-off outside what the pool was trained for
(:mod:`serve_apps.limits`) falls back to text, saying why; with ``strict`` it is refused.
Every call to a model has the request's deadline (``request_timeout_s``: 504 past it,
503 at once when the model has no running replica).

**Members that tokenize differently** (``pool.mixed_tokenizers``; :mod:`serve_apps.crosstok`): text in,
text out. Each model reads the prompt with its own tokenizer (a request's ``ids`` are the target's); a
latent hand-off sends Σ of the source's own tokens with the token map, and the target reads Σ at its own
positions and computes its own sink; a stored context read from text is decoded along the map by any
member; a mixed schedule re-tokenizes the text so far at each switch. Token-id prompts and the identity
hand-off need the models to share a tokenizer (else 400), and so does the automatic prefix matching of
stored contexts (``use_store`` without ``context_id``: skipped across tokenizers). Members sharing one
tokenizer keep the token-id route, exactly as a one-tokenizer pool.

Mixed schedules (:mod:`serve_apps.mixed`) run segment by segment over the same handles. Every
bad request is a :class:`RequestError` (HTTP 4xx naming what is wrong) raised before any
model work starts.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator

from kvlingua.align import text_ends
from kvlingua.config import from_dict
from kvlingua.generate import check_identity
from kvlingua.pool import load_pool
from kvlingua.store import ContextStore, adapters_digest
from serve_apps.crosstok import PoolTokenizers, plan_across
from serve_apps.limits import TrainedLimits
from serve_apps.metrics import ServeMetrics
from serve_apps.modules import module_key, module_library
from serve_apps.options import ServeOptions
from serve_apps.requests import Prepared, RequestError, context_payload, request_seed, timings
from serve_apps.schemas import (
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ModelList,
)
from workers.wire import tensor_from_wire, tensor_to_wire

HEALTH_TTL_S = 2.0  # replica states are re-read from the Serve controller at most this often


class PoolIngress:
    """Serve ingress of a pool (wrapped with ``serve.ingress()``; the FastAPI app is built per replica).

    Args:
        pool_dir: the trained pool directory.
        options: ``to_dict(ServeOptions)``.
        models: pool name -> handle of that model's deployment.
        mirror_metrics: also record metrics with ``ray.serve.metrics`` (inside a Serve replica).
    """

    def __init__(self, pool_dir: str, options: dict, models: dict[str, Any], mirror_metrics: bool = True):
        self.opts = from_dict(ServeOptions, options)
        pool = load_pool(pool_dir, load_models=False, verify=False)
        self.members = {m.name: m for m in pool.members}
        self.q_dim = pool.space.cfg.q_dim
        self.tokenizer = pool.tokenizer  # the first member's where members tokenize differently
        self.tokenizers = PoolTokenizers(list(self.members), pool.tokenizers, pool.tokenizer, pool.mixed_tokenizers)
        self.mixed = self.tokenizers.mixed
        self.sink = pool.space.cfg.sink_tokens
        self.vocab = min(m.summary.vocab_size for m in pool.members)
        self.handles = models
        self.limits = TrainedLimits.from_meta(pool.meta)
        self.adapters = adapters_digest(e.get("adapter_sha256", "") for e in pool.meta["members"])
        self.store = ContextStore(self.opts.store_bytes)
        self.modules = module_library(pool, self.opts.modules_dir)  # listed and routed here, computed by replicas
        self.module_latents: dict[str, tuple[Any, Any]] = {}  # module -> its Σ keys, values [1, p, Q] (private copies)
        self.module_ports: dict[str, dict] = {}  # module -> {"encoded": n, "decoded": {target: n}}
        self.metrics = ServeMetrics(mirror=mirror_metrics)
        self.pending = 0
        self._states: dict[str, str] = {}
        self._states_at = -1e9
        self.created = int(time.time())

    def __serve_build_asgi_app__(self):
        from serve_apps.api import make_api

        return make_api(self)

    # ------------------------------------------------------------ health
    async def replica_states(self) -> dict[str, str]:
        """Model name -> ``RUNNING`` (a replica answers), or the deployment's state (``UPDATING`` while a
        replica waits for resources, ``UNHEALTHY``, ...), read from the Serve controller."""
        if time.monotonic() - self._states_at < HEALTH_TTL_S:
            return self._states
        from ray import serve

        app = serve.get_replica_context().app_name
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[app].deployments
        states = {}
        for name in self.members:
            d = deployments.get(f"model-{name}")
            running = d.replica_states.get("RUNNING", 0) if d is not None else 0
            states[name] = "RUNNING" if running else (str(d.status.value) if d is not None else "MISSING")
        self._states, self._states_at = states, time.monotonic()
        return states

    async def _check_running(self, name: str) -> None:
        state = (await self.replica_states()).get(name, "RUNNING")
        if state != "RUNNING":
            raise RequestError(503, f"model {name!r} has no running replica (deployment state: {state}); "
                                    "see GET /healthz", code="model_unavailable", headers={"Retry-After": "5"})

    def _left(self, p: Prepared) -> float:
        return max(self.opts.request_timeout_s - (time.monotonic() - p.started), 0.001)

    async def _call(self, p: Prepared, name: str, response) -> Any:
        """Await a model call within the request's deadline (504 past it)."""
        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), self._left(p))
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestError(504, f"no answer from model {name!r} within {self.opts.request_timeout_s:g} s "
                                    "(request_timeout_s)", code="timeout") from None

    # ------------------------------------------------------------ validation
    def model_list(self) -> ModelList:
        infos = [ModelInfo(name=m.name, width=m.summary.width, fingerprint=m.fingerprint, **m.summary.to_dict())
                 for m in self.members.values()]
        return ModelList(models=infos, q_dim=self.q_dim, tokenizer=self.tokenizer is not None,
                         max_prompt_tokens=self.opts.max_prompt_tokens, max_new_tokens=self.opts.max_new_tokens)

    def module_list(self) -> list[dict]:
        """The served modules with the model each was learned on, and how often each was encoded (``IN_i``) and
        decoded per target (``OUT_j``)."""
        out = []
        for m in self.modules.list() if self.modules is not None else []:
            ports = self.module_ports.get(m["name"], {})
            out.append({"id": m["name"], "object": "module", "model": m["model"], "task": m["task"],
                        "prompt_len": m["prompt_len"], "encoded": ports.get("encoded", 0),
                        "decoded": dict(sorted(ports.get("decoded", {}).items()))})
        return out

    def _module(self, name: str, field: str) -> str:
        """The model module ``name`` was learned on; 404 naming the known modules otherwise."""
        known = sorted(self.modules.modules) if self.modules is not None else []
        if name not in known:
            where = f"known modules: {known[:20]}" if known else "this server serves no modules (kvlingua serve --modules DIR)"
            raise RequestError(404, f"{field}: unknown module {name!r}; {where}; see GET /v1/modules", param=field,
                               code="module_not_found")
        return self.modules.modules[name].model

    def _model(self, name: str, field: str) -> str:
        if name not in self.members:
            raise RequestError(404, f"{field}: unknown model {name!r}; this pool serves {sorted(self.members)}",
                               param=field, code="model_not_found")
        return name

    def tokenizer_of(self, model: str | None, field: str = "model"):
        """The tokenizer ``model`` reads text with: the pool's where its members share one (``model`` unread);
        where they tokenize differently, ``model``'s own (400 without a model, 404 for an unknown one)."""
        if not self.mixed:
            return self.tokenizer
        if model is None:
            raise RequestError(400, f"{field}: this pool's members tokenize differently; name the model whose "
                                    f"tokenizer to use (one of {sorted(self.members)})", param=field)
        return self.tokenizers.of(self._model(model, field))

    def vocab_of(self, model: str | None) -> int:
        """Token ids ``model`` reads: ``[0, vocab)`` (every member's where they share a tokenizer)."""
        return self.members[model].summary.vocab_size if self.mixed and model in self.members else self.vocab

    def encode(self, text: str, field: str = "prompt", special: bool = True, model: str | None = None) -> list[int]:
        """``text`` as ``model`` reads it (see :meth:`tokenizer_of`); where members tokenize differently, its leading
        specials (with ``special``) then its tokens (:func:`kvlingua.align.text_ends`), as a hand-off maps them."""
        tokenizer = self.tokenizer_of(model) if self.mixed else self.tokenizer
        if tokenizer is None:
            raise RequestError(400, f"{field}: this pool has no tokenizer; send token ids", param=field)
        if len(text) > self.opts.max_prompt_chars:
            raise RequestError(400, f"{field}: {len(text)} characters; this server reads at most "
                                    f"{self.opts.max_prompt_chars}", param=field, code="prompt_too_long")
        if self.mixed:
            return text_ends(tokenizer, text, specials=special)[0]
        return list(tokenizer.encode(text, add_special_tokens=special))

    def _ids(self, prompt: str | list[int], field: str = "prompt", allow_empty: bool = False,
             model: str | None = None) -> list[int]:
        """``prompt`` as ``model``'s token ids (text tokenized by its tokenizer, see :meth:`encode`)."""
        if isinstance(prompt, str):
            ids = self.encode(prompt, field, model=model)
        else:
            ids = list(prompt)
            vocab = self.vocab_of(model)
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(400, f"{field}: token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                   param=field, code="invalid_token")
        if not ids and not allow_empty:
            raise RequestError(400, f"{field}: empty; give at least one token of text", param=field)
        return ids

    def _check_length(self, ids: list[int], field: str = "prompt") -> None:
        if len(ids) > self.opts.max_prompt_tokens:
            raise RequestError(400, f"{field}: {len(ids)} tokens; this server accepts at most "
                                    f"{self.opts.max_prompt_tokens} (max_prompt_tokens)", param=field,
                               code="prompt_too_long")

    def _n(self, n: int, field: str) -> int:
        if n > self.opts.max_new_tokens:
            raise RequestError(400, f"{field}: {n} exceeds this server's limit of {self.opts.max_new_tokens}",
                               param=field)
        return n

    def plan(self, *, target: str, source: str | None, handoff: str, strict: bool, ids: list[int],
             context_id: str | None, handoff_tokens: int | None, use_store: bool, params: dict,
             route: str, field_prefix: str = "", module: str | None = None, text: str | None = None) -> Prepared:
        """Check models, context, module, hand-off and limits; decide what the source hands over.

        ``ids`` are the target's tokens of the prompt; ``text`` the prompt as text where it was sent as text (what
        a source or stored context of another tokenizer reads, :func:`~serve_apps.crosstok.plan_across`).
        Raises :class:`RequestError`."""
        f = field_prefix
        self._model(target, "model" if f else "target")
        if module is not None:
            learned_on = self._module(module, f"{f}module")
            if source is not None or context_id is not None or handoff_tokens is not None or handoff != "latent":
                raise RequestError(400, f"{f}module: the target reads the module through Σ, then the whole prompt; "
                                        "leave source, context_id, handoff_tokens and handoff unset",
                                   param=f"{f}module")
            if not ids:
                raise RequestError(400, "prompt: empty; give at least one token of text", param="prompt")
            self._check_length(ids)
            return Prepared(target, learned_on, "latent", "latent", None, ids, 0, params, None, route, module)
        if source is not None:
            self._model(source, f"{f}source")
        ctx = None
        if context_id is not None:
            ctx = self.store.get(context_id)
            if ctx is None:
                raise RequestError(404, f"{f}context_id: no stored context {context_id!r} (never stored, deleted or "
                                        "evicted); see GET /v1/contexts", param=f"{f}context_id",
                                   code="context_not_found")
            if source is not None and source != ctx.source:
                raise RequestError(400, f"{f}context_id: context {context_id!r} was read by {ctx.source!r}, not "
                                        f"{source!r}; leave source unset or name {ctx.source!r}", param=f"{f}source")
            if handoff != "latent" or handoff_tokens is not None:
                raise RequestError(400, f"{f}context_id: a stored context is handed over in Σ: use handoff 'latent' "
                                        "and no handoff_tokens", param=f"{f}handoff")
            source = ctx.source
            if not self.tokenizers.same(source, target):
                return plan_across(self, target=target, source=source, handoff=handoff, strict=strict, text=text,
                                   ctx=ctx, handoff_tokens=None, params=params, route=route, f=f)
            ids = ctx.token_ids + ids
        elif source is not None and not self.tokenizers.same(source, target):
            return plan_across(self, target=target, source=source, handoff=handoff, strict=strict, text=text, ctx=None,
                               handoff_tokens=handoff_tokens, params=params, route=route, f=f)
        if not ids:
            raise RequestError(400, "prompt: empty; give at least one token of text", param="prompt")
        self._check_length(ids)
        if source is None:
            return Prepared(target, None, "none", "none", None, ids, 0, params, None, route)
        if ctx is None and handoff == "latent" and use_store and handoff_tokens is None and len(self.store):
            ctx = self.store.match(ids, self.members[source].fingerprint, self.adapters)
        positions = len(ids) - 1
        if ctx is not None:
            positions = min(ctx.positions, positions)
        elif handoff_tokens is not None:
            if handoff_tokens > positions:
                raise RequestError(400, f"{f}handoff_tokens: {handoff_tokens}, but the prompt has {len(ids)} tokens "
                                        "and the target must read at least the last", param=f"{f}handoff_tokens")
            positions = handoff_tokens
        used, reason = handoff, None
        if handoff == "latent":
            reason = self.limits.why_not_latent(source, target, positions)
            if reason is not None:
                if strict:
                    raise RequestError(400, f"{f}handoff: latent refused: {reason} (strict); drop strict to fall "
                                            "back to text", param=f"{f}handoff", code="outside_trained_limits")
                used, ctx = "text", None
        elif handoff == "identity":
            try:
                check_identity(self.members[source].summary, self.members[target].summary, source, target)
            except ValueError as e:
                raise RequestError(400, f"{f}handoff: {e}", param=f"{f}handoff") from e
        return Prepared(target, source, handoff, used, reason, ids, positions, params, ctx, route)

    def prepare(self, req: GenerateRequest) -> Prepared:
        """A ``/v1/generate`` request checked and planned; raises :class:`RequestError`."""
        params = dict(max_new_tokens=self._n(req.max_new_tokens, "max_new_tokens"), temperature=req.temperature,
                      top_p=req.top_p, seed=request_seed(req.seed), stop_at_eos=not req.ignore_eos)
        if self.mixed:
            self._model(req.target, "target")
        ids = self._ids(req.prompt, allow_empty=req.context_id is not None, model=req.target)
        return self.plan(target=req.target, source=req.source, handoff=req.handoff, strict=req.strict, ids=ids,
                         context_id=req.context_id, handoff_tokens=req.handoff_tokens, use_store=req.use_store,
                         params=params, route="/v1/generate", module=req.module,
                         text=req.prompt if isinstance(req.prompt, str) else None)

    # ------------------------------------------------------------ routing
    async def _handoff(self, p: Prepared):
        """What the target starts from: a module's or a stored context's latent, the source's export (a pending
        response), or None when the target re-reads the prompt."""
        if p.handoff_used in ("none", "text"):
            return None
        if p.module is not None:
            return await self._module_payload(p)
        if p.context is not None:
            payload = context_payload(p.context) | {"positions": p.positions, "prefill_s": 0.0, "translate_s": 0.0}
            return payload | (p.mapped.extras() if p.mapped is not None else {})  # another tokenizer: its map, sink
        source = self.handles[p.source]
        if p.mapped is not None:  # another tokenizer: the source's own tokens in Σ, with the target's map and sink
            if not p.mapped.index:  # nothing past the target's own sink: it reads its positions itself
                return None
            return source.export_mapped.remote(p.mapped.source_ids, p.mapped.index, p.mapped.sink_ids)
        head = p.ids[:p.positions + 1]  # the source reads head[:-1] = the first ``positions`` tokens
        if p.handoff_used == "latent":
            return source.export_latent.remote(head)
        return source.export_block.remote(head)

    async def _module_payload(self, p: Prepared) -> dict:
        """Module ``p.module`` in Σ for the target: encoded by the replica of its model on first use, then kept."""
        translate_s = 0.0
        if p.module not in self.module_latents:
            await self._check_running(p.source)
            out = await self._call(p, p.source, self.handles[p.source].export_module.remote(p.module))
            # private copies (tiny), not views pinning the object store's buffers for as long as they are kept
            self.module_latents[p.module] = (tensor_from_wire(out["keys"], copy=True),
                                             tensor_from_wire(out["values"], copy=True))  # [1, p, Q]
            ports = self.module_ports.setdefault(p.module, {"encoded": 0, "decoded": {}})
            ports["encoded"] += 1
            translate_s = out["translate_s"]
        keys, values = self.module_latents[p.module]
        return {"kind": "latent", "keys": tensor_to_wire(keys), "values": tensor_to_wire(values),
                "context_id": module_key(p.module), "module": p.module, "prefill_s": 0.0, "translate_s": translate_s}

    def _response(self, p: Prepared, done: dict) -> GenerateResponse:
        tokens = done["tokens"]
        return GenerateResponse(
            source=p.source, target=p.target, handoff=p.handoff, handoff_used=p.handoff_used,
            handoff_reason=p.reason, context_id=p.context.key.id if p.context else None, module=p.module,
            text=self.text(tokens, p.target), tokens=tokens, prompt_tokens=len(p.ids), new_tokens=len(tokens),
            finish_reason=done["finish_reason"], seed=done["seed"],
            timings=timings(done["prefill_s"], done["translate_s"], done["decode_s"]),
        )

    def text(self, tokens: list[int], model: str | None = None) -> str | None:
        """``tokens`` of ``model`` as text, by its tokenizer (the pool's where its members share one)."""
        tokenizer = self.tokenizers.of(model) if self.mixed else self.tokenizer
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None

    def _record(self, p: Prepared, done: dict) -> None:
        if p.module is not None and done.get("decoded"):
            decoded = self.module_ports.setdefault(p.module, {"encoded": 0, "decoded": {}})["decoded"]
            decoded[p.target] = decoded.get(p.target, 0) + 1
        self.metrics.observe("translate_seconds", p.route, done.get("translate_s", 0.0))
        if "first_token_s" in done:
            self.metrics.observe("time_to_first_token_seconds", p.route, done["first_token_s"])
        self.metrics.store(self.store.hits, self.store.misses, self.store.bytes, len(self.store))

    async def run(self, p: Prepared) -> dict:
        """Generate without streaming; the target's final dict (tokens, finish_reason, seed, timings)."""
        await self._check_running(p.target)
        if p.source is not None and p.handoff_used not in ("text", "none") and p.context is None:
            await self._check_running(p.source)
        handoff = await self._handoff(p)
        call = self.handles[p.target].generate.remote(p.ids, p.params, handoff, p.decoding)
        done = await self._call(p, p.target, call)
        self._record(p, done)
        return done

    async def generate(self, p: Prepared) -> GenerateResponse:
        return self._response(p, await self.run(p))

    async def events(self, p: Prepared) -> AsyncIterator[dict]:
        """The target's stream: ``{"token": id}`` per token, then the final dict.

        The first event is awaited within the request's deadline (504 before anything is sent);
        the whole stream within ``stream_timeout_s`` (past it the final dict says
        ``finish_reason: "length"`` and ``stopped: "stream_timeout"``).
        """
        await self._check_running(p.target)
        handoff = await self._handoff(p)
        gen = self.handles[p.target].options(stream=True).stream.remote(p.ids, p.params, handoff, p.decoding)
        it = gen.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), self._left(p))
        except asyncio.TimeoutError:
            gen.cancel()
            raise RequestError(504, f"no token from model {p.target!r} within {self.opts.request_timeout_s:g} s "
                                    "(request_timeout_s)", code="timeout") from None
        self.metrics.observe("time_to_first_token_seconds", p.route, time.monotonic() - p.started)
        return self._rest(p, gen, it, first)

    async def _rest(self, p: Prepared, gen, it, first: dict) -> AsyncIterator[dict]:
        tokens, ev = [], first
        stream_end = p.started + self.opts.stream_timeout_s
        while True:
            if "token" not in ev:
                ev.pop("first_token_s", None)
                self._record(p, ev)
                yield ev
                return
            tokens.append(ev["token"])
            yield ev
            left = stream_end - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                ev = await asyncio.wait_for(it.__anext__(), left)
            except asyncio.TimeoutError:
                gen.cancel()
                yield {"done": True, "tokens": tokens, "finish_reason": "length", "stopped": "stream_timeout",
                       "seed": p.params["seed"], "prefill_s": 0.0, "translate_s": 0.0, "decode_s": 0.0}
                return

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """Server-sent events: ``data: {"token", "text"}`` per token, then ``event: done`` with the result."""
        events = await self.events(p)

        async def sse():
            try:
                async for ev in events:
                    if "token" in ev:
                        piece = {"token": ev["token"], "text": self.text([ev["token"]], p.target)}
                        yield f"data: {json.dumps(piece)}\n\n"
                    else:
                        yield f"event: done\ndata: {self._response(p, ev).model_dump_json()}\n\n"
            except Exception as e:  # the stream has started: report in-band, the status line is already sent
                yield f"event: error\ndata: {json.dumps({'detail': f'{type(e).__name__}: {e}'})}\n\n"

        return sse()
