"""The ingress's routing half: handles to the model deployments, deadlines, and a planned request run on them.

A :class:`~serve_apps.requests.Prepared` (from :class:`~serve_apps.planner.Planner`) runs as one call to the target's
replica (``generate``, or ``stream`` for server-sent events), with what the target starts from
(:meth:`Router.handoff`): nothing (it re-reads the prompt), a stored context's or a module's Σ latent (the module
encoded by the replica of the model it was learned on on first use, then kept here), or the source replica's export
as a pending response passed straight to the target (Ray resolves it there). Caches cross as
:class:`~workers.wire.WireTensor` s.

Every call to a model has the request's deadline (``request_timeout_s`` from the request's start: 504 past it, and
503 at once when the model has no running replica, read from the Serve controller at most every
:data:`HEALTH_TTL_S`). The context service and the mixed schedules call replicas through :meth:`Router.call` too.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator

from kvlingua.context_store import ContextStore
from serve_apps.metrics import ServeMetrics
from serve_apps.modules import module_key
from serve_apps.options import ServeOptions
from serve_apps.planner import Planner
from serve_apps.requests import Prepared, RequestError, context_payload
from workers.wire import tensor_from_wire, tensor_to_wire

HEALTH_TTL_S = 2.0  # replica states are re-read from the Serve controller at most this often


class Router:
    """Calls to the pool's model deployments.

    Args:
        handles: pool name -> handle of that model's deployment.
        planner: the pool's facts (members, served modules).
        opts: the served options (deadlines).
        metrics: where translate and first-token times are recorded.
    """

    def __init__(self, handles: dict[str, Any], planner: Planner, opts: ServeOptions, metrics: ServeMetrics):
        self.handles = handles
        self.planner = planner
        self.opts = opts
        self.metrics = metrics
        self.module_latents: dict[str, tuple[Any, Any]] = {}  # module -> its Σ keys, values [1, p, Q] (private copies)
        self.module_ports: dict[str, dict] = {}  # module -> {"encoded": n, "decoded": {target: n}}
        self._states: dict[str, str] = {}
        self._states_at = -1e9

    @property
    def store(self) -> ContextStore:
        return self.planner.store

    # ------------------------------------------------------------ health and deadlines
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
        for name in self.planner.members:
            d = deployments.get(f"model-{name}")
            running = d.replica_states.get("RUNNING", 0) if d is not None else 0
            states[name] = "RUNNING" if running else (str(d.status.value) if d is not None else "MISSING")
        self._states, self._states_at = states, time.monotonic()
        return states

    async def check_running(self, name: str) -> None:
        """503 (with ``Retry-After``) unless model ``name`` has a running replica."""
        state = (await self.replica_states()).get(name, "RUNNING")
        if state != "RUNNING":
            raise RequestError(503, f"model {name!r} has no running replica (deployment state: {state}); "
                                    "see GET /healthz", code="model_unavailable", headers={"Retry-After": "5"})

    def left(self, started: float) -> float:
        """Seconds left of the deadline of a request that started at ``started`` (``time.monotonic``)."""
        return max(self.opts.request_timeout_s - (time.monotonic() - started), 0.001)

    async def call(self, started: float, name: str, response) -> Any:
        """Await ``response`` (a call to model ``name``) within the deadline of a request started at ``started``
        (504 past it, the call cancelled)."""
        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), self.left(started))
        except asyncio.TimeoutError:
            response.cancel()
            raise RequestError(504, f"no answer from model {name!r} within {self.opts.request_timeout_s:g} s "
                                    "(request_timeout_s)", code="timeout") from None

    # ------------------------------------------------------------ what the target starts from
    async def handoff(self, p: Prepared):
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
            await self.check_running(p.source)
            out = await self.call(p.started, p.source, self.handles[p.source].export_module.remote(p.module))
            # private copies (tiny), not views pinning the object store's buffers for as long as they are kept
            self.module_latents[p.module] = (tensor_from_wire(out["keys"], copy=True),
                                             tensor_from_wire(out["values"], copy=True))  # [1, p, Q]
            self.module_ports.setdefault(p.module, {"encoded": 0, "decoded": {}})["encoded"] += 1
            translate_s = out["translate_s"]
        keys, values = self.module_latents[p.module]
        return {"kind": "latent", "keys": tensor_to_wire(keys), "values": tensor_to_wire(values),
                "context_id": module_key(p.module), "module": p.module, "prefill_s": 0.0, "translate_s": translate_s}

    def module_list(self) -> list[dict]:
        """The served modules with the model each was learned on, and how often each was encoded (``IN_i``) and
        decoded per target (``OUT_j``)."""
        modules = self.planner.modules
        out = []
        for m in modules.list() if modules is not None else []:
            ports = self.module_ports.get(m["name"], {})
            out.append({"id": m["name"], "object": "module", "model": m["model"], "task": m["task"],
                        "prompt_len": m["prompt_len"], "encoded": ports.get("encoded", 0),
                        "decoded": dict(sorted(ports.get("decoded", {}).items()))})
        return out

    def record(self, p: Prepared, done: dict) -> None:
        """Count a module's decode and record the answer's translate and first-token times and the store."""
        if p.module is not None and done.get("decoded"):
            decoded = self.module_ports.setdefault(p.module, {"encoded": 0, "decoded": {}})["decoded"]
            decoded[p.target] = decoded.get(p.target, 0) + 1
        self.metrics.observe("translate_seconds", p.route, done.get("translate_s", 0.0))
        if "first_token_s" in done:
            self.metrics.observe("time_to_first_token_seconds", p.route, done["first_token_s"])
        self.metrics.store(self.store.hits, self.store.misses, self.store.bytes, len(self.store))

    # ------------------------------------------------------------ a planned request
    async def run(self, p: Prepared) -> dict:
        """Generate without streaming; the target's final dict (tokens, finish_reason, seed, timings)."""
        await self.check_running(p.target)
        if p.source is not None and p.handoff_used not in ("text", "none") and p.context is None:
            await self.check_running(p.source)
        handoff = await self.handoff(p)
        call = self.handles[p.target].generate.remote(p.ids, p.params, handoff, p.decoding)
        done = await self.call(p.started, p.target, call)
        self.record(p, done)
        return done

    async def events(self, p: Prepared) -> AsyncIterator[dict]:
        """The target's stream: ``{"token": id}`` per token, then the final dict.

        The first event is awaited within the request's deadline (504 before anything is sent);
        the whole stream within ``stream_timeout_s`` (past it the final dict says
        ``finish_reason: "length"`` and ``stopped: "stream_timeout"``).
        """
        await self.check_running(p.target)
        handoff = await self.handoff(p)
        gen = self.handles[p.target].options(stream=True).stream.remote(p.ids, p.params, handoff, p.decoding)
        it = gen.__aiter__()
        try:
            first = await asyncio.wait_for(it.__anext__(), self.left(p.started))
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
                self.record(p, ev)
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
