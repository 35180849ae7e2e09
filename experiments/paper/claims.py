"""A claim of the paper as paired comparisons over held-out batches, and the verdict that follows.

Every condition and path of one comparison is scored on the same held-out batches of the test split
(:func:`kvlingua.job.eval_batches`); a comparison is a paired difference with its standard error and an
outcome under the ±2 SE rule of :mod:`experiments.toolkit.stats` (relations ``le``, ``ge``, ``within``
to a tolerance). A tolerance is ``tol`` nats, or ``tol_share`` of the (no-prefix − base) gap of the
same batches. A comparison that no prefix at all (or the control: the right positions, another
passage) would have passed too is no evidence of a claim that ``a`` reaches ``b`` (``le``, ``within``): its outcome is ``inconclusive`` and the report says
which reference passed. A claim is **reproduced** when every comparison holds, **not** reproduced
when every one fails, and **partly** otherwise. Only the numbers decide.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from experiments.toolkit.stats import FAILS, HOLDS, RELATIONS, UNSURE, gap_tolerance, mean, paired_outcome, would_pass
from kvlingua.eval_result import EvalResult
from kvlingua.metric_names import NllKey
from kvlingua.paths import path_name

FLOORS = ("no-prefix", "control")
"""Conditions that carry no content of the prefix: a comparison either would pass is no evidence."""
CHECK_KINDS = ("paths", "zero_shot", "groups", "steps")
PATH_SETS = ("all", "cyclic", "cross", "trained", "zero-shot")


@dataclass(frozen=True)
class Check:
    """One family of paired comparisons behind a claim."""

    kind: str
    """``paths``: condition ``a`` against ``b`` on every selected path of one evaluation;
    ``zero_shot``: ``a`` on each zero-shot path i->j against ``a`` averaged over the trained paths into j;
    ``groups``: the mean over paths of ``a`` in evaluation ``group_a`` against the same in ``group_b``;
    ``steps``: training steps until each path of ``paths`` first reaches its target's base on the curve
    (validation): the first path needs fewer steps than the second."""
    a: str = "translator"
    """Condition measured (a space name, ``identity``, ``base``, ...)."""
    b: str = "base"
    """Condition compared against (``paths`` only)."""
    relation: str = "le"
    """``le``, ``ge`` or ``within`` (see the module docstring)."""
    tol: float = 0.0
    """Tolerance in NLL per token (nats)."""
    tol_share: float | None = None
    """Tolerance as this share of the mean (no-prefix − base) gap of the compared path (``paths`` and
    ``zero_shot``); replaces ``tol`` where set."""
    paths: str | tuple[str, ...] = "all"
    """Selected paths: one of all, cyclic, cross, trained, zero-shot, or a list of ``i->j``."""
    group: str = "run"
    """Evaluation the comparison reads (``run`` for a train experiment; a group label for a sweep)."""
    group_a: str | None = None
    """``groups``: label of the evaluation of ``a`` (``best`` = the other groups' best on validation)."""
    group_b: str | None = None
    """``groups``: label of the evaluation compared against."""
    label: str = ""
    """What the comparison says, for the report."""

    def __post_init__(self) -> None:
        if self.kind not in CHECK_KINDS:
            raise ValueError(f"kind must be one of {list(CHECK_KINDS)}, got {self.kind!r}")
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {list(RELATIONS)}, got {self.relation!r}")
        if isinstance(self.paths, str) and self.paths not in PATH_SETS:
            raise ValueError(f"paths must be one of {list(PATH_SETS)} or a list of i->j, got {self.paths!r}")
        if self.kind == "groups" and (self.group_a is None or self.group_b is None):
            raise ValueError("a groups check names group_a and group_b")
        if self.tol_share is not None and (self.kind not in ("paths", "zero_shot") or not 0 <= self.tol_share <= 1):
            raise ValueError("tol_share (a share of the no-prefix − base gap, within 0..1) is for paths and "
                             "zero_shot checks")
        if self.kind == "steps" and (isinstance(self.paths, str) or len(self.paths) != 2):
            raise ValueError("a steps check names exactly two paths (the one expected to need fewer steps first)")


@dataclass(frozen=True)
class Comparison:
    """One paired comparison and its outcome."""

    what: str
    """E.g. ``seed0->seed1: translator vs base``."""
    a: float
    """Mean of the measured side (NLL, or steps for ``steps``)."""
    b: float
    """Mean of the reference side."""
    diff: float
    """Mean paired difference a − b."""
    se: float
    """Its standard error over held-out batches (NaN for ``steps``)."""
    outcome: str
    """holds, fails or inconclusive (a comparison a floor passes too is inconclusive)."""
    tol: float = math.nan
    """The tolerance applied, in nats (NaN for ``steps``)."""
    floors: dict[str, bool] = field(default_factory=dict)
    """Floor condition (:data:`FLOORS`, where measured) -> whether it would have passed in place of ``a``."""


def verdict(comparisons: Sequence[Comparison]) -> str:
    """``reproduced`` (all hold), ``not reproduced`` (all fail) or ``partly``; ``no data`` without comparisons."""
    if not comparisons:
        return "no data"
    outcomes = {c.outcome for c in comparisons}
    return "reproduced" if outcomes == {HOLDS} else "not reproduced" if outcomes == {FAILS} else "partly"


def select_paths(result: EvalResult, which: str | Sequence[str]) -> list[tuple[str, str]]:
    """The paths of ``result`` a check names (a set name or a list of ``i->j``)."""
    if not isinstance(which, str):
        by_name = {path_name(p): p for p in result.paths}
        missing = [w for w in which if w not in by_name]
        if missing:
            raise KeyError(f"paths {missing} were not evaluated; evaluated: {list(by_name)}")
        return [by_name[w] for w in which]
    keep = {"all": lambda p: True, "cyclic": lambda p: p[0] == p[1], "cross": lambda p: p[0] != p[1],
            "trained": result.is_trained, "zero-shot": lambda p: not result.is_trained(p)}[which]
    return [p for p in result.paths if keep(p)]


def _series(result: EvalResult, path, cond: str) -> list[float]:
    return list(result.per_batch["all"][path_name(path)][cond])


def mean_over_paths(result: EvalResult, cond: str) -> list[float]:
    """Per-batch NLL of ``cond`` averaged over every path that measured it."""
    rows = [_series(result, p, cond) for p in result.paths if cond in result.conditions_of(p)]
    return [sum(col) / len(col) for col in zip(*rows)]


def _compare(what: str, a: Sequence[float], b: Sequence[float], check: Check,
             result: EvalResult | None = None, path=None) -> Comparison:
    """``a`` against ``b``; with ``result`` and ``path``, the tolerance from the path's gap (``tol_share``) and
    whether each floor of that path, in place of ``a``, would have passed."""
    have = result.conditions_of(path) if result is not None else ()
    tol = check.tol
    if check.tol_share is not None:
        if not {"no-prefix", "base"} <= set(have):
            raise KeyError(f"check {check.label!r}: tol_share needs no-prefix and base on {path_name(path)}")
        tol = gap_tolerance(check.tol_share, _series(result, path, "no-prefix"), _series(result, path, "base"))
    diff, se, oc = paired_outcome(a, b, check.relation, tol)
    floors = {f: would_pass(_series(result, path, f), b, check.relation, tol)  # only "reaches b" claims
              for f in FLOORS if f in have and f not in (check.a, check.b) and check.relation != "ge"}
    if oc == HOLDS and any(floors.values()):
        oc = UNSURE
    return Comparison(what, mean(a), mean(b), diff, se, oc, tol, floors)


def first_step_at_base(history: Sequence[Mapping], path: str) -> float:
    """First curve step at which ``path``'s NLL is at or below its target's base (inf if never)."""
    space, base = NllKey.of_path(path).curve(), NllKey.of_path(path, "base").curve()
    for rec in sorted((r for r in history if space in r), key=lambda r: r["step"]):
        if rec[space] <= rec[base]:
            return float(rec["step"])
    return math.inf


def run_check(check: Check, evals: Mapping[str, EvalResult], histories: Mapping[str, Sequence[Mapping]] | None = None,
              best_of: Mapping[str, str] | None = None) -> list[Comparison]:
    """The comparisons of ``check`` on an experiment's evaluations (label -> result).

    ``best_of`` maps the label ``best`` to the group chosen on validation (sweeps).
    """
    if check.kind == "groups":
        ga = (best_of or {}).get(check.group_a, check.group_a)
        missing = [g for g in (ga, check.group_b) if g not in evals]
        if missing:
            raise KeyError(f"check {check.label!r} compares groups {missing} that the experiment did not run; "
                           f"it ran {sorted(evals)}")
        a, b = mean_over_paths(evals[ga], check.a), mean_over_paths(evals[check.group_b], check.a)
        return [_compare(f"{check.a}, mean over paths: {ga} vs {check.group_b}", a, b, check)]
    if check.kind == "steps":
        hist = (histories or {})[check.group]
        first, second = (first_step_at_base(hist, p) for p in check.paths)
        if math.isinf(first) and math.isinf(second):
            oc = UNSURE
        else:
            oc = HOLDS if first < second else FAILS if first > second else UNSURE
        diff = first - second if not (math.isinf(first) or math.isinf(second)) else (-math.inf if math.isinf(second) else math.inf)
        return [Comparison(f"steps to reach base: {check.paths[0]} vs {check.paths[1]}", first, second, diff,
                           math.nan, oc)]
    result = evals[check.group]
    out = []
    if check.kind == "zero_shot":
        for p in select_paths(result, "zero-shot"):
            trained = [q for q in result.paths if q[1] == p[1] and result.is_trained(q)]
            if not trained:
                continue
            ref = [sum(col) / len(col) for col in zip(*(_series(result, q, check.a) for q in trained))]
            out.append(_compare(f"{path_name(p)} (zero-shot) vs trained paths into {p[1]}",
                                _series(result, p, check.a), ref, check, result, p))
        return out
    for p in select_paths(result, check.paths):
        have = result.conditions_of(p)
        if check.a in have and check.b in have:
            out.append(_compare(f"{path_name(p)}: {check.a} vs {check.b}", _series(result, p, check.a),
                                _series(result, p, check.b), check, result, p))
    return out
