"""What a Σ-training run trains and on which data, as a run YAML gives it: :class:`JobSpec` and its checks.

:class:`kvlingua.job.TrainJob` resolves a spec against real checkpoints; ``workers.run_config.RunConfig`` adds where
the models come from, Ray placement and tracking. Both inherit these fields and their checks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

from kvlingua.data.views import DataConfig
from kvlingua.evaluate import EvalConfig
from kvlingua.rundir import main_space
from kvlingua.space_config import SpaceConfig
from kvlingua.train_config import TrainConfig


def _default_spaces() -> dict[str, SpaceConfig]:
    return {"translator": SpaceConfig(), "linear": SpaceConfig(adapter="linear")}


def check_langs(langs: dict[str, str] | None, models: Iterable[str]) -> None:
    """With parallel text (``langs``), every model needs a language."""
    if langs is not None:
        missing = sorted(set(models) - set(langs))
        if missing:
            raise ValueError(f"langs: no language given for model(s) {missing}")


def check_space_fits(spaces: dict[str, SpaceConfig], layers: dict[str, int]) -> None:
    """Σ's width Q must be divisible by every member's layer count (``layers``: name -> L)."""
    for space_name, cfg in spaces.items():
        if cfg.q_dim == "auto":
            continue  # resolved against the layer counts: fits by construction
        bad = {m: L for m, L in layers.items() if cfg.q_dim % L}
        if bad:
            raise ValueError(f"spaces.{space_name}.q_dim={cfg.q_dim} is not divisible by the layer count of "
                             f"{', '.join(f'{m} (L={L})' for m, L in bad.items())}")


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a Σ-training run trains and on which data: the settings a run YAML gives.

    :class:`TrainJob` adds the resolved models; ``workers.run_config.RunConfig`` adds where the
    models come from, Ray placement and tracking. Both inherit these fields and their checks.
    """

    train: TrainConfig
    """Loop settings (steps, lr, paths per step, ...), shared by every space of the job."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and view the prefix/suffix chunks come from."""
    langs: dict[str, str] | None = None
    """Parallel text: model -> language of its own text (e.g. experts); None = one monolingual/mixed stream."""
    prefix_len: int = 64
    """P: prefix tokens the source model reads."""
    suffix_len: int = 64
    """S: suffix tokens the target model continues with."""
    min_prefix_len: int | None = None
    """Train on a range of prefix lengths: each training batch reads a prefix of P_b tokens, P_b drawn
    uniformly from ``[min_prefix_len, prefix_len]`` once per batch (seeded; the batch keeps its P_b every
    epoch), as the last P_b tokens of its P-token prefix, so the suffix is the same text at positions
    P_b..P_b+S-1. None = every batch reads ``prefix_len``. The pool records the range it was trained on
    (``trained_prefix_len``) and serving falls back to text past its top. Held-out batches read ``prefix_len``."""
    batch_size: int = 16
    """Sequences per step (per Ray Train rank)."""
    spaces: dict[str, SpaceConfig] = field(default_factory=_default_spaces)
    """Named shared spaces to train with the same loop and data: the translator and baselines (linear). The first
    is the run's main space (:attr:`main_space`)."""
    space_steps: dict[str, int] | None = None
    """Per-space override of ``train.steps`` (e.g. ``{linear: 900}``: an equal-wall-time baseline)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation settings (the curves use ``eval.curve_split``)."""
    eval_split: str = "test"
    """Split of the final evaluation table, the numbers a run reports; curves, early stopping and
    trial selection use ``eval.curve_split`` (validation) instead."""
    start_from: str | None = None
    """A trained pool directory (``<run>/pool``) to extend (paper §5): its space and adapters are loaded and
    frozen, every job model it lacks joins with fresh adapters (:meth:`SharedSpace.add_member`), and only
    ``train.trainable`` (which must name only new members) trains, on ``train.paths``. Needs exactly one space,
    configured as the pool's. The final table evaluates all N² paths, each marked trained (by this run or by
    the pool's) or zero-shot."""

    def __post_init__(self) -> None:
        if not self.spaces:
            raise ValueError("spaces: name at least one shared space to train")
        if self.prefix_len < 1 or self.suffix_len < 2:
            raise ValueError(f"prefix_len must be >= 1 and suffix_len >= 2, got {self.prefix_len} and {self.suffix_len}")
        if self.min_prefix_len is not None and not 1 <= self.min_prefix_len <= self.prefix_len:
            raise ValueError(f"min_prefix_len must be within 1..prefix_len ({self.prefix_len}), got {self.min_prefix_len}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (the content control rolls the batch)")
        for name, cfg in self.spaces.items():
            try:
                cfg.check_init()
            except ValueError as e:
                raise ValueError(f"spaces.{name}: {e}") from None
        sinks = {cfg.sink_tokens for cfg in self.spaces.values()}
        if len(sinks) > 1:
            raise ValueError(f"spaces of one job must keep the same sink_tokens (their control is the same); got "
                             f"{ {n: c.sink_tokens for n, c in self.spaces.items()} }")
        if (self.min_prefix_len or self.prefix_len) <= max(sinks):
            raise ValueError(f"prefix lengths from {self.min_prefix_len or self.prefix_len} leave nothing for Σ after "
                             f"the target's {max(sinks)} sink position(s); raise (min_)prefix_len or lower sink_tokens")
        if self.eval_split not in ("train", "validation", "test"):
            raise ValueError(f"eval_split must be train, validation or test, got {self.eval_split!r}")
        if self.start_from is not None:
            if len(self.spaces) != 1:
                raise ValueError(f"start_from extends one trained space; name exactly one space, got {sorted(self.spaces)}")
            if self.train.trainable is None:
                raise ValueError("start_from: set train.trainable to the new member(s); the pool's adapters stay frozen")
        for name, steps in (self.space_steps or {}).items():
            if name not in self.spaces:
                raise ValueError(f"space_steps: {name!r} is not one of the spaces {sorted(self.spaces)}")
            if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                raise ValueError(f"space_steps.{name} must be a positive integer, got {steps!r}")

    def train_for(self, space: str) -> TrainConfig:
        """The loop settings of ``space``: ``train`` with its ``space_steps``."""
        steps = (self.space_steps or {}).get(space)
        return self.train if steps is None else replace(self.train, steps=steps)

    @property
    def max_steps(self) -> int:
        """Steps of the longest-training space (batches a run may draw)."""
        return max(self.train_for(name).steps for name in self.spaces)

    @property
    def trained_prefix_len(self) -> tuple[int, int]:
        """``(min, max)`` prefix lengths the training batches read."""
        return (self.min_prefix_len or self.prefix_len, self.prefix_len)

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def eval_batch_size(self) -> int:
        """Rows per held-out batch: ``eval.batch_size``, else the training ``batch_size``."""
        return self.eval.batch_size or self.batch_size

    @property
    def main_space(self) -> str:
        """The space the run is about: the first of ``spaces`` (its pool is ``<out_dir>/pool``; the curves Tune
        selects on and the reports' headline are its)."""
        return main_space(self.spaces)
