"""Where a training loop runs: one object instead of rank flags threaded through every call.

A :class:`Runtime` carries the rank, the world size, the gradient all-reduce of a
distributed run and a *rank-aware* tracker and progress flag: on rank 0 they are the
run's own, on every other rank a :class:`~kvlingua.tracking.NullTracker` and no bar.
:func:`kvlingua.train.fit` therefore logs unconditionally and never asks which rank it
is on (the way torchtune's loggers write only on rank 0 and litgpt's ``fit`` calls
``fabric.log_dict`` unconditionally). The in-process run is ``Runtime()``; a Ray Train
rank builds its runtime with :meth:`Runtime.for_rank`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from kvlingua.tracking import NullTracker, Tracker, space_tracker

GradSync = Callable[[list[nn.Parameter]], None]
"""Averages the gradients of the given parameters over the ranks, in place (a Ray Train rank: one flat
``torch.distributed`` all-reduce, then a division by the world size: :func:`workers.train_worker.allreduce_mean`)."""


@dataclass(frozen=True)
class Runtime:
    """Rank, world size, gradient sync, and what this rank reports to (tracker, progress bar)."""

    rank: int = 0
    """This process's rank among the training ranks."""
    world_size: int = 1
    """Number of training ranks; each reads its own shard of the batches."""
    grad_sync: GradSync | None = None
    """Averages the trainable adapters' gradients over the ranks after backward; None on a single rank."""
    tracker: Tracker = field(default_factory=NullTracker)
    """Where this rank's metrics go (a do-nothing tracker on ranks other than 0)."""
    progress: bool = True
    """Whether this rank shows a progress bar (only rank 0 ever does)."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {self.rank} of {self.world_size}")

    @classmethod
    def for_rank(cls, rank: int, world_size: int, tracker: Tracker, grad_sync: GradSync | None,
                 progress: bool = True) -> "Runtime":
        """The runtime of one rank of a distributed run: ``tracker`` and the bar on rank 0 only, and
        ``grad_sync`` only when there is more than one rank."""
        main = rank == 0
        return cls(rank=rank, world_size=world_size, grad_sync=grad_sync if world_size > 1 else None,
                   tracker=tracker if main else NullTracker(), progress=progress and main)

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that evaluates, writes the results and reports."""
        return self.rank == 0

    def for_space(self, space: str, main: str) -> "Runtime":
        """This runtime with metrics of ``space`` prefixed unless it is the run's ``main`` space."""
        return replace(self, tracker=space_tracker(self.tracker, space, main))
