"""The ingress's parts, wired: one :class:`PoolService` per ingress replica (no Ray import here).

* :class:`~serve_apps.planner.Planner` (pure): the pool's facts, request checks, what runs where;
* :class:`~serve_apps.router.Router`: handles to the model deployments, deadlines, a planned request run on them;
* :class:`~serve_apps.contexts.ContextService`: the Σ context store and the calls that fill it;
* :class:`~serve_apps.mixed.MixedSchedules`: ``/v1/generate/mixed``;
* :class:`~serve_apps.metrics.ServeMetrics` and the count of pending requests (the API's cap).

The routes (:mod:`serve_apps.api`, :mod:`serve_apps.openai_api`, :mod:`serve_apps.tokenizer_routes`) call only the
public methods of these parts; :meth:`PoolService.generate` and :meth:`PoolService.stream` answer ``/v1/generate``.
:class:`serve_apps.ingress.PoolIngress` is this service as the Serve deployment.
"""
from __future__ import annotations

import time
from typing import Any, AsyncIterator

from kvlingua.config import from_dict
from kvlingua.context_store import ContextStore
from kvlingua.pool import load_pool
from serve_apps.contexts import ContextService
from serve_apps.metrics import ServeMetrics
from serve_apps.mixed import MixedSchedules
from serve_apps.options import ServeOptions
from serve_apps.planner import Planner
from serve_apps.requests import Prepared, timings
from serve_apps.router import Router
from serve_apps.schemas import GenerateResponse
from serve_apps.sse import sse


class PoolService:
    """The ingress of a pool, without Serve.

    Args:
        pool_dir: the trained pool directory.
        options: ``to_dict(ServeOptions)``.
        models: pool name -> handle of that model's deployment.
        mirror_metrics: also record metrics with ``ray.serve.metrics`` (inside a Serve replica).
    """

    def __init__(self, pool_dir: str, options: dict, models: dict[str, Any], mirror_metrics: bool = True):
        self.opts = from_dict(ServeOptions, options)
        pool = load_pool(pool_dir, load_models=False, verify=False)
        self.metrics = ServeMetrics(mirror=mirror_metrics)
        self.planner = Planner(pool, self.opts, ContextStore(self.opts.store_bytes))
        self.router = Router(models, self.planner, self.opts, self.metrics)
        self.contexts = ContextService(self.planner, self.router, self.metrics)
        self.mixed = MixedSchedules(self.planner, self.router, self.metrics)
        self.pending = 0  # requests being answered (the API's cap: max_pending_requests)
        self.created = int(time.time())

    def response(self, p: Prepared, done: dict) -> GenerateResponse:
        """The ``/v1/generate`` answer from the target's final dict."""
        tokens = done["tokens"]
        return GenerateResponse(
            source=p.source, target=p.target, handoff=p.handoff, handoff_used=p.handoff_used,
            handoff_reason=p.reason, context_id=p.context.key.id if p.context else None, module=p.module,
            text=self.planner.text(tokens, p.target), tokens=tokens, prompt_tokens=len(p.ids), new_tokens=len(tokens),
            finish_reason=done["finish_reason"], seed=done["seed"],
            timings=timings(done["prefill_s"], done["translate_s"], done["decode_s"]),
        )

    async def generate(self, p: Prepared) -> GenerateResponse:
        return self.response(p, await self.router.run(p))

    async def stream(self, p: Prepared) -> AsyncIterator[str]:
        """Server-sent events: ``data: {"token", "text"}`` per token, then ``event: done`` with the result (the first
        token, or a 4xx/5xx, before any byte is sent)."""
        events = await self.router.events(p)

        async def answer():
            try:
                async for ev in events:
                    if "token" in ev:
                        yield sse({"token": ev["token"], "text": self.planner.text([ev["token"]], p.target)})
                    else:
                        yield sse(self.response(p, ev).model_dump_json(), event="done")
            except Exception as e:  # the stream has started: report in-band, the status line is already sent
                yield sse({"detail": f"{type(e).__name__}: {e}"}, event="error")

        return answer()
