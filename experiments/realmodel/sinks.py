"""Where a long prefix's content is lost: the target's attention, and which part of a translated cache costs it.

Past a few hundred positions a translated cache carries less of its context than at the trained length
(docs/results/real-pair.md, *Positions*). This stage asks why, on a trained pool and held-out prefixes of ``P``
tokens. For every path it scores the suffix NLL after the target reads

* ``translated``: the source's cache through Σ, as evaluation reads it;
* ``own keys``: the translated values under the target's own keys (attention routed exactly; values translated);
* ``own values``: the converse (translated keys route the target's own values);
* ``own at top n %``: the translated cache with the target's own keys and values at the ``n`` % of positions its
  suffix attends to most, per layer (the mass each position receives, averaged over heads and suffix queries);
  an oracle: it reads the target's own cache;
* ``recomputed at top n %``: no oracle. The target picks the ``n`` % of positions that the suffix's first token (read,
  never scored) attends to most *in the translated cache* (mass averaged over layers) and computes its own keys and
  values there, reading its own token at
  each such position after the translated positions before it (:func:`kvlingua.refresh.recompute_at`): what a
  space's ``refresh`` does,

beside base, control and no prefix (so content transferred compares). And per target layer it records the
attention mass the suffix puts on the sink (position 0) and on the five most-attended positions after it: a
sliding-window layer whose window has moved past position 0 parks its attention on a few *secondary* sinks
inside the translated positions, and those are the positions a translated cache must get right.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from kvlingua.align import read_along
from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock
from kvlingua.eval_result import SPANS, EvalResult
from kvlingua.evaluate import batch_means
from kvlingua.job import all_paths, at_prefix_len, eval_batches
from kvlingua.paths import path_name
from kvlingua.refresh import most_attended, recompute_at, refresh_count
from kvlingua.view import CacheView

TOP_SHARES = (0.01, 0.03, 0.10)
"""Shares of the translated positions (the most attended, per layer) that the ``own at top n %`` rows restore."""
TOP_POSITIONS = 5
"""Positions after the sink whose attention mass the attention table sums (the most attended, per layer)."""
SINKS_FILE, ATTENTION_FILE = "sinks.json", "attention.json"


RECOMPUTE_SHARES = (0.03, 0.10)
"""Shares of the translated positions that the ``recomputed at top n %`` rows have the target compute itself."""


def conditions() -> list[str]:
    """The scored conditions after base, control and no prefix, in report order."""
    return ["translated", "own keys", "own values", *(top_name(s) for s in TOP_SHARES),
            *(recompute_name(s) for s in RECOMPUTE_SHARES)]


def recompute_name(share: float) -> str:
    return f"recomputed at top {share:.0%}"


def top_name(share: float) -> str:
    return f"own at top {share:.0%}"


def _restore_top(received: Tensor, share: float) -> Tensor:
    """``[B, T, L, 1]`` mask of the ``ceil(share·T)`` positions per row and layer that receive the most mass
    (``received`` ``[B, L, T]``)."""
    idx = received.topk(refresh_count(share, received.shape[-1]), dim=-1).indices  # [B, L, n]
    mask = torch.zeros_like(received, dtype=torch.bool).scatter_(-1, idx, True)  # [B, L, T]
    return mask.permute(0, 2, 1).unsqueeze(-1)  # [B, T, L, 1]


@torch.no_grad()
def sink_study(run_dir: str | Path, prefix_len: int, batches: int, split: str = "test") -> tuple[EvalResult, dict]:
    """Score every path of the trained pool in ``run_dir`` under :func:`conditions` on ``batches`` held-out batches
    of ``prefix_len``-token prefixes (module docstring).

    Returns ``(EvalResult with base, control, no-prefix and every condition, attention)`` where ``attention`` is
    ``{target: {"layer_types": [...] | None, "sliding_window": int | None, "sink": [L], "top": [L]}}``: the mean
    mass the suffix puts on position 0 and on the :data:`TOP_POSITIONS` most-attended positions after it.
    """
    from kvlingua.run import pool_job

    loaded, job = pool_job(run_dir, split=split, batches=batches)
    job = at_prefix_len(job, prefix_len)
    backend = LocalBackend(loaded.models)
    space = loaded.space.eval()
    view = CacheView.of(space.cfg)
    k = view.sink_tokens
    paths = all_paths(job)
    rotations = {m: backend.rotation(m) for m in backend.names()} if view.unrotate else {}
    per_batch: dict = {s: {path_name(p): {} for p in paths} for s in SPANS}
    attention: dict[str, dict] = {}
    first = job.eval.first_tokens

    def record(path, cond: str, nll: Tensor) -> None:
        for span, value in zip(SPANS, batch_means(nll, first)):
            per_batch[span][path_name(path)].setdefault(cond, []).append(value)

    sums: dict[str, list[Tensor]] = {}
    for b in eval_batches(job):
        view.check_prefix(b.prefix_len)
        own = {m: backend.prefix_block(m, b.prefix(m)) for m in backend.names()}  # each [B, P, L_m, D_m]
        received = {m: backend.attention_received(m, own[m], b.suffix(m)) for m in backend.names()}  # [B, L, P]
        for m, r in received.items():  # [B, L, P]
            top = r[:, :, k:].topk(min(TOP_POSITIONS, r.shape[-1] - k), dim=-1).values.sum(-1)  # [B, L]
            sums.setdefault(m, []).append(torch.stack([r[:, :, 0].mean(0), top.mean(0)]))  # [2, L]
        for src, tgt in paths:
            suffix = b.suffix(tgt)
            record((src, tgt), "base", backend.suffix_nll(tgt, own[tgt], suffix))
            record((src, tgt), "control", backend.suffix_nll(tgt, backend.prefix_block(tgt, b.control_prefix(tgt, k)),
                                                             suffix))
            record((src, tgt), "no-prefix", backend.suffix_nll(tgt, None, suffix))
            sink = KVBlock(own[tgt].keys[:, :k], own[tgt].values[:, :k], own[tgt].n_kv_heads) if k else None
            z = read_along(space.encode(view.to_space(own[src], rotations.get(src)), src), b.align(src, tgt, k))
            out = space.decode(z, tgt, b.prefix(tgt)[:, k:]).map(lambda t: t.float())  # [B, P-k, L, D] what Σ gives
            true = view.to_space(own[tgt], rotations.get(tgt))  # [B, P-k, L, D] the target's own, in Σ's view
            variants = {"translated": (out.keys, out.values), "own keys": (true.keys, out.values),
                        "own values": (out.keys, true.values)}
            for share in TOP_SHARES:
                mask = _restore_top(received[tgt][:, :, k:], share)  # [B, P-k, L, 1]
                variants[top_name(share)] = (torch.where(mask, true.keys, out.keys),
                                             torch.where(mask, true.values, out.values))
            translated = view.to_cache(out, rotations.get(tgt), sink)  # [B, P, L, D]
            for cond, (keys, values) in variants.items():  # one cache at a time: each is [B, P, L, D]
                block = translated if cond == "translated" else view.to_cache(
                    KVBlock(keys, values, out.n_kv_heads), rotations.get(tgt), sink)
                record((src, tgt), cond, backend.suffix_nll(tgt, block, suffix))
            # the first suffix token's attention only: it is read, never predicted, so the choice sees no scored token
            seen = backend.attention_received(tgt, translated, suffix[:, :1])  # [B, L, P]
            for share in RECOMPUTE_SHARES:
                block = recompute_at(backend.models[tgt], translated, b.prefix(tgt), most_attended(seen, share, k))
                record((src, tgt), recompute_name(share), backend.suffix_nll(tgt, block, suffix))
    for m, rows in sums.items():
        sink_mass, top_mass = torch.stack(rows).mean(0)  # [L] each
        config = backend.models[m].config
        attention[m] = {"layer_types": getattr(config, "layer_types", None),
                        "sliding_window": getattr(config, "sliding_window", None),
                        "sink": [round(float(x), 4) for x in sink_mass], "top": [round(float(x), 4) for x in top_mass]}
    result = EvalResult(paths, ["base", "control", "no-prefix", *conditions()], first, per_batch, None,
                        job.eval.content_min_se)
    return result, attention


def write_sink_study(run_dir: str | Path, out: Path, prefix_len: int, batches: int) -> None:
    """``out/sinks.json`` (:class:`EvalResult`) and ``out/attention.json`` of :func:`sink_study`."""
    result, attention = sink_study(run_dir, prefix_len, batches)
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / SINKS_FILE)
    (out / ATTENTION_FILE).write_text(json.dumps({"prefix_len": prefix_len, "targets": attention}, indent=1) + "\n")


def sinks_section(run_dir: Path) -> list[str]:
    """The sink study at each held-out prefix length (``sinks-P<n>/``), shortest first: the conditions per path,
    then each target's attention per layer."""
    from experiments.realmodel.sections import _fmt, compare, content_cell

    dirs = sorted((d for d in Path(run_dir).glob("sinks-P*") if (d / ATTENTION_FILE).is_file()),
                  key=lambda d: int(d.name.removeprefix("sinks-P")))
    lines: list[str] = []
    for d in dirs:
        result = EvalResult.from_dict(json.loads((d / SINKS_FILE).read_text()))
        attention = json.loads((d / ATTENTION_FILE).read_text())
        P = attention["prefix_len"]
        conds = conditions()
        lines += [f"## Where a {P}-token prefix's content goes (test split)", "",
                  f"The trained pool on held-out prefixes of {P} tokens ({result.num_batches} batches). `translated` is "
                  "the cache through Σ as evaluation reads it; `own keys` keeps the translated values under the target's "
                  "own keys (attention routed exactly), `own values` the converse; `own at top n %` restores the target's "
                  "own keys and values at the n % of positions its suffix attends to most in each layer (measured on the "
                  "target's own cache, an oracle); `recomputed at top n %` has the target compute its own keys and values "
                  "at the n % of positions the suffix's first token (read, not scored) attends to most in the *translated* "
                  "cache, each by reading its own "
                  "token there after the translated positions before it (no oracle). Each cell: NLL (content), then the paired difference against `translated` (± SE; "
                  "negative = restoring that part helps). `experiments/realmodel/sinks.py` says why.", "",
                  "| path | " + " | ".join(conds) + " |", "|---|" + "---|" * len(conds)]
        for path in result.paths:
            cells = []
            for cond in conds:
                cell = f"{_fmt(result.summary_for(path, cond).nll_mean)} ({content_cell(result, path, cond)})"
                if cond != "translated":
                    diff, se, _ = compare(result, path, cond, "translated")
                    cell += f" {diff:+.3f} ± {se:.3f}"
                cells.append(cell)
            lines.append(f"| {path_name(path)} | " + " | ".join(cells) + " |")
        lines += ["", f"Attention of each target's suffix on its own {P}-token prefix, per layer: the mass on the "
                  f"sink (position 0) and on the {TOP_POSITIONS} most-attended positions after it (averaged over heads, "
                  "suffix queries and rows). A sliding-window layer whose window no longer reaches position 0 puts "
                  "none there and leans on a few secondary sinks instead.", "",
                  "| target | layer | type | on the sink | on the top 5 after it |", "|---|---|---|---|---|"]
        for target, a in attention["targets"].items():
            types = a.get("layer_types") or ["full_attention"] * len(a["sink"])
            window = a.get("sliding_window")
            for layer, (kind, sink, top) in enumerate(zip(types, a["sink"], a["top"])):
                kind = f"sliding ({window})" if kind == "sliding_attention" and window else kind.replace("_attention", "")
                lines.append(f"| {target} | {layer} | {kind} | {sink:.2f} | {top:.2f} |")
        lines.append("")
    return lines
