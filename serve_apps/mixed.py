"""Mixed schedules: models take turns generating one sequence, each reading the others' positions through Σ.

:class:`MixedSchedules` runs ``POST /v1/generate/mixed`` over the :class:`~serve_apps.router.Router`'s handles, with
the :class:`~serve_apps.planner.Planner`'s checks. Consecutive segments of one model are merged
(:func:`kvlingua.crossmixed.merge_schedule`: its cache simply continues).

**One tokenizer** (:meth:`MixedSchedules.one_tokenizer`, :func:`kvlingua.mixed.mixed_generate` split across
replicas): the ingress keeps the same :class:`kvlingua.mixed.Ledger` (which model computed each position; what a
model has not read yet is a switch), and runs the schedule segment by segment; each model exports the positions it
computed, raw (for its own later segments) and encoded into Σ once (for every other model), and each next model
rebuilds its cache from those pieces (``model_server.segment``), so no position is encoded twice.

**Models that tokenize differently** (:meth:`MixedSchedules.across`, :func:`kvlingua.crossmixed.mixed_text` split
across replicas): text is the interface, and a switch re-tokenizes the text so far for the new model. The ingress
holds the text, the model that wrote each character and what each model's cache holds (ids, character ends,
computed or read through Σ), plans every switch with :func:`kvlingua.crossmixed.plan_switch` (keep ``n`` positions,
then runs the reader reads itself or through Σ from one owner), and measures each segment's new text with
:func:`kvlingua.crossmixed.written`. The replicas compute (:mod:`serve_apps.mixed_replica`): an owner encodes its own
run into Σ once per state of its cache (keys un-rotated), the reader decodes it at the picks, rotates keys at its
positions, reads its own runs, samples and exports what it added, raw; the ingress keeps those pieces. The prompt
must be text (token ids are one tokenizer's: 400); ``tokens`` are ids in each writer's vocabulary (``models``
says whose), and each switch gives the reader's positions ``[start, end)`` in its own tokens.
"""
from __future__ import annotations

import time

from kvlingua.crossmixed import CachedPositions, merge_schedule, plan_switch, tokens_of, written
from kvlingua.mixed import Ledger
from serve_apps.metrics import ServeMetrics
from serve_apps.mixed_replica import Pieces
from serve_apps.planner import Planner
from serve_apps.requests import PhaseClock, RequestError, sampling_params
from serve_apps.router import Router
from serve_apps.schemas import MixedRequest, MixedResponse, SwitchInfo, SwitchSpan

ROUTE = "/v1/generate/mixed"


def _taken(pieces: Pieces, n: int) -> Pieces:
    """The pieces holding a cache's first ``n`` positions (the last one cut to what is still cached)."""
    out, left = [], n
    for payload, take in pieces:
        if left <= 0:
            break
        out.append((payload, min(take, left)))
        left -= take
    return out


class MixedSchedules:
    """``POST /v1/generate/mixed``: a schedule checked, then run segment by segment on the replicas."""

    def __init__(self, planner: Planner, router: Router, metrics: ServeMetrics):
        self.planner = planner
        self.router = router
        self.metrics = metrics

    async def run(self, req: MixedRequest) -> MixedResponse:
        """Check every segment (400/404 naming it), merge consecutive ones of one model, run the schedule."""
        started, plan = time.monotonic(), self.planner
        for i, seg in enumerate(req.schedule):
            plan.model(seg.model, f"schedule[{i}].model")
            plan.new_tokens(seg.max_new_tokens, f"schedule[{i}].max_new_tokens")
        merged = merge_schedule([(seg.model, seg.max_new_tokens) for seg in req.schedule])
        total = plan.new_tokens(sum(n for _, n in merged), "schedule (total max_new_tokens)")
        params = sampling_params(total, req.temperature, req.top_p, req.seed, req.ignore_eos)
        apart = plan.tokenizers.shared([name for name, _ in merged])
        if apart is not None:
            return await self.across(req, merged, params, apart, started)
        return await self.one_tokenizer(req, merged, params, started)

    async def _segment(self, started: float, name: str, method: str, *args) -> dict:
        """Call ``method`` of model ``name``'s replica within the request's deadline."""
        await self.router.check_running(name)
        return await self.router.call(started, name, getattr(self.router.handles[name], method).remote(*args))

    async def one_tokenizer(self, req: MixedRequest, merged: list[tuple[str, int]], params: dict,
                            started: float) -> MixedResponse:
        """Every model of the schedule reads the prompt's token ids; Σ carries each run once from its owner."""
        first = merged[0][0]
        ids = self.planner.ids(req.prompt, model=first)
        self.planner.check_length(ids)
        ledger = Ledger(first, len(ids) - 1)
        exports: dict[int, dict] = {}  # start of each run -> its owner's export (raw "own", Σ "latent")
        pending, state = ids[-1], None
        tokens, owners, switches = [], [], []
        clock, finished = PhaseClock(), "length"
        for k, (name, n) in enumerate(merged):
            last = k == len(merged) - 1
            switches += [SwitchInfo(source=r.owner, target=name, positions=r.end - r.start)  # newly translated
                         for r in ledger.unread(name)]
            context = None if k == 0 else [exports[r.start]["own" if r.owner == name else "latent"]
                                           for r in ledger.runs()]
            out = await self._segment(started, name, "segment", ids, pending, n, params, state, context, not last)
            tokens += out["tokens"]
            owners += [name] * len(out["tokens"])
            clock.add(out)
            if out["eos"]:
                finished = "eos"
                break
            pending, state = out["tokens"][-1], out["generator_state"]
            if not last:
                exports[ledger.wrote(name, len(out["tokens"])).start] = out
        self.metrics.observe("translate_seconds", ROUTE, clock.seconds["translate_s"])
        return MixedResponse(text=self.planner.text(tokens, first), tokens=tokens, models=owners, switches=switches,
                             prompt_tokens=len(ids), new_tokens=len(tokens), finish_reason=finished,
                             seed=params["seed"], timings=clock.timings())

    async def across(self, req: MixedRequest, merged: list[tuple[str, int]], params: dict, apart: tuple[str, str],
                     started: float) -> MixedResponse:
        """A schedule whose models tokenize differently (``apart``: two of them): text in, text out."""
        plan = self.planner
        if not isinstance(req.prompt, str):
            raise RequestError(400, f"prompt: token ids are one tokenizer's, and the schedule's {apart[0]!r} and "
                                    f"{apart[1]!r} tokenize differently; send the prompt as text", param="prompt",
                               code="invalid_token")
        text = req.prompt
        if not text:
            raise RequestError(400, "prompt: empty; give at least one character of text", param="prompt")
        for name in dict.fromkeys(name for name, _ in merged):  # every model reads the prompt in its own tokens
            plan.check_length(plan.ids(text, model=name))
        cached: dict[str, CachedPositions] = {}  # model -> what its cache holds, per position
        held: dict[str, Pieces] = {}  # model -> its cache, raw, as the pieces its segments exported
        latents: dict[str, dict] = {}  # owner -> its encoded run in Σ [1, R, Q], until it runs again
        owners = [merged[0][0]] * len(text)  # the model that wrote each character (the first reads the prompt)
        tokens, writers, switches, pieces = [], [], [], []
        state, prompt_tokens, finished = None, 0, "length"
        clock = PhaseClock()
        for i, (name, n) in enumerate(merged):
            tok = plan.tokenizers.of(name)
            ids, ends = tokens_of(tok, text)
            prompt_tokens = prompt_tokens or len(ids)
            switch = plan_switch(name, cached, owners, ids, ends, plan.sink)
            for owner, run in switch.owners().items():
                if owner not in latents:
                    theirs = _taken(held[owner], len(cached[owner]))
                    latents[owner] = await self._segment(started, owner, "encode_run", theirs, list(run))
                    clock.add(latents[owner], ("translate_s",))
            mine = _taken(held.get(name, []), switch.keep)
            out = await self._segment(started, name, "segment_text", mine, switch,
                                      {o: latents[o] for o in switch.owners()}, ids, n, params, state,
                                      i < len(merged) - 1)
            latents.pop(name, None)  # its cache changed: its run is encoded anew when next read
            record = cached.setdefault(name, CachedPositions())
            record.read(switch, ids, ends)
            switches += [SwitchSpan(source=r.owner, target=name, positions=r.end - r.start, start=r.start, end=r.end)
                         for r in switch.runs if r.kind == "sigma"]
            new = out["tokens"]
            added, new_ends = written(tok, ids, new, len(text))
            record.wrote(ids[-1], ends[-1], new, new_ends)
            text += added
            owners += [name] * len(added)
            pieces.append(added)
            tokens += new
            writers += [name] * len(new)
            clock.add(out)
            if out["eos"]:
                finished = "eos"
                break
            state = out["generator_state"]
            if "cache" in out:
                held[name] = mine + [(out["cache"], out["positions"])]
        self.metrics.observe("translate_seconds", ROUTE, clock.seconds["translate_s"])
        return MixedResponse(text="".join(pieces), tokens=tokens, models=writers, switches=switches,
                             prompt_tokens=prompt_tokens, new_tokens=len(tokens), finish_reason=finished,
                             seed=params["seed"], timings=clock.timings())
