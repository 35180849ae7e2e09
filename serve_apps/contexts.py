"""The context service: a context read once into Σ, kept in the ingress, decoded by any member.

``POST /v1/contexts`` has the source prefill a context and encode it into Σ once (:meth:`ContextService.add`); the
latent ``[1, C, Q]`` is kept in the ingress (:class:`kvlingua.context_store.ContextStore`, keyed by token digest, source
fingerprint and adapter digest, LRU within ``ServeOptions.store_bytes``), as a private copy (the store sends views
of it). ``decode_for`` has targets decode it ahead of their first request (:meth:`ContextService.predecode`:
``OUT_target`` once per target, kept in its replica). Where members tokenize differently, a context stored from text
keeps its text and the source's ends (:class:`~serve_apps.crosstok.TextContext`) and is decoded along the token
map. The routes (``/v1/contexts``, :mod:`serve_apps.openai_api`) call only the public methods here; a request that
names a context is planned by :class:`~serve_apps.planner.Planner` and routed by :class:`~serve_apps.router.Router`.
"""
from __future__ import annotations

import time

from kvlingua.align import text_ends
from kvlingua.context_store import ContextKey, ContextStore, StoredContext, StoreFullError, token_digest
from serve_apps.crosstok import TextContext, context_map
from serve_apps.metrics import ServeMetrics
from serve_apps.planner import Planner
from serve_apps.requests import RequestError, context_payload
from serve_apps.router import Router
from workers.wire import tensor_from_wire

ROUTE = "/v1/contexts"


def context_info(ctx: StoredContext) -> dict:
    """The JSON of a stored context (``/v1/contexts``)."""
    return {"id": ctx.key.id, "object": "context", "model": ctx.source, "tokens": len(ctx.token_ids),
            "positions": ctx.positions, "bytes": ctx.nbytes, "q_dim": ctx.keys.shape[-1],
            "key": {"token_sha256": ctx.key.tokens, "source_fingerprint": ctx.key.source,
                    "adapters_sha256": ctx.key.adapters}}


class ContextService:
    """The ingress's context store and the calls that fill it and decode it ahead.

    Args:
        planner: the pool's facts and checks (its ``store`` is the store served here).
        router: calls to the replicas, within a request's deadline.
        metrics: where encode times and the store's counts are recorded.
    """

    def __init__(self, planner: Planner, router: Router, metrics: ServeMetrics):
        self.planner = planner
        self.router = router
        self.metrics = metrics

    @property
    def store(self) -> ContextStore:
        return self.planner.store

    def listing(self) -> dict:
        """``GET /v1/contexts``: stored contexts, most recently used first, and the store's counts."""
        s = self.store
        return {"object": "list", "data": [context_info(c) for c in s.list()], "bytes": s.bytes,
                "budget_bytes": s.budget, "evictions": s.evictions, "hits": s.hits, "misses": s.misses}

    def get(self, context_id: str) -> StoredContext:
        """The stored context ``context_id`` (not counted as a use); 404 otherwise."""
        ctx = self.store.peek(context_id)
        if ctx is None:
            raise RequestError(404, f"no stored context {context_id!r}", param="context_id", code="context_not_found")
        return ctx

    def delete(self, context_id: str) -> None:
        """Forget ``context_id`` (404 when it is not stored)."""
        self.get(context_id)
        self.store.delete(context_id)

    async def add(self, model: str, ids: list[int], text: str | None = None) -> StoredContext:
        """Have ``model`` read ``ids`` and keep its Σ latent; an equal context already stored is reused.

        Where members tokenize differently, a context sent as ``text`` (``ids`` its tokens by ``model``) also keeps
        its text and the ends of ``model``'s tokens (:class:`~serve_apps.crosstok.TextContext`), so that a member of
        another tokenizer can decode it."""
        plan = self.planner
        plan.model(model, "model")
        plan.check_length(ids, "text")
        if plan.opts.store_bytes == 0:
            raise RequestError(400, "the context store is disabled on this server (store_bytes: 0)", code="store_disabled")
        key = ContextKey(token_digest(ids), plan.members[model].fingerprint, plan.adapters)
        have = self.store.peek(key.id)
        readable = not plan.mixed or text is None or getattr(have, "text", None) is not None
        if have is not None and readable:
            return have
        await self.router.check_running(model)
        payload = await self.router.call(time.monotonic(), model, self.router.handles[model].encode_context.remote(ids))
        self.metrics.observe("translate_seconds", ROUTE, payload["translate_s"])
        # a private copy in this process (not a view pinning the object store's buffer for as long as it is kept)
        keys, values = (tensor_from_wire(payload[k], copy=True) for k in ("keys", "values"))  # [1, C, Q]
        ctx = StoredContext(key, list(ids), model, keys, values, int(payload.get("sink", 0)))
        if plan.mixed and text is not None:  # what a member of another tokenizer decodes it from
            ends = text_ends(plan.tokenizers.of(model), text)[1]
            ctx = TextContext(key, list(ids), model, keys, values, ctx.sink, text=text, ends=ends)
        try:
            self.store.put(ctx)
        except StoreFullError as e:
            raise RequestError(400, f"text: {e} (store_bytes); store a shorter context", param="text",
                               code="context_too_large") from None
        self.metrics.store(self.store.hits, self.store.misses, self.store.bytes, len(self.store))
        return ctx

    async def predecode(self, ctx: StoredContext, targets: list[str]) -> dict[str, float]:
        """Have each of ``targets`` decode ``ctx`` now (``OUT_target`` once, kept in its replica's decoded-cache
        LRU), so a first request from it reads only what follows; returns target -> decode seconds (0 when it
        held the decoded copy already). A target the pool was not trained to reach from ``ctx.source`` at this
        length is refused (400 naming the limit): its requests would fall back to text anyway."""
        plan, payloads = self.planner, {}
        for i, target in enumerate(targets):
            plan.model(target, f"decode_for[{i}]")
            payload, positions = context_payload(ctx), ctx.positions
            if not plan.tokenizers.same(ctx.source, target):  # another tokenizer: Σ along the map to its own tokens
                if getattr(ctx, "text", None) is None:
                    raise RequestError(400, f"decode_for[{i}]: {target!r} tokenizes differently from {ctx.source!r}, "
                                            "and this context was stored as token ids; store it as text",
                                       param="decode_for")
                _, extras, positions = context_map(ctx, plan.tokenizers.of(target), plan.sink)
                payload |= extras
            reason = plan.limits.why_not_latent(ctx.source, target, positions)
            if reason is not None:
                raise RequestError(400, f"decode_for[{i}]: {reason}", param="decode_for", code="outside_trained_limits")
            payloads[target] = (payload, positions)
        out = {}
        for target, (payload, _) in payloads.items():
            await self.router.check_running(target)
            call = self.router.handles[target].predecode.remote(payload)
            out[target] = round(await self.router.call(time.monotonic(), target, call), 6)  # each call its own deadline
        return out
