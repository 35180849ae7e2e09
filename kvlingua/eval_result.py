"""What an evaluation measured and how it is summarised: :class:`EvalResult` (per-batch suffix NLLs of every path
under every condition, as :func:`kvlingua.evaluate.evaluate` scores them), :class:`ConditionSummary`, and the
statistics every report shares: :func:`paired_difference` (two conditions scored on the same held-out batches),
:func:`content_transferred` = (NLL_control − NLL) / (NLL_control − NLL_base), reported only where
:func:`content_gap_is_clear` (base beats control by more than ``content_min_se`` standard errors of their paired
per-batch difference; elsewhere NaN, "n/a" with the gap in tables). JSON (``eval.json``) and Markdown out, JSON in.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvlingua.metric_names import NllKey
from kvlingua.paths import PathT, path_name

TARGET_ONLY = ("base", "control", "no-prefix")
"""Conditions measured on the target alone (its own cache, another text's cache, none): they depend
on neither the source model nor any space, and are the references of *content transferred*."""
SPANS = ("all", "first")
"""``all``: every predicted suffix token; ``first``: the first ``first_tokens`` of them."""


def content_transferred(nll: float, control: float, base: float) -> float:
    """(control − nll) / (control − base); NaN when control equals base (no content to transfer)."""
    gap = control - base
    return (control - nll) / gap if gap != 0 else math.nan


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a[k] − b[k]`` over held-out batches and its standard error (std / sqrt(n); NaN for n = 1).

    ``a`` and ``b`` are per-batch values of two conditions measured on the same batches.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs two equally long, non-empty series; got {len(a)} and {len(b)}")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)  # [n]
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return float(d.mean()), se


def content_gap_is_clear(gap: float, gap_se: float, min_se: float) -> bool:
    """Whether control − base (``gap`` ± ``gap_se``) is a clear margin: > ``min_se`` standard errors and > 0."""
    if math.isnan(gap) or gap <= 0:
        return False
    return min_se == 0 or (not math.isnan(gap_se) and gap > min_se * gap_se)


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
    gap: float = math.nan
    """NLL_control − NLL_base on this path's target (all suffix tokens), mean over batches."""
    gap_se: float = math.nan
    """Standard error of that paired difference."""


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
    trained: list[PathT] | None = None
    """Paths the spaces were trained on; the others are zero-shot (None: every evaluated path)."""
    content_min_se: float = 3.0
    """Content transferred only where control − base > this many standard errors (else NaN)."""

    def is_trained(self, path: PathT) -> bool:
        """Whether ``path`` was trained (False: evaluated zero-shot)."""
        return self.trained is None or tuple(path) in {tuple(p) for p in self.trained}

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
        stats, gaps = {}, {}
        for span in SPANS:
            row = self.per_batch[span][name]
            mean, std = _mean_std(row[condition])
            ct, gap, gap_se = math.nan, math.nan, math.nan
            if "control" in row and "base" in row:
                gap, gap_se = paired_difference(row["control"], row["base"])
                if content_gap_is_clear(gap, gap_se, self.content_min_se):
                    ct = content_transferred(mean, _mean_std(row["control"])[0], _mean_std(row["base"])[0])
            stats[span], gaps[span] = (mean, std, ct), (gap, gap_se)
        return ConditionSummary(stats["all"][0], stats["all"][1], stats["first"][0], stats["first"][1],
                                stats["all"][2], stats["first"][2], *gaps["all"])

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics: ``{prefix}/nll/i->j/cond``, ``{prefix}/nll_first/...``, ``{prefix}/content/...``."""
        out = {}
        for path in self.paths:
            name = path_name(path)
            for cond in self.conditions_of(path):
                s = self.summary_for(path, cond)
                out[NllKey(*path, cond).curve(prefix)] = s.nll_mean
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
            row = {"source": path[0], "target": path[1], "trained": self.is_trained(path)}
            for cond in self.conditions_of(path):
                row[cond] = {k: clean(v) for k, v in asdict(self.summary_for(path, cond)).items()}
            paths[path_name(path)] = row
        return {"first_tokens": self.first_tokens, "batches": self.num_batches, "conditions": list(self.conditions),
                "content_min_se": self.content_min_se,
                "trained": None if self.trained is None else [list(p) for p in self.trained],
                "paths": paths, "per_batch": self.per_batch}

    @classmethod
    def from_dict(cls, d: Mapping) -> "EvalResult":
        """Read back :meth:`to_dict` (e.g. ``eval.json``)."""
        paths = [(r["source"], r["target"]) for r in d["paths"].values()]
        trained = None if d.get("trained") is None else [tuple(p) for p in d["trained"]]
        return cls(paths, list(d["conditions"]), int(d["first_tokens"]), d["per_batch"], trained,
                   float(d.get("content_min_se", 3.0)))

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
                cells = [path_name(path) + ("" if self.is_trained(path) else " (zero-shot)")]
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
                        cells.append(f"{ct:.2f}" if not math.isnan(ct)
                                     else f"n/a (gap {s.gap:.3f} ± {s.gap_se:.3f})" if span == "all" else "n/a")
                    else:
                        cells.append("—")
                parts.append("| " + " | ".join(cells) + " |")
            parts.append("")
        parts.append("Content transferred = (NLL_control − NLL) / (NLL_control − NLL_base): 0 is a wrong-content "
                     "cache, 1 the target's own cache. Control = the target's own cache of another sequence's prefix "
                     "(after the row's own first `sink_tokens` positions, which every condition but no-prefix keeps). "
                     f"n/a: base does not beat control by more than {self.content_min_se:g} standard errors of their "
                     "paired per-batch difference (the gap control − base ± its standard error is shown).")
        if self.trained is not None and any(not self.is_trained(p) for p in self.paths):
            parts.append(" (zero-shot): a path no training step used.")
        return "\n".join(parts) + "\n"
