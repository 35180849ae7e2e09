"""The learning-rate schedule and the batch order that every training loop shares.

* :func:`lr_factor` (and :func:`warmup_cosine`, the same as a ``LambdaLR``): linear
  warm-up from 0 over ``round(warmup_frac * total)`` steps, then half a cosine from 1
  down to ``min_lr_ratio`` (0 unless given), reached at ``step == total`` (the shape
  of torchtune's ``get_cosine_schedule_with_warmup``). Σ training
  decays to 0; pool pre-training to ``min_lr_ratio = 0.1``.
* :func:`epoch_order`: the order in which epoch ``epoch`` of a run with seed ``seed``
  visits ``n`` items, a seeded permutation that is a pure function of
  ``(n, seed, epoch)``, so a resumed run visits exactly what an uninterrupted one would.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

EPOCH_SEED_STRIDE = 1000
"""The generator of epoch ``e`` under seed ``s`` is seeded ``s * EPOCH_SEED_STRIDE + e``: runs of
different seeds never share an epoch's order before epoch 1000."""


def _check(total: int, warmup_frac: float, min_lr_ratio: float) -> None:
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"total must be an integer >= 1, got {total!r}")
    if not 0 <= warmup_frac < 1:
        raise ValueError(f"warmup_frac must be in [0, 1), got {warmup_frac}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


def lr_factor(step: int, total: int, warmup_frac: float, *, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based).

    Linear 0 -> 1 over the first ``w = round(warmup_frac * total)`` steps (step ``s < w``
    gets ``s / w``), then a half cosine from 1 at step ``w`` to ``min_lr_ratio`` at step
    ``total`` (and after it).

    Args:
        step: optimiser steps taken before this one.
        total: optimiser steps of the whole run (the schedule spans them).
        warmup_frac: warm-up as a fraction of ``total``, in ``[0, 1)``.
        min_lr_ratio: where the cosine ends, as a fraction of the peak, in ``[0, 1]``.
    """
    _check(total, warmup_frac, min_lr_ratio)
    warmup = round(warmup_frac * total)
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total: int, warmup_frac: float, *,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` as a ``LambdaLR`` over ``optimizer`` (each group's ``lr`` is its peak).

    Call ``scheduler.step()`` after each ``optimizer.step()``; its ``state_dict()`` resumes it.
    """
    _check(total, warmup_frac, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup_frac, min_lr_ratio=min_lr_ratio))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """Order ``[n]`` (int64, a permutation of ``0..n-1``) in which epoch ``epoch`` visits ``n`` items.

    ``torch.randperm(n)`` under a generator seeded ``seed * EPOCH_SEED_STRIDE + epoch``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    gen = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(n, generator=gen)  # [n]
