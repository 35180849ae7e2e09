"""One experiment of the paper per YAML file (``configs/paper/<section>.yaml``).

An experiment names the paper's section and figure, the claim it tests, the run config
it trains (a :class:`workers.run_config.RunConfig` as a mapping, written out beside its
results), for §7.2/§7.3 the Ray Tune sweep over it, the overrides of its ``--smoke``
version, its claim checks (:class:`experiments.paper.claims.Check`) and its estimated wall
time on 2 cores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvlingua.config import load_config
from experiments.paper.claims import Check

KINDS = ("train", "sweep")


@dataclass(frozen=True)
class PaperExperiment:
    """One experiment of the paper, reproduced at this machine's scale."""

    section: str
    """The paper's section (``4.1``, ..., ``7.3``): the file name, ``--only`` and the results folder."""
    title: str
    """What the experiment is."""
    figure: str
    """The paper's figure or table it reproduces (``Fig. 3a``)."""
    claim: str
    """The paper's claim in one sentence."""
    paper: str
    """The paper's own numbers or reading of its figure, quoted for the report."""
    run: dict[str, Any]
    """The run config (``workers.run_config.RunConfig`` fields); ``pool`` is relative to the experiment file;
    ``start_from: {section: X}`` extends the pool another experiment trained."""
    checks: tuple[Check, ...]
    """The claim as paired comparisons; the verdict follows from them."""
    kind: str = "train"
    """``train`` (one Ray Train run) or ``sweep`` (a Ray Tune sweep over ``run``)."""
    sweep: dict[str, Any] | None = None
    """For ``kind: sweep``: ``tune_spaces.sweep_config.SweepConfig`` fields besides name/base (space, space_overrides,
    base_overrides, ...); ``group_by`` names the swept key whose values the claim compares."""
    group_by: str | None = None
    """For sweeps: the dotted run key whose values are the groups (``train.paths_per_step``); the other grid
    axes (lr) are selected per group on the validation curve, as the paper takes the best of a sweep."""
    smoke: dict[str, Any] = field(default_factory=dict)
    """Dotted overrides of ``run`` for ``kvlingua paper --smoke`` (tiny pool, few steps)."""
    smoke_sweep: dict[str, Any] = field(default_factory=dict)
    """Overrides of ``sweep`` for the smoke version (e.g. a smaller lr grid)."""
    estimate_min: float = 0.0
    """Estimated wall minutes on 2 cores (pool pre-training excluded when it is shared; see the file comment)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {self.kind!r}")
        if (self.kind == "sweep") != (self.sweep is not None) or (self.kind == "sweep") != (self.group_by is not None):
            raise ValueError("a sweep experiment needs `sweep` and `group_by`; a train experiment has neither")
        if not self.checks:
            raise ValueError("checks: a claim needs at least one comparison")
        if not 0 <= self.estimate_min <= 45:
            raise ValueError(f"estimate_min must be within 0..45 minutes (each experiment fits 45 minutes), "
                             f"got {self.estimate_min}")


def load_experiments(directory: str | Path) -> dict[str, PaperExperiment]:
    """Every ``<section>.yaml`` of ``directory``, keyed and ordered by section (4.1 < 4.2 < ... < 7.3)."""
    files = sorted(Path(directory).glob("*.yaml"), key=lambda p: tuple(int(x) for x in p.stem.split(".")))
    out = {}
    for f in files:
        exp = load_config(PaperExperiment, f)
        if exp.section != f.stem:
            raise ValueError(f"{f}: section {exp.section!r} must equal the file name {f.stem!r}")
        out[exp.section] = exp
    return out


def window_hidden(prefix_len: int, suffix_len: int, window: int | None) -> float:
    """Share of (suffix token, prefix token) pairs a sliding-window layer of ``window`` tokens hides.

    Suffix position ``t`` (``P <= t < P+S``) sees key position ``k`` when ``k > t - window``
    (the transformers sliding mask); 0 when every suffix token sees the whole prefix.
    """
    if window is None:
        return 0.0
    hidden = sum(max(0, min(prefix_len, t - window + 1)) for t in range(prefix_len, prefix_len + suffix_len))
    return hidden / (prefix_len * suffix_len)
