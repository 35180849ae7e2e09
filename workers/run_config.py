"""Run configs: one YAML file describes a whole Σ-training run.

``RunConfig`` mirrors ``configs/*.yaml`` field for field. It either names a pool
YAML to pre-train first (``pool:``, as the paper pre-trains its own pool) or
explicit checkpoint directories (``models:``, for your own models); the data, the
shared spaces, the loop and evaluation are the fields of :class:`kvlingua.job_spec.JobSpec`
(inherited, with their checks); then Ray placement (:class:`workers.config.RayConfig`)
and tracking. Everything is validated on load, before any compute, and without
importing Ray; :func:`to_job` resolves it into the backend-independent
:class:`kvlingua.job.TrainJob`. The Tune sweeps and the CLI both read run configs
from here (``tune_spaces`` and ``orchestrator`` depend on ``workers``, never the
other way round).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvlingua.config import ConfigError, apply_override, from_dict, load_yaml
from kvlingua.tracking import Tracker, TrackerHandle, open_tracker
from kvlingua.job import TrainJob
from kvlingua.job_spec import JobSpec, check_langs, check_space_fits
from workers.config import RayConfig


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking of a run."""

    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (off: a do-nothing tracker)."""
    uri: str | None = None
    """Tracking URI; None = ``sqlite:///<run_dir>/mlflow.db`` (open with ``mlflow ui --backend-store-uri ...``)."""
    experiment: str = "kvlingua"
    """MLflow experiment name."""

    def open(self, run_dir: str | Path, run_name: str, parent: TrackerHandle | None = None,
             tags: dict[str, str] | None = None) -> Tracker:
        """A new tracked run for ``run_dir`` (nested under ``parent``), or a do-nothing tracker when off."""
        return open_tracker(self.enabled, self.uri, self.experiment, run_dir, run_name, parent=parent, tags=tags)


@dataclass(frozen=True, kw_only=True)
class RunConfig(JobSpec):
    """A Σ-training run: which pool, which data, which spaces, how to train, where to run.

    The data, lengths, spaces, loop and evaluation fields are :class:`~kvlingua.job.JobSpec`'s.
    """

    name: str
    """Run name: run directory ``runs/<name>`` and MLflow run name."""
    pool: str | None = None
    """Pool YAML (``configs/pools/*.yaml``) to pre-train (or reuse) first; relative to this config file."""
    pool_members: tuple[str, ...] | None = None
    """Which members of ``pool`` take part (None = all), e.g. only the two experts of an experts pool."""
    models: dict[str, str] | None = None
    """Explicit checkpoint directories (name -> dir) instead of ``pool``; your own models go here."""
    tokenizer: str | None = None
    """Tokenizer directory; None = the tokenizer saved with the first model."""
    run_dir: str | None = None
    """Where results go; None = ``runs/<name>`` under the current directory."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray placement and resources."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pool is None) == (self.models is None):
            raise ValueError("give exactly one of `pool` (a pool YAML to pre-train) or `models` (checkpoint dirs)")
        if self.pool_members is not None and self.pool is None:
            raise ValueError("pool_members needs `pool`")
        if self.models is not None:
            check_langs(self.langs, self.models)


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a run YAML; relative paths in it resolve against its directory."""
    path = Path(path)
    data = load_yaml(path)
    for key, value in (overrides or {}).items():
        apply_override(data, key, value)
    cfg = from_dict(RunConfig, data, where=str(path))
    base = path.resolve().parent
    fix = lambda p: str((base / p).resolve()) if p is not None and not Path(p).is_absolute() else p  # noqa: E731
    models = {k: fix(v) for k, v in cfg.models.items()} if cfg.models else None
    cfg = replace(cfg, pool=fix(cfg.pool), models=models, tokenizer=fix(cfg.tokenizer))
    if cfg.data.source not in ("bible",) and not cfg.data.source.startswith("hub:"):
        cfg = replace(cfg, data=replace(cfg.data, source=fix(cfg.data.source)))
    _check_paths(cfg)
    preflight(cfg)
    return cfg


def member_configs(cfg: RunConfig) -> dict[str, Any]:
    """name -> transformers config of every model the run uses (its checkpoint's config.json, or the size the
    pool YAML pre-trains it at), read without training, fetching or loading any weights. A model that is not
    on disk yet (to be fetched), or whose vocabulary depends on a tokenizer not fetched yet, is left out: its
    checks then run when the pool is built."""
    from kvlingua.config import load_config
    from kvlingua.plan import load_model_config
    from kvlingua.pretrain.pools import PoolConfig, known_vocab_size, model_member_dir_if_present
    from kvlingua.pretrain.sizes import gemma2_config

    if cfg.models is not None:
        return {name: load_model_config(path) for name, path in cfg.models.items()}
    pool = load_config(PoolConfig, cfg.pool)
    runs = {m.name: m.pretrain for m in pool.members if m.pretrain is not None}
    vocab = known_vocab_size(pool)
    configs = {}
    for m in pool.members:
        if m.model is not None:  # an existing checkpoint: its config.json once it is on disk
            path = model_member_dir_if_present(m.model)
            configs[m.name] = load_model_config(path) if path is not None else None
            continue
        run = m.pretrain if m.pretrain is not None else runs[m.snapshot_of.member]
        configs[m.name] = (load_model_config(run.init_from) if run.init_from is not None
                           else gemma2_config(run.size, vocab) if vocab is not None else None)
    names = cfg.pool_members or tuple(configs)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise ConfigError(f"pool_members: {unknown} not in pool {cfg.pool} (members: {sorted(configs)})")
    return {n: configs[n] for n in names if configs[n] is not None}


def preflight(cfg: RunConfig) -> None:
    """Checks that need the pool's shapes (Q divisible by every L; one vocabulary where the run names one
    tokenizer), before anything is trained."""
    from kvlingua.cache import arch_summary, check_same_vocab

    try:
        summaries = {name: arch_summary(c) for name, c in member_configs(cfg).items()}
        check_langs(cfg.langs, summaries)
        if cfg.tokenizer is not None or cfg.langs is not None:  # every member reads the same ids
            check_same_vocab(summaries)
        check_space_fits(cfg.spaces, {name: s.num_layers for name, s in summaries.items()})
    except ValueError as e:
        raise e if isinstance(e, ConfigError) else ConfigError(str(e)) from e


def _check_paths(cfg: RunConfig) -> None:
    if cfg.pool is not None and not Path(cfg.pool).is_file():
        raise ConfigError(f"pool: pool config not found: {cfg.pool}")
    for name, p in (cfg.models or {}).items():
        if not Path(p).is_dir():
            raise ConfigError(f"models.{name}: checkpoint directory not found: {p}")
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
        raise ConfigError(f"tokenizer: directory not found: {cfg.tokenizer}")


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir).resolve() if cfg.run_dir else (Path.cwd() / "runs" / cfg.name).resolve()


def resolve_models(cfg: RunConfig, progress: bool = True) -> dict[str, str]:
    """Checkpoint dirs of the run's models, pre-training the pool first when needed (reused if done)."""
    if cfg.models is not None:
        return dict(cfg.models)
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import PoolConfig, pretrain_pool

    dirs = pretrain_pool(load_config(PoolConfig, cfg.pool), progress=progress)
    return {n: str(dirs[n]) for n in (cfg.pool_members or dirs)}


def to_job(cfg: RunConfig, models: dict[str, str]) -> TrainJob:
    """The backend-independent job for ``cfg`` once its models exist."""
    tokenizer, tokenizers = member_tokenizers(cfg, models)
    return TrainJob.from_spec(cfg, name=cfg.name, models=models, tokenizer=tokenizer, out_dir=str(run_dir_of(cfg)),
                              tokenizers=tokenizers)


def member_tokenizers(cfg: RunConfig, models: dict[str, str]) -> tuple[str, dict[str, str] | None]:
    """The run's tokenizer and, where members tokenize differently, each member's own.

    ``tokenizer:`` in the run config is read by every member. Otherwise each member reads the tokenizer saved with
    its checkpoint (a member saved without one reads the first member's); when those differ, the pool mixes
    tokenizers and the job says each member's. A member whose vocabulary cannot hold its tokenizer's ids is
    refused in one line (:class:`ConfigError`).
    """
    from kvlingua.data.tokenizer import is_tokenizer_dir, load_tokenizer
    from kvlingua.data.views import tokenizer_hash
    from kvlingua.plan import load_model_config

    first = cfg.tokenizer or next(iter(models.values()))
    if not is_tokenizer_dir(Path(first)):
        raise ConfigError(f"no tokenizer at {first} (tokenizer.json + tokenizer_config.json): save one with the first "
                          "model's checkpoint or name the run's `tokenizer:`")
    dirs = {m: d if cfg.tokenizer is None and is_tokenizer_dir(Path(d)) else first for m, d in models.items()}
    toks, hashes = {}, {}
    for d in sorted(set(dirs.values())):
        toks[d] = load_tokenizer(d)
        hashes[d] = tokenizer_hash(toks[d])
    for m, d in dirs.items():
        vocab = load_model_config(models[m]).get_text_config().vocab_size
        if len(toks[d]) > vocab:
            whose = "its own" if d == models[m] else f"the tokenizer at {d}"
            raise ConfigError(f"model {m!r} (vocabulary {vocab}) cannot read {whose} ({len(toks[d])} tokens); save its "
                              "tokenizer with its checkpoint")
    if len({hashes[d] for d in dirs.values()}) == 1:
        return first, None
    return first, dirs
