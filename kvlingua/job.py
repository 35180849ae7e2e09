"""One Σ-training run, described once and executed by any backend.

A :class:`TrainJob` names the frozen models, the data, the shared spaces to train
(the translator and, as a baseline, a linear space), the loop settings and where
results go. :func:`run_local` executes it in this process; ``workers.driver``
executes the same job on Ray with model-host actors and Ray Train workers, using
the same :func:`train_batches`, :func:`build_space` and :func:`finish`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import torch

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.cache import ArchSummary
from kvlingua.config import to_dict
from kvlingua.data.tokenizer import load_tokenizer
from kvlingua.data.views import DataConfig, parallel_chunks, token_chunks
from kvlingua.evaluate import EvalConfig, evaluate, make_eval_fn
from kvlingua.models import load_frozen
from kvlingua.paths import PathSampler
from kvlingua.pool import PoolMember, save_pool
from kvlingua.report import write_report
from kvlingua.space import SharedSpace
from kvlingua.tracking import NullTracker, Tracker, space_tracker
from kvlingua.train import Batch, TrainConfig, TrainState, fit
from kvlingua.translator import SpaceConfig


def _default_spaces() -> dict[str, SpaceConfig]:
    return {"translator": SpaceConfig(), "linear": SpaceConfig(adapter="linear")}


def check_run_settings(prefix_len: int, suffix_len: int, batch_size: int, spaces: dict, eval_split: str) -> None:
    """Checks shared by :class:`TrainJob` and the run config, so bad settings fail before any compute."""
    if not spaces:
        raise ValueError("spaces: name at least one shared space to train")
    if prefix_len < 1 or suffix_len < 2:
        raise ValueError(f"prefix_len must be >= 1 and suffix_len >= 2, got {prefix_len} and {suffix_len}")
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (the content control rolls the batch)")
    if eval_split not in ("train", "validation", "test"):
        raise ValueError(f"eval_split must be train, validation or test, got {eval_split!r}")


def check_langs(langs: dict[str, str] | None, models: Iterable[str]) -> None:
    """With parallel text (``langs``), every model needs a language."""
    if langs is not None:
        missing = sorted(set(models) - set(langs))
        if missing:
            raise ValueError(f"langs: no language given for model(s) {missing}")


def check_space_steps(space_steps: dict[str, int] | None, spaces: dict) -> None:
    """``space_steps`` may only name trained spaces, each with a positive step count."""
    for name, steps in (space_steps or {}).items():
        if name not in spaces:
            raise ValueError(f"space_steps: {name!r} is not one of the spaces {sorted(spaces)}")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"space_steps.{name} must be a positive integer, got {steps!r}")


def check_space_fits(spaces: dict[str, SpaceConfig], layers: dict[str, int]) -> None:
    """Σ's width Q must be divisible by every member's layer count (``layers``: name -> L)."""
    for space_name, cfg in spaces.items():
        bad = {m: L for m, L in layers.items() if cfg.q_dim % L}
        if bad:
            raise ValueError(f"spaces.{space_name}.q_dim={cfg.q_dim} is not divisible by the layer count of "
                             f"{', '.join(f'{m} (L={L})' for m, L in bad.items())}")


@dataclass(frozen=True)
class TrainJob:
    """Everything one Σ-training run needs. Crosses Ray as ``to_dict``/``from_dict``."""

    name: str
    """Run name (MLflow run name, pool name)."""
    models: dict[str, str]
    """Pool member name -> local checkpoint directory, in pool order."""
    tokenizer: str
    """Directory of the pool's shared tokenizer."""
    out_dir: str
    """Run directory: checkpoints, evaluation, plots and the trained pool land here."""
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
    """Per-space override of ``train.steps`` (e.g. to give a cheaper baseline the same wall time)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation settings."""
    eval_split: str = "validation"
    """Split used for held-out evaluation."""

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: a pool needs at least one model")
        check_run_settings(self.prefix_len, self.suffix_len, self.batch_size, self.spaces, self.eval_split)
        check_space_steps(self.space_steps, self.spaces)
        check_langs(self.langs, self.models)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def train_for(self, space: str, base: TrainConfig | None = None) -> TrainConfig:
        """The loop settings of ``space``: ``base`` (default ``self.train``) with its ``space_steps``."""
        base = base or self.train
        steps = (self.space_steps or {}).get(space)
        return base if steps is None else replace(base, steps=steps)

    @property
    def max_steps(self) -> int:
        """Steps of the longest-training space (batches a run may draw)."""
        return max(self.train_for(name).steps for name in self.spaces)

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.suffix_len


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
    batches are formed once from a seeded permutation, so a batch's composition —
    and its ``key`` — recurs every epoch (source blocks can be cached per key);
    only the order of batches is reshuffled each epoch.
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
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(job.train.seed * 1000 + epoch))
        for i in order.tolist():
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


def main_space(spaces: Iterable[str]) -> str:
    """The space a run is about (its pool is ``out_dir/pool``): ``translator`` if trained, else the first."""
    names = list(spaces)
    return "translator" if "translator" in names else names[0]


def allowed_paths(job: TrainJob) -> list[tuple[str, str]]:
    """All (source, target) paths the job trains and evaluates."""
    return PathSampler(job.names, None, job.train.seed, job.train.paths, job.train.trainable).allowed


def pool_members(job: TrainJob, backend: PoolBackend) -> list[PoolMember]:
    """Pool members with the architecture summaries and weight fingerprints the backend already has."""
    return [PoolMember(name, str(Path(path).resolve()), backend.summary(name), backend.fingerprint(name))
            for name, path in job.models.items()]


def finish(job: TrainJob, spaces: dict[str, SharedSpace], backend: PoolBackend,
           states: dict[str, TrainState], tracker: Tracker | None = None) -> dict:
    """Evaluate every space beside the baselines; write the report (table, JSON, plot), pool(s),
    histories and ``timing.json`` (each space's steps and training seconds, for equal-wall-time
    comparisons).

    Returns a dict with ``markdown`` (the evaluation table), ``timing`` and the paths written.
    """
    tracker = tracker or NullTracker()
    out = Path(job.out_dir)
    for s in spaces.values():
        s.eval()
    result = evaluate(backend, eval_batches(job), allowed_paths(job), spaces, first_tokens=job.eval.first_tokens)
    histories = {name: state.history for name, state in states.items()}
    job_dict = to_dict(job)
    report = write_report(out, result, histories, title=f"kvlingua run {job.name}", config=job_dict)
    files = {"eval_json": report["json"], "eval_md": report["markdown"]}
    if "plot" in report:  # train.eval_every > 0
        files["plot"] = report["plot"]
    main = main_space(job.spaces)
    members = pool_members(job, backend)
    for name, space in spaces.items():
        pool_dir = out / ("pool" if name == main else f"pool-{name}")
        extra = {"run": job.name, "space_name": name, "job": job_dict}
        save_pool(pool_dir, space, members, tokenizer_dir=job.tokenizer, extra=extra)
        files[f"pool_{name}"] = pool_dir
    (out / "histories.json").write_text(json.dumps(histories, indent=1))
    timing = {name: {"steps": state.step, "train_wall_s": round(state.train_s, 1)} for name, state in states.items()}
    files["timing"] = out / "timing.json"
    files["timing"].write_text(json.dumps(timing, indent=1))
    for f in files.values():
        tracker.log_artifact(f)
    return {"markdown": result.to_markdown(), "timing": timing, "files": {k: str(v) for k, v in files.items()},
            "eval": result.to_dict()}


def run_local(job: TrainJob, tracker: Tracker | None = None, progress: bool = True,
              backend: PoolBackend | None = None) -> dict:
    """Train every space of ``job`` in this process (LocalBackend), then :func:`finish`."""
    tracker = tracker or NullTracker()
    if backend is None:
        backend = LocalBackend({name: load_frozen(path) for name, path in job.models.items()})
    summaries = {m: backend.summary(m) for m in job.models}
    held_out = eval_batches(job)[: max(1, job.eval.batches // 4)]
    spaces, states = {}, {}
    for name in job.spaces:
        space = build_space(job, name, summaries)
        eval_fn = make_eval_fn(backend, held_out, allowed_paths(job), space, first_tokens=job.eval.first_tokens)
        states[name] = fit(space, backend, train_batches(job), job.train_for(name),
                           tracker=space_tracker(tracker, name, main_space(job.spaces)), eval_fn=eval_fn,
                           progress=progress)
        spaces[name] = space
    return finish(job, spaces, backend, states, tracker)
