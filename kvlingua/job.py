"""One Σ-training run, described once: what to train, on which data, with which models.

:class:`JobSpec` holds the settings a run YAML gives (data, lengths, spaces, loop,
evaluation); :class:`TrainJob` is a spec resolved against real checkpoints (model
directories, tokenizer, output directory) and is what crosses Ray as a dict. This
module also turns a job into batches (:func:`train_batches`, :func:`eval_batches`) and
fresh spaces (:func:`build_space`). :mod:`kvlingua.run` trains and evaluates a job
against any backend; every entry point (in process, Ray Train, Tune) calls it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterable, Iterator

import torch

from kvlingua.cache import ArchSummary
from kvlingua.data.tokenizer import load_tokenizer
from kvlingua.data.views import DataConfig, parallel_chunks, token_chunks
from kvlingua.evaluate import EvalConfig
from kvlingua.paths import PathSampler
from kvlingua.pool import main_space
from kvlingua.schedule import epoch_order
from kvlingua.space import SharedSpace
from kvlingua.train import Batch, TrainConfig
from kvlingua.translator import SpaceConfig


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
    batch_size: int = 16
    """Sequences per step (per Ray Train rank)."""
    spaces: dict[str, SpaceConfig] = field(default_factory=_default_spaces)
    """Named shared spaces to train with the same loop and data: the translator and baselines (linear)."""
    space_steps: dict[str, int] | None = None
    """Per-space override of ``train.steps`` (e.g. ``{linear: 900}``: an equal-wall-time baseline)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation settings."""
    eval_split: str = "validation"
    """Split used for held-out evaluation."""

    def __post_init__(self) -> None:
        if not self.spaces:
            raise ValueError("spaces: name at least one shared space to train")
        if self.prefix_len < 1 or self.suffix_len < 2:
            raise ValueError(f"prefix_len must be >= 1 and suffix_len >= 2, got {self.prefix_len} and {self.suffix_len}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (the content control rolls the batch)")
        if self.eval_split not in ("train", "validation", "test"):
            raise ValueError(f"eval_split must be train, validation or test, got {self.eval_split!r}")
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
    def seq_len(self) -> int:
        return self.prefix_len + self.suffix_len

    @property
    def main_space(self) -> str:
        """The space the run is about (its pool is ``<out_dir>/pool``): ``translator`` if trained, else the first."""
        return main_space(self.spaces)


@dataclass(frozen=True, kw_only=True)
class TrainJob(JobSpec):
    """A :class:`JobSpec` resolved against real checkpoints. Crosses Ray as ``to_dict``/``from_dict``."""

    name: str
    """Run name (MLflow run name, pool name)."""
    models: dict[str, str]
    """Pool member name -> local checkpoint directory, in pool order."""
    tokenizer: str
    """Directory of the pool's shared tokenizer."""
    out_dir: str
    """Run directory: checkpoints, evaluation, plots and the trained pool land here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ValueError("models: a pool needs at least one model")
        check_langs(self.langs, self.models)

    @classmethod
    def from_spec(cls, spec: JobSpec, *, name: str, models: dict[str, str], tokenizer: str, out_dir: str) -> "TrainJob":
        """The job of ``spec`` (or any subclass of it, e.g. a run config) over these models."""
        settings = {f.name: getattr(spec, f.name) for f in fields(JobSpec)}
        return cls(name=name, models=models, tokenizer=tokenizer, out_dir=out_dir, **settings)

    @property
    def names(self) -> list[str]:
        return list(self.models)


def load_chunks(job: TrainJob, split: str) -> dict[str, torch.Tensor]:
    """Token chunks per model, each ``[N, P+S]``; row n is the same passage for every model."""
    tok = load_tokenizer(job.tokenizer)
    if job.langs is None:
        ids = token_chunks(job.data, tok, split, job.seq_len)  # [N, P+S]
        return {name: ids for name in job.models}
    langs = sorted(set(job.langs.values()))
    per_lang = parallel_chunks(job.data, tok, split, job.seq_len, langs)  # lang -> [N, P+S]
    return {name: per_lang[job.langs[name]] for name in job.models}


def _rows_to_batches(chunks: dict[str, torch.Tensor], rows: torch.Tensor, job: TrainJob, key: str) -> list[Batch]:
    """Cut ``rows`` into full batches of ``job.batch_size`` (remainder dropped)."""
    n = len(rows) // job.batch_size
    if n == 0:
        raise ValueError(
            f"{key}: {len(rows)} sequences of {job.seq_len} tokens are fewer than one batch of {job.batch_size}"
        )
    out = []
    for b in range(n):
        idx = rows[b * job.batch_size : (b + 1) * job.batch_size]
        out.append(Batch({m: c[idx] for m, c in chunks.items()}, job.prefix_len, key=f"{key}/b{b:05d}"))
    return out


def train_batches(job: TrainJob, *, rank: int = 0, world_size: int = 1, split: str = "train") -> Iterator[Batch]:
    """Endless training batches for one rank.

    Rows are sharded by rank (row r goes to rank ``r % world_size``). Each rank's
    batches are formed once from a seeded permutation, so a batch's composition
    recurs every epoch (its source blocks can be reused from a block store); only the
    order of batches is reshuffled each epoch (:func:`kvlingua.schedule.epoch_order`).
    """
    chunks = load_chunks(job, split)
    n = next(iter(chunks.values())).shape[0]
    g = torch.Generator().manual_seed(job.train.seed)
    rows = torch.randperm(n, generator=g)
    rows = rows[rows % world_size == rank]
    key = f"{split}/P{job.prefix_len}S{job.suffix_len}/bs{job.batch_size}/w{world_size}r{rank}"
    batches = _rows_to_batches(chunks, rows, job, key)
    epoch = 0
    while True:
        for i in epoch_order(len(batches), job.train.seed, epoch).tolist():
            yield batches[i]
        epoch += 1


EVAL_ROW_SEED = 0
"""Seed of the fixed permutation that picks the held-out rows (independent of the train seed)."""


def eval_batches(job: TrainJob) -> list[Batch]:
    """``job.eval.batches`` held-out batches, the same for every run of the job.

    Rows are drawn by a fixed permutation of the whole split rather than taken in
    order: consecutive rows of the packed stream are neighbouring passages of one
    chapter, so the content control (each row read after the batch's *previous*
    row's prefix, see :func:`kvlingua.evaluate.evaluate`) would read related text.
    Spread over the split, the control's prefix is an unrelated passage.
    """
    chunks = load_chunks(job, job.eval_split)
    n = next(iter(chunks.values())).shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_ROW_SEED))  # [n]
    rows = perm[: job.eval.batches * job.batch_size]
    return _rows_to_batches(chunks, rows, job, f"{job.eval_split}/P{job.prefix_len}S{job.suffix_len}/bs{job.batch_size}/spread")


def build_space(job: TrainJob, name: str, summaries: dict[str, ArchSummary]) -> SharedSpace:
    """A fresh shared space ``name`` of the job over its models (pool order), seeded by the train seed."""
    torch.manual_seed(job.train.seed)
    return SharedSpace({m: summaries[m] for m in job.models}, job.spaces[name])


def allowed_paths(job: TrainJob) -> list[tuple[str, str]]:
    """All (source, target) paths the job trains and evaluates."""
    return PathSampler(job.names, None, job.train.seed, job.train.paths, job.train.trainable).allowed
