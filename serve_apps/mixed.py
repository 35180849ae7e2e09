"""Mixed schedules: models take turns generating one sequence, each reading the others' positions through Σ.

The ingress runs a schedule segment by segment: each model exports the positions it computed, raw
(for its own later segments) and encoded into Σ once (for every other model), and each next model
rebuilds its cache from those pieces, so no position is translated twice. ``self`` is the
:class:`~serve_apps.ingress.PoolIngress` whose checks, handles and metrics the schedule uses.

A schedule's models must share one tokenizer: a switch hands over positions by token, and between
models that tokenize differently the generated text would have to be re-read along a token map at
every switch, which is not served (400 naming the two models).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from serve_apps.requests import Prepared, RequestError, request_seed, timings
from serve_apps.schemas import MixedRequest, MixedResponse, SwitchInfo

if TYPE_CHECKING:
    from serve_apps.ingress import PoolIngress


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
        raise RequestError(400, f"schedule: {apart[0]!r} and {apart[1]!r} tokenize differently; a mixed schedule "
                                "switches models by token and needs models of one tokenizer", param="schedule")
    ids = self._ids(req.prompt, model=merged[0][0])
    self._check_length(ids)
    seed = request_seed(req.seed)
    params = dict(max_new_tokens=total, temperature=req.temperature, top_p=req.top_p, seed=seed,
                  stop_at_eos=not req.ignore_eos)
    p = Prepared(merged[0][0], None, "none", "none", None, ids, 0, params, None, "/v1/generate/mixed")
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
