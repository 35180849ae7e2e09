"""Paired statistics and the outcome rule of every verdict in a generated report.

Every condition of one comparison is scored on the same held-out batches, so ``a`` against ``b`` is the
mean per-batch difference ``d = a − b`` and its standard error ``se``
(:func:`kvlingua.eval_result.paired_difference`). A comparison states a relation to a tolerance ``tol``
(NLL per token, nats):

* ``le`` (``a`` reaches or beats ``b``): holds when ``d + 2·se <= tol``, fails when ``d − 2·se > tol``;
* ``ge`` (``a`` is worse than ``b`` by at least ``tol``): holds when ``d − 2·se >= tol``, fails when ``d + 2·se < tol``;
* ``within`` (``|d| <= tol``): holds when ``|d| + 2·se <= tol``, fails when ``|d| − 2·se > tol``;

anything else is inconclusive. A tolerance that says "close to base" is only as strict as the gap a prefix
can close: :func:`gap_tolerance` takes it as a share of the (no-prefix − base) gap, and
:func:`would_pass` asks whether a condition that carries nothing (no prefix, or the control) would have
passed the same comparison.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from kvlingua.eval_result import paired_difference

HOLDS, FAILS, UNSURE = "holds", "fails", "inconclusive"
RELATIONS = ("le", "ge", "within")

__all__ = ["FAILS", "HOLDS", "RELATIONS", "UNSURE", "gap_tolerance", "mean", "outcome", "paired_difference",
           "paired_outcome", "would_pass"]


def outcome(diff: float, se: float, relation: str, tol: float) -> str:
    """holds / fails / inconclusive for ``diff ± se`` under ``relation`` and ``tol`` (module docstring); a NaN
    difference is inconclusive, a NaN standard error counts as 0."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {list(RELATIONS)}, got {relation!r}")
    if math.isnan(diff):
        return UNSURE
    se = 0.0 if math.isnan(se) else se
    if relation == "le":
        return HOLDS if diff + 2 * se <= tol else FAILS if diff - 2 * se > tol else UNSURE
    if relation == "ge":
        return HOLDS if diff - 2 * se >= tol else FAILS if diff + 2 * se < tol else UNSURE
    return HOLDS if abs(diff) + 2 * se <= tol else FAILS if abs(diff) - 2 * se > tol else UNSURE


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def paired_outcome(a: Sequence[float], b: Sequence[float], relation: str, tol: float) -> tuple[float, float, str]:
    """``(mean a − b, its standard error, outcome)`` of two per-batch series of the same batches."""
    diff, se = paired_difference(a, b)
    return diff, se, outcome(diff, se, relation, tol)


def gap_tolerance(share: float, no_prefix: Sequence[float], base: Sequence[float]) -> float:
    """``share`` of the mean (no-prefix − base) gap over the same batches, in nats (0 when there is no gap):
    a tolerance that no prefix at all can meet unless ``share >= 1``."""
    if not 0 <= share <= 1:
        raise ValueError(f"a tolerance share is within 0..1, got {share}")
    return max(0.0, share * (mean(no_prefix) - mean(base)))


def would_pass(reference: Sequence[float], b: Sequence[float], relation: str, tol: float) -> bool:
    """Whether ``reference`` (no prefix, or the control) in place of the measured condition would have held."""
    return paired_outcome(reference, b, relation, tol)[2] == HOLDS
