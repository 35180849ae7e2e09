"""What a Σ training run is set to and where it stands: :class:`TrainConfig` (the ``train`` section of a run
config), :class:`TrainState` (what a checkpoint holds besides the adapter weights) and the optimiser that
:func:`kvlingua.train.fit` steps (AdamW over the trainable adapters, with the shared warm-up + cosine schedule of
:func:`kvlingua.schedule.warmup_cosine`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvlingua.schedule import warmup_cosine

PRECISIONS = ("fp32", "bf16")
OBJECTIVES = ("suffix", "kl")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of Σ training (the ``train`` section of a run config)."""

    steps: int
    """Optimiser steps in total (the schedule spans them)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_frac: float = 0.05
    """Fraction of ``steps`` of linear warm-up from 0; cosine decay to 0 afterwards."""
    grad_clip: float = 1.0
    """Maximum global gradient norm of the trainable adapters."""
    paths_per_step: int | None = None
    """Paths i->j sampled per step; None trains every allowed path every step."""
    recon_weight: float = 0.0
    """Weight of the reconstruction loss ||OUT_j(IN_i(KV_i)) - KV_j||² (paper default: off)."""
    objective: str = "suffix"
    """What a path's target learns from its suffix: ``suffix``, the cross-entropy of the suffix tokens (the
    paper's), or ``kl``, the mean over suffix tokens of KL(target after its own cache of its own prefix ‖ target
    after the translated cache): the *base* condition as teacher (:func:`kvlingua.losses.suffix_kl_loss`).
    ``recon_weight`` adds to either."""
    stack_lr_scale: float = 1.0
    """The translator stack's learning rate as a multiple of ``lr``; the short path (the linear map a closed-form
    start sets to the pool's optimum) keeps ``lr``. 1: one rate for every parameter."""
    precision: str = "fp32"
    """fp32, or bf16 autocast of the adapters (frozen models keep their own dtype)."""
    eval_every: int = 0
    """Call ``eval_fn`` every this many steps (and at the start and the end); 0: never."""
    checkpoint_every: int = 50
    """Checkpoint every this many steps and at the end (``checkpoint_fn``): in process into
    ``<run>/checkpoints``, on Ray through Ray Train; 0: never."""
    log_every: int = 10
    """Record training metrics every this many steps (and at the last step); 0: last step only."""
    seed: int = 0
    """Seed of the path sampler."""
    keep_best: bool = True
    """End with the adapters of the best curve evaluation (mean held-out NLL over paths, validation split), so
    training never ends below its own start; needs ``eval_every``."""
    trainable: tuple[str, ...] | None = None
    """Models whose IN/OUT adapters train; the others stay frozen (extending a pool). None: all."""
    paths: tuple[tuple[str, str], ...] | None = None
    """Allowed (source, target) paths; None: all N² (cyclic included)."""

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, zero_ok: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
                raise ValueError(f"{name} must be an integer >= {0 if zero_ok else 1}, got {value!r}")

        positive_int("steps", self.steps)
        for name in ("eval_every", "checkpoint_every", "log_every"):
            positive_int(name, getattr(self, name), zero_ok=True)
        if self.paths_per_step is not None:
            positive_int("paths_per_step", self.paths_per_step)
        for name in ("lr", "stack_lr_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.recon_weight < 0:
            raise ValueError(
                f"weight_decay and recon_weight must be >= 0, got {self.weight_decay}, {self.recon_weight}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.trainable is not None and not self.trainable:
            raise ValueError("trainable is empty; use None to train every model's adapters")
        if self.paths is not None:
            if not self.paths:
                raise ValueError("paths is empty; use None to allow all N² paths")
            bad = [p for p in self.paths if len(p) != 2]
            if bad:
                raise ValueError(f"each path is a (source, target) pair; got {bad}")


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint holds besides the adapter weights."""

    step: int = 0
    """Optimiser steps completed."""
    history: list[dict] = field(default_factory=list)
    """Records ``{"step", "kind": "train"|"eval", metric: value, ...}`` in order."""
    optimizer_state: dict | None = None
    """``AdamW.state_dict()`` at ``step`` (None before the first checkpoint)."""
    scheduler_state: dict | None = None
    """``LambdaLR.state_dict()`` at ``step``."""
    rng_state: Tensor | None = None
    """``torch.get_rng_state()`` at ``step`` (dropout in adapters resumes identically)."""
    train_s: float = 0.0
    """Wall seconds spent in ``fit`` so far, evaluations included, summed over resumes."""


def trainable_names(space: nn.Module, cfg: TrainConfig) -> list[str]:
    """Models whose adapters train under ``cfg`` (checked against the space's members)."""
    names = list(space.names)
    chosen = list(cfg.trainable) if cfg.trainable is not None else names
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise ValueError(f"trainable names model(s) {unknown} that are not in the space {names}")
    return chosen


def make_optimizer(space: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable models' adapters and its warm-up + cosine schedule."""
    names = trainable_names(space, cfg)
    params = space.parameters_of(names)
    if not params:
        raise ValueError("the trainable adapters have no parameters")
    groups: list = params
    if cfg.stack_lr_scale != 1.0:  # the short path at lr, the stack at lr * scale
        maps = [f for m in names for side in ("in", "out") for f in space.adapters(m)[side].short_maps()]
        short = {id(p) for f in maps for p in f.parameters()}
        groups = [{"params": [p for p in params if id(p) in short], "lr": cfg.lr},
                  {"params": [p for p in params if id(p) not in short], "lr": cfg.lr * cfg.stack_lr_scale}]
        groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return opt, warmup_cosine(opt, cfg.steps, cfg.warmup_frac)
