"""What a request becomes before it is routed: a refusal (:class:`RequestError`) or a
:class:`Prepared` generation, shared by the kvlingua routes and the OpenAI-compatible ones.

Pure Python (no Ray): :class:`Prepared` is built by keyword only, by :class:`serve_apps.planner.Planner`;
:func:`sampling_params` is the one builder of the sampling parameters a replica reads
(:class:`kvlingua.generate.GenerationParams` as a dict)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvlingua.context_store import StoredContext
from serve_apps.schemas import Timings
from workers.wire import tensor_to_wire

if TYPE_CHECKING:
    from serve_apps.crosstok import Mapped


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with a message naming the problem.

    ``param`` (the offending field) and ``code`` (a short machine-readable reason) fill
    OpenAI's error shape; ``headers`` go on the response (e.g. ``Retry-After``).
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


@dataclass(kw_only=True)
class Prepared:
    """A validated generation request, ready to route (built by :class:`serve_apps.planner.Planner`).

    ``ids`` is the whole prompt as the target reads it (a named context's tokens first); the source
    hands over its first ``positions`` tokens, the target reads the rest.
    """

    target: str
    source: str | None
    handoff: str
    """Hand-off asked for (``none`` without a source)."""
    handoff_used: str
    """Hand-off used: ``handoff``, or ``text`` after a fallback."""
    reason: str | None
    """Why ``handoff_used`` differs from ``handoff``."""
    ids: list[int]
    positions: int
    params: dict[str, Any]
    context: StoredContext | None = None
    route: str = ""
    module: str | None = None
    """A module the target reads before the prompt (``source`` is the model it was learned on)."""
    decoding: dict[str, Any] | None = None
    """The OpenAI options beyond ``params`` (``to_dict`` of :class:`serve_apps.decoding.Decoding`)."""
    started: float = field(default_factory=time.monotonic)
    mapped: Mapped | None = None
    """Where the source (or the stored context's) tokenizes differently from the target: the source's own tokens,
    the token map and the target's sink (:mod:`serve_apps.crosstok`); None otherwise."""


@dataclass(frozen=True, kw_only=True)
class HandoffAsk:
    """What a request asks of the pool: who answers, who reads the prompt first and how it is handed over (the
    fields of ``/v1/generate``, or of an OpenAI request's ``model`` and ``kvlingua``)."""

    target: str
    source: str | None = None
    handoff: str = "latent"
    strict: bool = False
    """Refuse (400) instead of falling back to text outside the pool's training."""
    context_id: str | None = None
    handoff_tokens: int | None = None
    use_store: bool = True
    module: str | None = None


def request_seed(seed: int | None) -> int:
    """The request's sampling seed, or a fresh one when it gave none."""
    return seed if seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def sampling_params(max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
                    ignore_eos: bool) -> dict[str, Any]:
    """The sampling parameters a replica reads (``GenerationParams(**params)``); ``seed`` None draws a fresh one."""
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=request_seed(seed),
                stop_at_eos=not ignore_eos)


def timings(prefill_s: float, translate_s: float, decode_s: float) -> Timings:
    """The phases of one answer and their total."""
    return Timings(prefill_s=prefill_s, translate_s=translate_s, decode_s=decode_s,
                   total_s=prefill_s + translate_s + decode_s)


class PhaseClock:
    """Seconds per phase summed over the segments of one answer (each a replica's reply carrying
    ``prefill_s``/``translate_s``/``decode_s``)."""

    PHASES = ("prefill_s", "translate_s", "decode_s")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    def add(self, reply: dict, phases: tuple[str, ...] = PHASES) -> None:
        for phase in phases:
            self.seconds[phase] += reply[phase]

    def timings(self) -> Timings:
        return timings(**self.seconds)


def context_payload(ctx: StoredContext) -> dict:
    """A stored context's Σ latent ``[1, C-k, Q]`` as a hand-off payload (with the ids of its ``k`` sink tokens, which
    the target reads itself, and of the positions after them, which a token prior reads: a target of another tokenizer
    gets its own of both from :func:`serve_apps.crosstok.context_map`); ``context_id`` lets a replica keep its decode."""
    return {"kind": "latent", "keys": tensor_to_wire(ctx.keys), "values": tensor_to_wire(ctx.values),
            "context_id": ctx.key.id, "start": 0, "sink": ctx.sink, "sink_ids": list(ctx.token_ids[:ctx.sink]),
            "ids": list(ctx.token_ids[ctx.sink:])}
