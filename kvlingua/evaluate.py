"""Held-out evaluation of shared spaces: suffix NLL per path under every condition.

For a path i->j, target model j continues the suffix ``ids[j][:, P:]`` after a prefix
cache built in one of these ways (all NLLs are per suffix token, via
``backend.suffix_nll``):

* ``base``: j's own cache of its prefix ``ids[j][:, :P]`` (the ceiling to match);
* ``control``: j's own cache of *another* sequence's prefix (``Batch.control_prefix``:
  the batch rolled by one): right positions, wrong content — the honest floor for content;
* ``no-prefix``: no cache at all (a looser floor);
* ``identity``: i's cache handed over unchanged (only when the cache layouts match);
* one condition per named space: ``space.translate(i's cache, i, j)``.

Each NLL is averaged per batch, then reported as mean ± std over the held-out batches,
over the whole suffix and over its first ``first_tokens`` tokens. The headline number
is *content transferred* = (NLL_control − NLL) / (NLL_control − NLL_base): 0 is no
better than a wrong-content cache, 1 is as good as the target's own cache.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kvlingua.backend import PoolBackend
from kvlingua.cache import KVBlock
from kvlingua.paths import PathT, path_name
from kvlingua.space import LatentBlock, SharedSpace, identity_translate
from kvlingua.train import Batch, space_device

TARGET_ONLY = ("base", "control", "no-prefix")
"""Conditions measured on the target alone (its own cache, another text's cache, none): they depend
on neither the source model nor any space, and are the references of *content transferred*."""
SPANS = ("all", "first")
"""``all``: every predicted suffix token; ``first``: the first ``first_tokens`` of them."""


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation settings (the ``eval`` section of a run config)."""

    batches: int = 8
    """Held-out batches to evaluate (each of the training batch size; at least 2 sequences each)."""
    first_tokens: int = 16
    """Length of the early-suffix span, where the prefix matters most."""
    curve_batches: int = 2
    """The first this many held-out batches (at most ``batches``) are evaluated every
    ``train.eval_every`` steps for the training curves; the final table uses all ``batches``."""

    def __post_init__(self) -> None:
        for name in ("batches", "first_tokens", "curve_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def content_transferred(nll: float, control: float, base: float) -> float:
    """(control − nll) / (control − base); NaN when control equals base (no content to transfer)."""
    gap = control - base
    return (control - nll) / gap if gap != 0 else math.nan


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class ConditionSummary:
    """NLL of one condition on one path, and the content it transferred."""

    nll_mean: float
    """Suffix NLL per token, mean over held-out batches."""
    nll_std: float
    """Standard deviation of the per-batch NLL (0 for a single batch)."""
    first_mean: float
    """NLL over the first ``first_tokens`` suffix tokens, mean over batches."""
    first_std: float
    """Its standard deviation over batches."""
    content: float
    """Content transferred over the whole suffix (1 for base, 0 for control)."""
    content_first: float
    """Content transferred over the first tokens."""


@dataclass
class EvalResult:
    """Per-batch suffix NLLs of every path under every condition, and their summaries."""

    paths: list[PathT]
    """Evaluated (source, target) paths, in order."""
    conditions: list[str]
    """Condition names in column order (references, identity, then spaces)."""
    first_tokens: int
    """Length of the ``first`` span."""
    per_batch: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    """span -> path name -> condition -> mean NLL of each held-out batch (identity may be absent)."""

    @property
    def num_batches(self) -> int:
        first_path = next(iter(self.per_batch["all"].values()))
        return len(next(iter(first_path.values()), []))

    def conditions_of(self, path: PathT) -> list[str]:
        """Conditions measured on ``path`` (identity is absent where layouts differ)."""
        have = self.per_batch["all"][path_name(path)]
        return [c for c in self.conditions if c in have]

    def summary_for(self, path: PathT, condition: str) -> ConditionSummary:
        """Mean ± std NLL of ``condition`` on ``path`` over batches, both spans, with content transferred."""
        name = path_name(tuple(path))
        if name not in self.per_batch["all"]:
            raise KeyError(f"path {name} was not evaluated; evaluated paths: {list(self.per_batch['all'])}")
        if condition not in self.per_batch["all"][name]:
            raise KeyError(f"condition {condition!r} was not measured on {name}; have {self.conditions_of(path)}")
        stats = {}
        for span in SPANS:
            row = self.per_batch[span][name]
            mean, std = _mean_std(row[condition])
            ct = (content_transferred(mean, _mean_std(row["control"])[0], _mean_std(row["base"])[0])
                  if "control" in row and "base" in row else math.nan)
            stats[span] = (mean, std, ct)
        return ConditionSummary(stats["all"][0], stats["all"][1], stats["first"][0], stats["first"][1],
                                stats["all"][2], stats["first"][2])

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics: ``{prefix}/nll/i->j/cond``, ``{prefix}/nll_first/...``, ``{prefix}/content/...``."""
        out = {}
        for path in self.paths:
            name = path_name(path)
            for cond in self.conditions_of(path):
                s = self.summary_for(path, cond)
                out[f"{prefix}/nll/{name}/{cond}"] = s.nll_mean
                out[f"{prefix}/nll_first/{name}/{cond}"] = s.first_mean
                if cond not in ("base", "control"):
                    out[f"{prefix}/content/{name}/{cond}"] = s.content
                    out[f"{prefix}/content_first/{name}/{cond}"] = s.content_first
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary (NaN written as null) plus the per-batch values."""
        clean = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
        paths = {}
        for path in self.paths:
            row = {"source": path[0], "target": path[1]}
            for cond in self.conditions_of(path):
                row[cond] = {k: clean(v) for k, v in asdict(self.summary_for(path, cond)).items()}
            paths[path_name(path)] = row
        return {"first_tokens": self.first_tokens, "batches": self.num_batches, "conditions": list(self.conditions),
                "paths": paths, "per_batch": self.per_batch}

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON; returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    def to_markdown(self) -> str:
        """One table per span: rows are paths, columns NLL mean ± std per condition, then content transferred."""
        n = self.num_batches
        scored = [c for c in self.conditions if c not in ("base", "control")]
        titles = {"all": "all suffix tokens", "first": f"first {self.first_tokens} suffix tokens"}
        parts = []
        for span in SPANS:
            parts.append(f"### Suffix NLL per token, {titles[span]} (mean ± std over {n} held-out batches)\n")
            head = ["path", *self.conditions, *[f"content: {c}" for c in scored]]
            parts.append("| " + " | ".join(head) + " |")
            parts.append("|" + "---|" * len(head))
            for path in self.paths:
                have = set(self.conditions_of(path))
                cells = [path_name(path)]
                for c in self.conditions:
                    if c in have:
                        s = self.summary_for(path, c)
                        mean, std = (s.nll_mean, s.nll_std) if span == "all" else (s.first_mean, s.first_std)
                        cells.append(f"{mean:.3f} ± {std:.3f}")
                    else:
                        cells.append("—")
                for c in scored:
                    if c in have:
                        s = self.summary_for(path, c)
                        ct = s.content if span == "all" else s.content_first
                        cells.append("—" if math.isnan(ct) else f"{ct:.2f}")
                    else:
                        cells.append("—")
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
        parts.append("Content transferred = (NLL_control − NLL) / (NLL_control − NLL_base): 0 is a wrong-content "
                     "cache, 1 the target's own cache. Control = the target's own cache of another sequence's prefix.")
        return "\n".join(parts) + "\n"


def _batch_means(nll: Tensor, first_tokens: int) -> tuple[float, float]:
    """Per-token NLL ``[B, S-1]`` -> (mean over all, mean over the first ``first_tokens`` positions)."""
    return float(nll.mean()), float(nll[:, :first_tokens].mean())


def evaluate(
    backend: PoolBackend,
    batches: Sequence[Batch],
    paths: Sequence[PathT],
    spaces: Mapping[str, SharedSpace],
    *,
    first_tokens: int = 16,
    identity: bool = True,
    references: bool = True,
) -> EvalResult:
    """Suffix NLL of every path under every condition on held-out ``batches``.

    Args:
        backend: the frozen pool.
        batches: held-out batches (each with at least 2 sequences, for the control).
        paths: (source, target) paths to evaluate.
        spaces: condition name -> SharedSpace (e.g. ``{"translator": s, "linear": l}``);
            each is run in eval mode under ``no_grad`` and its mode restored after. A source's
            block is encoded once per batch and decoded for every target.
        first_tokens: length of the early-suffix span.
        identity: also measure the identity map where source and target layouts match.
        references: measure base/control/no-prefix (needed for content transferred;
            only :func:`make_eval_fn` turns it off to reuse earlier references).

    Returns:
        :class:`EvalResult`.
    """
    if not batches:
        raise ValueError("evaluate needs at least one held-out batch")
    if not paths:
        raise ValueError("evaluate needs at least one path")
    if first_tokens < 1:
        raise ValueError(f"first_tokens must be >= 1, got {first_tokens}")
    reserved = [n for n in spaces if n in (*TARGET_ONLY, "identity")]
    if reserved:
        raise ValueError(f"space names {reserved} clash with built-in conditions {[*TARGET_ONLY, 'identity']}")
    paths = [tuple(p) for p in paths]
    pool = backend.names()
    unknown = sorted({m for p in paths for m in p if m not in pool})
    if unknown:
        raise ValueError(f"paths name model(s) {unknown} that are not in the pool {pool}")
    per_batch: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {path_name(p): {} for p in paths} for s in SPANS}

    def record(path: PathT, cond: str, nll: Tensor) -> None:
        for span, value in zip(SPANS, _batch_means(nll, first_tokens)):
            per_batch[span][path_name(path)].setdefault(cond, []).append(value)

    modes = {name: sp.training for name, sp in spaces.items()}
    for sp in spaces.values():
        sp.eval()
    try:
        with torch.no_grad():
            for b in batches:
                if next(iter(b.ids.values())).shape[0] < 2:
                    raise ValueError(f"batch {b.key or '(unnamed)'} has 1 sequence; the control condition "
                                     "needs at least 2 (it pairs each suffix with another sequence's prefix)")
                own: dict[str, KVBlock] = {}
                refs: dict[str, dict[str, Tensor]] = {}
                latents: dict[tuple[str, str], LatentBlock] = {}  # (space, source) -> IN_source(block), once
                for src, tgt in paths:
                    if src not in own:
                        own[src] = backend.prefix_block(src, b.prefix(src))  # [B, P, L_i, D_i]
                    if references and tgt not in refs:
                        suffix = b.suffix(tgt)
                        if tgt not in own:
                            own[tgt] = backend.prefix_block(tgt, b.prefix(tgt))
                        wrong = backend.prefix_block(tgt, b.control_prefix(tgt))
                        refs[tgt] = {"base": backend.suffix_nll(tgt, own[tgt], suffix),
                                     "control": backend.suffix_nll(tgt, wrong, suffix),
                                     "no-prefix": backend.suffix_nll(tgt, None, suffix)}
                    for cond, nll in refs.get(tgt, {}).items():
                        record((src, tgt), cond, nll)
                    src_sum, tgt_sum = backend.summary(src), backend.summary(tgt)
                    if identity and src_sum.layout == tgt_sum.layout:
                        block = identity_translate(own[src], src_sum, tgt_sum)
                        record((src, tgt), "identity", backend.suffix_nll(tgt, block, b.suffix(tgt)))
                    for name, sp in spaces.items():
                        if (name, src) not in latents:
                            latents[(name, src)] = sp.encode(own[src].to(space_device(sp)), src)  # [B, P, Q]
                        out = sp.decode(latents[(name, src)], tgt).map(lambda t: t.float().cpu())  # [B, P, L_j, D_j]
                        record((src, tgt), name, backend.suffix_nll(tgt, out, b.suffix(tgt)))
    finally:
        for name, sp in spaces.items():
            sp.train(modes[name])
    present = {c for row in per_batch["all"].values() for c in row}
    order = [*(TARGET_ONLY if references else ()), "identity", *spaces]
    return EvalResult(paths, [c for c in order if c in present], first_tokens, per_batch)


def make_eval_fn(
    backend: PoolBackend,
    batches: Sequence[Batch],
    paths: Sequence[PathT],
    space: SharedSpace,
    *,
    first_tokens: int = 16,
) -> Callable[[int], dict[str, float]]:
    """An ``eval_fn`` for :func:`kvlingua.train.fit` that tracks ``space`` on held-out batches.

    Returns metrics ``eval/nll/i->j`` (the space), ``eval/nll_first/i->j``,
    ``eval/content/i->j`` and the fixed references ``eval/nll/i->j/base|control|no-prefix``
    (measured once, on the first call: the pool is frozen), which
    :func:`kvlingua.report.plot_history` draws as dashed lines.
    """
    cache: dict[str, EvalResult] = {}

    def eval_fn(step: int) -> dict[str, float]:
        if "refs" not in cache:
            cache["refs"] = evaluate(backend, batches, paths, {}, first_tokens=first_tokens, identity=False)
        refs = cache["refs"]
        res = evaluate(backend, batches, paths, {"space": space}, first_tokens=first_tokens,
                       identity=False, references=False)
        for span in SPANS:
            for name, row in res.per_batch[span].items():
                row.update(refs.per_batch[span][name])
        res.conditions = [*TARGET_ONLY, "space"]
        out = {}
        for path in res.paths:
            name = path_name(path)
            s = res.summary_for(path, "space")
            out[f"eval/nll/{name}"] = s.nll_mean
            out[f"eval/nll_first/{name}"] = s.first_mean
            out[f"eval/content/{name}"] = s.content
            for ref in TARGET_ONLY:
                out[f"eval/nll/{name}/{ref}"] = res.summary_for(path, ref).nll_mean
        return out

    return eval_fn
