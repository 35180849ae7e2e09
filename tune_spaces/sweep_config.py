"""The sweep YAML (``configs/sweeps/*.yaml``): which base run, which space, how to run the trials.

:class:`SweepConfig` mirrors the file field for field; unknown keys are errors. The
base run config path is relative to the sweep file. ``space_overrides`` change the
named space's grid (``lr: [1e-3, 1e-4]``); ``base_overrides`` change the base run
config for every trial (``train.steps: 200``). On the command line ``-o space.KEY=V``
and ``-o base.KEY=V`` land in those two mappings and ``-o FIELD=V`` sets a field here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvlingua.config import ConfigError, apply_override, from_dict, load_yaml
from kvlingua.metric_names import TUNE_MEAN, NllKey


@dataclass(frozen=True)
class AshaConfig:
    """ASHA early stopping on the eval metric, with the training step as time."""

    grace_period: int = 10
    """Steps every trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of trials at each rung."""

    def __post_init__(self) -> None:
        if isinstance(self.grace_period, bool) or self.grace_period < 1:
            raise ValueError(f"grace_period must be an integer >= 1, got {self.grace_period!r}")
        if not self.reduction_factor > 1:
            raise ValueError(f"reduction_factor must be > 1, got {self.reduction_factor}")


@dataclass(frozen=True)
class SweepConfig:
    """A Ray Tune sweep over a base run config."""

    name: str
    """Sweep name: directory ``sweeps/<name>``, the Tune experiment and the parent MLflow run."""
    base: str
    """Base run YAML (``configs/*.yaml``), relative to this file."""
    space: str
    """Named search space (``tune_spaces.spaces.SPACES``); ``--space`` on the command line replaces it."""
    space_overrides: dict[str, Any] = field(default_factory=dict)
    """Grid changes: key (full dotted path, or its last part) -> list of values (a scalar: one value)."""
    base_overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted run-config overrides applied to the base for every trial (e.g. ``train.steps: 200``)."""
    num_samples: int | None = None
    """Repeats of the grid; None: the space's default (1)."""
    metric: str | None = None
    """Metric to minimise: ``eval_nll`` (mean held-out NLL of the main space over paths) or
    ``eval_nll/<src>-><tgt>`` (one path); None: the space's default (``eval_nll``)."""
    max_concurrent_trials: int = 2
    """Trials running at once (they share the model hosts)."""
    trial_cpus: float = 1.0
    """CPUs reserved per trial (the trial runs the adapters; frozen models run in the hosts)."""
    trial_gpus: float = 0.0
    """GPUs reserved per trial (adapters on cuda when > 0)."""
    torch_threads: int = 1
    """Intra-op torch threads per trial process."""
    asha: AshaConfig | None = None
    """ASHA early stopping (reports every ``train.eval_every`` steps); None: every trial runs to the end."""
    sweep_dir: str | None = None
    """Where the sweep writes (Tune state, trials, tables, best config), relative to the cwd;
    None: ``sweeps/<name>`` under the cwd."""
    block_dir: str | None = None
    """Block store shared by all trials; None: ``<sweep_dir>/blocks``."""
    address: str | None = None
    """Ray cluster address; None: ``$RAY_ADDRESS``, else an embedded local Ray."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty name without '/', got {self.name!r}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        key = NllKey.parse(self.metric) if self.metric is not None else None
        if self.metric is not None and self.metric != TUNE_MEAN and (key is None or self.metric != key.tune()):
            raise ValueError(f"metric must be 'eval_nll' or 'eval_nll/<src>-><tgt>', got {self.metric!r}")
        if self.max_concurrent_trials < 1 or self.torch_threads < 1:
            raise ValueError("max_concurrent_trials and torch_threads must be >= 1")
        if self.trial_cpus < 0 or self.trial_gpus < 0 or self.trial_cpus + self.trial_gpus == 0:
            raise ValueError(f"a trial needs some resources: trial_cpus={self.trial_cpus}, "
                             f"trial_gpus={self.trial_gpus}")

    def resolved_dir(self) -> Path:
        """Absolute sweep directory."""
        return Path(self.sweep_dir).resolve() if self.sweep_dir else (Path.cwd() / "sweeps" / self.name).resolve()


def split_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line ``-o`` pairs -> sweep-dict overrides: ``space.K`` and ``base.K`` go into the mappings."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        for section in ("space", "base"):
            if key.startswith(section + "."):
                out.setdefault(f"{section}_overrides", {})[key[len(section) + 1:]] = value
                break
        else:
            out[key] = value
    return out


def load_sweep_config(path: str | Path, overrides: dict[str, Any] | None = None,
                      space: str | None = None) -> SweepConfig:
    """Load a sweep YAML (strict), apply ``-o`` overrides and ``--space``; ``base`` resolved to an absolute path."""
    path = Path(path)
    data = load_yaml(path)
    for key, value in split_overrides(dict(overrides or {})).items():
        if key in ("space_overrides", "base_overrides"):
            merged = dict(data.get(key) or {})
            merged.update(value)
            data[key] = merged
        else:
            apply_override(data, key, value)
    if space is not None:
        data["space"] = space
    cfg = from_dict(SweepConfig, data, where=str(path))
    base = Path(cfg.base)
    base = base if base.is_absolute() else (path.resolve().parent / base).resolve()
    if not base.is_file():
        raise ConfigError(f"{path}: base run config not found: {base}")
    return replace(cfg, base=str(base))
