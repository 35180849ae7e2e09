"""The context store's routes: a context read once into Σ, kept in the ingress, decoded by any member.

``POST /v1/contexts`` has the source prefill a context and encode it into Σ once; the latent ``[1, C, Q]`` is
kept in the ingress (:class:`kvlingua.store.ContextStore`, keyed by token digest, source fingerprint and adapter
digest, LRU within ``ServeOptions.store_bytes``), as a private copy (the store sends views of it). ``decode_for``
has targets decode it ahead of their first request (``OUT_target`` once per target, kept in its replica). Where
members tokenize differently, a context stored from text keeps its text and the source's ends
(:class:`~serve_apps.crosstok.TextContext`) and is decoded along the token map. ``self`` is the
:class:`~serve_apps.ingress.PoolIngress`, as in :mod:`serve_apps.mixed`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvlingua.align import text_ends
from kvlingua.store import ContextKey, StoredContext, StoreFullError, token_digest
from serve_apps.crosstok import TextContext, context_map
from serve_apps.requests import Prepared, RequestError, context_payload
from workers.wire import tensor_from_wire

if TYPE_CHECKING:
    from serve_apps.ingress import PoolIngress


async def add_context(self: PoolIngress, model: str, ids: list[int], text: str | None = None) -> StoredContext:
    """Have ``model`` read ``ids`` and keep its Σ latent; an equal context already stored is reused.

    Where members tokenize differently, a context sent as ``text`` (``ids`` its tokens by ``model``) also keeps
    its text and the ends of ``model``'s tokens (:class:`~serve_apps.crosstok.TextContext`), so that a member of
    another tokenizer can decode it."""
    self._model(model, "model")
    self._check_length(ids, "text")
    if self.opts.store_bytes == 0:
        raise RequestError(400, "the context store is disabled on this server (store_bytes: 0)", code="store_disabled")
    key = ContextKey(token_digest(ids), self.members[model].fingerprint, self.adapters)
    have = self.store.peek(key.id)
    readable = not self.mixed or text is None or getattr(have, "text", None) is not None
    if have is not None and readable:
        return have
    await self._check_running(model)
    p = Prepared(model, model, "latent", "latent", None, ids, len(ids), {}, None, "/v1/contexts")
    payload = await self._call(p, model, self.handles[model].encode_context.remote(ids))
    self.metrics.observe("translate_seconds", p.route, payload["translate_s"])
    # a private copy in this process (not a view pinning the object store's buffer for as long as it is kept)
    keys, values = (tensor_from_wire(payload[k], copy=True) for k in ("keys", "values"))  # [1, C, Q]
    ctx = StoredContext(key, list(ids), model, keys, values, int(payload.get("sink", 0)))
    if self.mixed and text is not None:  # what a member of another tokenizer decodes it from
        ends = text_ends(self.tokenizers.of(model), text)[1]
        ctx = TextContext(key, list(ids), model, keys, values, ctx.sink, text=text, ends=ends)
    try:
        self.store.put(ctx)
    except StoreFullError as e:
        raise RequestError(400, f"text: {e} (store_bytes); store a shorter context", param="text",
                           code="context_too_large") from None
    self.metrics.store(self.store.hits, self.store.misses, self.store.bytes, len(self.store))
    return ctx

async def predecode(self: PoolIngress, ctx: StoredContext, targets: list[str]) -> dict[str, float]:
    """Have each of ``targets`` decode ``ctx`` now (``OUT_target`` once, kept in its replica's decoded-cache
    LRU), so a first request from it reads only what follows; returns target -> decode seconds (0 when it
    held the decoded copy already). A target the pool was not trained to reach from ``ctx.source`` at this
    length is refused (400 naming the limit): its requests would fall back to text anyway."""
    payloads = {}
    for i, target in enumerate(targets):
        self._model(target, f"decode_for[{i}]")
        payload, positions = context_payload(ctx), ctx.positions
        if not self.tokenizers.same(ctx.source, target):  # another tokenizer: Σ along the map to its own tokens
            if getattr(ctx, "text", None) is None:
                raise RequestError(400, f"decode_for[{i}]: {target!r} tokenizes differently from {ctx.source!r}, "
                                        "and this context was stored as token ids; store it as text",
                                   param="decode_for")
            _, extras, positions = context_map(ctx, self.tokenizers.of(target), self.sink)
            payload |= extras
        reason = self.limits.why_not_latent(ctx.source, target, positions)
        if reason is not None:
            raise RequestError(400, f"decode_for[{i}]: {reason}", param="decode_for", code="outside_trained_limits")
        payloads[target] = (payload, positions)
    out = {}
    for target, (payload, positions) in payloads.items():
        await self._check_running(target)
        p = Prepared(target, ctx.source, "latent", "latent", None, ctx.token_ids, positions, {}, ctx,
                     "/v1/contexts")
        out[target] = round(await self._call(p, target, self.handles[target].predecode.remote(payload)), 6)
    return out

def context_info(ctx: StoredContext) -> dict:
    """The JSON of a stored context (``/v1/contexts``)."""
    return {"id": ctx.key.id, "object": "context", "model": ctx.source, "tokens": len(ctx.token_ids),
            "positions": ctx.positions, "bytes": ctx.nbytes, "q_dim": ctx.keys.shape[-1],
            "key": {"token_sha256": ctx.key.tokens, "source_fingerprint": ctx.key.source,
                    "adapters_sha256": ctx.key.adapters}}
