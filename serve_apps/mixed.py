"""Mixed schedules: models take turns generating one sequence, each reading the others' positions through Σ.

``self`` is the :class:`~serve_apps.ingress.PoolIngress` whose checks, handles and metrics a schedule uses.
Consecutive segments of one model are merged (its cache simply continues).

**One tokenizer** (:func:`run_mixed`, :func:`kvlingua.generate.mixed_generate` split across replicas): the ingress
runs the schedule segment by segment; each model exports the positions it computed, raw (for its own later
segments) and encoded into Σ once (for every other model), and each next model rebuilds its cache from those
pieces, so no position is translated twice.

**Models that tokenize differently** (:func:`run_across`, :func:`kvlingua.crossmixed.mixed_text` split across
replicas): text is the interface, and a switch re-tokenizes the text so far for the new model. The ingress holds
the text, the model that wrote each character and what each model's cache holds (ids, character ends, computed
or read through Σ), plans every switch with :func:`kvlingua.crossmixed.plan_switch` (keep ``n`` positions, then
runs the reader reads itself or through Σ from one owner), and measures each segment's new text with
:func:`kvlingua.crossmixed.written`. The replicas compute (:mod:`serve_apps.mixed_replica`): an owner encodes its own
run into Σ once per state of its cache (keys un-rotated), the reader decodes it at the picks, rotates keys at its
positions, reads its own runs, samples and exports what it added, raw; the ingress keeps those pieces. The prompt
must be text (token ids are one tokenizer's: 400); ``tokens`` are ids in each writer's vocabulary (``models``
says whose), and each switch gives the reader's positions ``[start, end)`` in its own tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvlingua.crossmixed import CachedPositions, plan_switch, tokens_of, written
from serve_apps.mixed_replica import Pieces
from serve_apps.requests import Prepared, RequestError, request_seed, timings
from serve_apps.schemas import MixedRequest, MixedResponse, SwitchInfo, SwitchSpan

if TYPE_CHECKING:
    from serve_apps.ingress import PoolIngress

ROUTE = "/v1/generate/mixed"


async def run_mixed(self: PoolIngress, req: MixedRequest) -> MixedResponse:
    """Run a schedule; consecutive segments of one model are merged (its cache simply continues)."""
    merged: list[list] = []
    for i, seg in enumerate(req.schedule):
        self._model(seg.model, f"schedule[{i}].model")
        self._n(seg.max_new_tokens, f"schedule[{i}].max_new_tokens")
        if merged and merged[-1][0] == seg.model:
            merged[-1][1] += seg.max_new_tokens
        else:
            merged.append([seg.model, seg.max_new_tokens])
    total = sum(n for _, n in merged)
    self._n(total, "schedule (total max_new_tokens)")
    apart = self.tokenizers.shared([name for name, _ in merged])
    if apart is not None:
        return await run_across(self, req, merged, total, apart)
    ids = self._ids(req.prompt, model=merged[0][0])
    self._check_length(ids)
    seed = request_seed(req.seed)
    params = dict(max_new_tokens=total, temperature=req.temperature, top_p=req.top_p, seed=seed,
                  stop_at_eos=not req.ignore_eos)
    p = Prepared(merged[0][0], None, "none", "none", None, ids, 0, params, None, ROUTE)
    pending, state = ids[-1], None
    history: list[tuple[str, dict]] = []  # (model that computed them, its export) per segment, in order
    tokens, owners, switches = [], [], []
    prefill_s = translate_s = decode_s = 0.0
    finished = "length"
    for k, (name, n) in enumerate(merged):
        last = k == len(merged) - 1
        context = None if k == 0 else [out["own"] if owner == name else out["latent"] for owner, out in history]
        read = max((i + 1 for i, (owner, _) in enumerate(history) if owner == name), default=0)
        switches += [SwitchInfo(source=owner, target=name, positions=out["positions"])  # newly translated
                     for owner, out in history[read:]]
        await self._check_running(name)
        out = await self._call(p, name, self.handles[name].segment.remote(ids, pending, n, params, state,
                                                                          context, not last))
        tokens += out["tokens"]
        owners += [name] * len(out["tokens"])
        prefill_s += out["prefill_s"]
        translate_s += out["translate_s"]
        decode_s += out["decode_s"]
        if out["eos"]:
            finished = "eos"
            break
        pending, state = out["tokens"][-1], out["generator_state"]
        history.append((name, out))
    self.metrics.observe("translate_seconds", p.route, translate_s)
    return MixedResponse(text=self.text(tokens, merged[0][0]), tokens=tokens, models=owners, switches=switches,
                         prompt_tokens=len(ids), new_tokens=len(tokens), finish_reason=finished, seed=seed,
                         timings=timings(prefill_s, translate_s, decode_s))


def _taken(pieces: Pieces, n: int) -> Pieces:
    """The pieces holding a cache's first ``n`` positions (the last one cut to what is still cached)."""
    out, left = [], n
    for payload, take in pieces:
        if left <= 0:
            break
        out.append((payload, min(take, left)))
        left -= take
    return out


async def run_across(self: PoolIngress, req: MixedRequest, merged: list[list], total: int,
                     apart: tuple[str, str]) -> MixedResponse:
    """A schedule whose models tokenize differently (``apart``: two of them): text in, text out."""
    if not isinstance(req.prompt, str):
        raise RequestError(400, f"prompt: token ids are one tokenizer's, and the schedule's {apart[0]!r} and "
                                f"{apart[1]!r} tokenize differently; send the prompt as text", param="prompt",
                           code="invalid_token")
    text = req.prompt
    if not text:
        raise RequestError(400, "prompt: empty; give at least one character of text", param="prompt")
    for name in dict.fromkeys(name for name, _ in merged):  # every model reads the prompt in its own tokens
        self._check_length(self._ids(text, model=name))
    seed = request_seed(req.seed)
    params = dict(max_new_tokens=total, temperature=req.temperature, top_p=req.top_p, seed=seed,
                  stop_at_eos=not req.ignore_eos)
    p = Prepared(merged[0][0], None, "none", "none", None, [], 0, params, None, ROUTE)
    cached: dict[str, CachedPositions] = {}  # model -> what its cache holds, per position
    held: dict[str, Pieces] = {}  # model -> its cache, raw, as the pieces its segments exported
    latents: dict[str, dict] = {}  # owner -> its encoded run in Σ [1, R, Q], until it runs again
    owners = [merged[0][0]] * len(text)  # the model that wrote each character (the first reads the prompt)
    tokens, writers, switches, pieces = [], [], [], []
    state, prompt_tokens, finished = None, 0, "length"
    prefill_s = translate_s = decode_s = 0.0
    for i, (name, n) in enumerate(merged):
        tok = self.tokenizers.of(name)
        ids, ends = tokens_of(tok, text)
        prompt_tokens = prompt_tokens or len(ids)
        plan = plan_switch(name, cached, owners, ids, ends, self.sink)
        for owner, run in plan.owners().items():
            if owner not in latents:
                await self._check_running(owner)
                call = self.handles[owner].encode_run.remote(_taken(held[owner], len(cached[owner])), list(run))
                latents[owner] = await self._call(p, owner, call)
                translate_s += latents[owner]["translate_s"]
        await self._check_running(name)
        mine = _taken(held.get(name, []), plan.keep)
        out = await self._call(p, name, self.handles[name].segment_text.remote(
            mine, plan, {o: latents[o] for o in plan.owners()}, ids, n, params, state, i < len(merged) - 1))
        latents.pop(name, None)  # its cache changed: its run is encoded anew when next read
        record = cached.setdefault(name, CachedPositions())
        record.read(plan, ids, ends)
        switches += [SwitchSpan(source=r.owner, target=name, positions=r.end - r.start, start=r.start, end=r.end)
                     for r in plan.runs if r.kind == "sigma"]
        new = out["tokens"]
        added, new_ends = written(tok, ids, new, len(text))
        record.wrote(ids[-1], ends[-1], new, new_ends)
        text += added
        owners += [name] * len(added)
        pieces.append(added)
        tokens += new
        writers += [name] * len(new)
        prefill_s += out["prefill_s"]
        translate_s += out["translate_s"]
        decode_s += out["decode_s"]
        if out["eos"]:
            finished = "eos"
            break
        state = out["generator_state"]
        if "cache" in out:
            held[name] = mine + [(out["cache"], out["positions"])]
    self.metrics.observe("translate_seconds", ROUTE, translate_s)
    return MixedResponse(text="".join(pieces), tokens=tokens, models=writers, switches=switches,
                         prompt_tokens=prompt_tokens, new_tokens=len(tokens), finish_reason=finished, seed=seed,
                         timings=timings(prefill_s, translate_s, decode_s))
