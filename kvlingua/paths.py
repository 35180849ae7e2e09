"""Which translation paths i->j a training step uses.

A pool of N models has N² paths (source, target), cyclic paths i->i included. Each
step of :func:`kvlingua.train.fit` trains on ``paths_per_step`` of the *allowed*
paths: all N² by default, a given subset (e.g. only paths into a new model), and,
when only some models are trainable (extending a pool), only paths that touch a
trainable model (a path between two frozen models has no parameter to train).

Sampling is deterministic in ``(seed, step)`` and balanced: the allowed paths are
laid out as a stream of seeded permutations (one per "epoch" over the paths) and
step ``s`` takes the first ``paths_per_step`` distinct paths of the stream from
position ``s * paths_per_step`` on. Every path is visited once per epoch of ``n / k``
steps (so at least once in any ``ceil(2n / k) + 1`` consecutive steps), and a resumed
run samples exactly what an uninterrupted one would.
"""
from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

PathT = tuple[str, str]
"""A translation path ``(source model, target model)``."""


def path_name(path: PathT) -> str:
    """``("a", "b") -> "a->b"``: the key of a path in metrics, tables and plots."""
    return f"{path[0]}->{path[1]}"


class PathSampler:
    """Seeded choice of the paths each training step trains on.

    Args:
        names: pool model names, in pool order.
        paths_per_step: paths per step; ``None`` (or at least the number of allowed
            paths) means every allowed path every step.
        seed: sampling seed.
        paths: allowed ``(source, target)`` pairs; ``None`` means all N² pairs.
        trainable: models whose adapters train; ``None`` means all. Paths between two
            frozen models are dropped.
    """

    def __init__(
        self,
        names: Sequence[str],
        paths_per_step: int | None = None,
        seed: int = 0,
        paths: Iterable[Sequence[str]] | None = None,
        trainable: Iterable[str] | None = None,
    ):
        names = list(names)
        if not names:
            raise ValueError("PathSampler needs at least one model name")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in {names}")
        known = set(names)
        if paths is None:
            allowed = [(i, j) for i in names for j in names]
        else:
            allowed = []
            for p in paths:
                p = tuple(p)
                if len(p) != 2:
                    raise ValueError(f"a path is a (source, target) pair, got {p!r}")
                unknown = [m for m in p if m not in known]
                if unknown:
                    raise ValueError(f"path {p[0]}->{p[1]} names unknown model(s) {unknown}; pool has {names}")
                if p not in allowed:
                    allowed.append(p)
            if not allowed:
                raise ValueError("the list of allowed paths is empty")
        if trainable is not None:
            trainable = list(trainable)
            unknown = [m for m in trainable if m not in known]
            if unknown:
                raise ValueError(f"trainable names unknown model(s) {unknown}; pool has {names}")
            if not trainable:
                raise ValueError("trainable is empty: no adapter would train")
            allowed = [p for p in allowed if p[0] in trainable or p[1] in trainable]
            if not allowed:
                raise ValueError(f"no allowed path touches a trainable model {trainable}")
        if paths_per_step is not None and (isinstance(paths_per_step, bool) or not isinstance(paths_per_step, int)
                                           or paths_per_step < 1):
            raise ValueError(f"paths_per_step must be a positive integer or None, got {paths_per_step!r}")
        self.names = names
        self.paths_per_step = paths_per_step
        self.seed = seed
        self._allowed = allowed

    @property
    def allowed(self) -> list[PathT]:
        """Every path a step may train on, in pool order."""
        return list(self._allowed)

    def _epoch(self, epoch: int) -> list[PathT]:
        order = list(self._allowed)
        random.Random(f"kvlingua-paths:{self.seed}:{epoch}").shuffle(order)
        return order

    def sample(self, step: int) -> list[PathT]:
        """The paths of training step ``step`` (deterministic in ``(seed, step)``)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n, k = len(self._allowed), self.paths_per_step
        if k is None or k >= n:
            return list(self._allowed)
        pos = step * k
        epoch, offset = divmod(pos, n)
        chosen: list[PathT] = []
        while len(chosen) < k:
            for p in self._epoch(epoch)[offset:]:
                if p not in chosen:
                    chosen.append(p)
                    if len(chosen) == k:
                        break
            epoch, offset = epoch + 1, 0
        return chosen
