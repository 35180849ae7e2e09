"""Named search spaces of the paper's sweeps and ablations, as code.

A space is a function ``space(n_models) -> (param_space, tune_config_kwargs)``:

* ``param_space`` maps dotted :class:`~workers.run_config.RunConfig` paths
  (``"train.lr"``, ``"batch_size"``, ``"spaces.translator.embed_dim_factor"``) to
  ``tune.grid_search([...])`` values; a trial's config is the base run config with each
  key set to the trial's value;
* ``tune_config_kwargs`` are defaults for ``tune.TuneConfig`` (the sweep YAML wins).

Every space is a grid, so every trial is known before the sweep starts:
:func:`expand` lists them and :func:`validate_trials` builds each trial's run config
with :func:`kvlingua.config.from_dict`, refusing an unknown key or a bad value up front.
Spaces are overridden by key (``-o space.lr=[1e-3,1e-4]``): an override names a key of
the space exactly or by its last dotted part(s) (``lr`` -> ``train.lr``); an override of
a key the space does not have adds a new grid axis (a full dotted RunConfig path).
"""
from __future__ import annotations

import copy
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune

from kvlingua.config import ConfigError, from_dict

SpaceFn = Callable[[int], tuple[dict[str, Any], dict[str, Any]]]
"""``n_models -> (param_space, tune_config_kwargs)``."""

FIXED_KEYS = ("name", "pool", "pool_members", "models", "tokenizer", "run_dir", "ray", "tracking", "langs")
"""Top-level RunConfig fields a sweep may not vary: every trial shares the pool, its hosts and the tracking."""

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_DEFAULTS = {"metric": "eval_nll", "mode": "min", "num_samples": 1}


def paper_grid(n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paper §3: lr ∈ {1e-3, 1e-4, 1e-5} × batch size (paper 256/512/1024, scaled to CPU: 8/16/32)."""
    return {"train.lr": tune.grid_search([1e-3, 1e-4, 1e-5]),
            "batch_size": tune.grid_search([8, 16, 32])}, dict(_DEFAULTS)


def paths_per_step(n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paper Fig. 6: paths sampled per step ∈ {1, 2, 4, N²} (values above N² dropped)."""
    values = sorted({v for v in (1, 2, 4, n_models * n_models) if v <= n_models * n_models})
    return {"train.paths_per_step": tune.grid_search(values)}, dict(_DEFAULTS)


def recon_weight(n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paper Table 2: reconstruction-loss weight ∈ {0, 0.5, 1}."""
    return {"train.recon_weight": tune.grid_search([0.0, 0.5, 1.0])}, dict(_DEFAULTS)


def adapter_size(n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Paper §3 ablation of adapter size: D'/D ∈ {0.5, 1, 2, 4} × feed-forward factor ∈ {1, 2}.

    The identity map and the linear space of the base config are the reference points
    every trial's evaluation reports beside the translator.
    """
    return {"spaces.translator.embed_dim_factor": tune.grid_search([0.5, 1.0, 2.0, 4.0]),
            "spaces.translator.translation_dim_factor": tune.grid_search([1.0, 2.0])}, dict(_DEFAULTS)


def debug(n_models: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two trials (lr 1e-3 and 3e-3) for tests and smoke runs."""
    return {"train.lr": tune.grid_search([1e-3, 3e-3])}, dict(_DEFAULTS)


SPACES: dict[str, SpaceFn] = {
    "paper_grid": paper_grid,
    "paths_per_step": paths_per_step,
    "recon_weight": recon_weight,
    "adapter_size": adapter_size,
    "debug": debug,
}
"""Registry of named search spaces (``kvlingua tune ... --space NAME``)."""


def grid_of(param_space: Mapping[str, Any]) -> dict[str, list]:
    """``{key: tune.grid_search(values)}`` -> ``{key: values}``; a non-grid value is refused."""
    grid = {}
    for key, value in param_space.items():
        if not (isinstance(value, dict) and set(value) == {"grid_search"}):
            raise ConfigError(f"search space key {key!r}: only grid_search values are supported, got {value!r}")
        values = list(value["grid_search"])
        if not values:
            raise ConfigError(f"search space key {key!r}: empty grid")
        grid[key] = values
    return grid


def resolve_space(name: str, n_models: int, overrides: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, list], dict[str, Any]]:
    """The grid ``{dotted key: values}`` and TuneConfig defaults of space ``name`` with ``overrides``.

    Raises:
        ConfigError: unknown space name, an override matching several keys, or an empty grid.
    """
    if name not in SPACES:
        raise ConfigError(f"unknown search space {name!r}; known spaces are {sorted(SPACES)}")
    param_space, kwargs = SPACES[name](n_models)
    grid = grid_of(param_space)
    for key, value in (overrides or {}).items():
        matches = [k for k in grid if k == key or k.endswith("." + key)]
        if len(matches) > 1:
            raise ConfigError(f"space override {key!r} matches several keys of space {name!r}: {matches}; "
                              "use the full dotted key")
        values = [_number(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        if not values:
            raise ConfigError(f"space override {key!r}: empty list of values")
        grid[matches[0] if matches else key] = values
    return grid, kwargs


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a numeric-looking string becomes a float."""
    if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)
    return value


def expand(grid: Mapping[str, list]) -> list[dict[str, Any]]:
    """Every trial of a grid (the cartesian product of its values) as ``{key: value}``; last key slowest."""
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in reversed(keys)))
    return [dict(zip(keys, reversed(c))) for c in combos]


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the base run-config dict with each dotted key of ``params`` set.

    Every key must name an existing field of the base config (``to_dict`` lists all of
    them, defaults included), so a typo is an error and not a silently added section.
    """
    data = copy.deepcopy(dict(base))
    for key, value in params.items():
        parts = key.split(".")
        if parts[0] in FIXED_KEYS:
            raise ConfigError(f"search space key {key!r}: {parts[0]!r} is fixed for a sweep (the trials share "
                              f"the pool's hosts and tracking); sweepable sections exclude {list(FIXED_KEYS)}")
        node: Any = data
        for depth, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:depth]) or "the run config"
                valid = sorted(node) if isinstance(node, dict) else []
                raise ConfigError(f"search space key {key!r}: {where} has no key {part!r}; valid keys: {valid}")
            if depth == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return data


def validate_trials(run_config_cls: type, base: Mapping[str, Any], grid: Mapping[str, list]) -> list[Any]:
    """Build every trial's run config (strict :func:`from_dict`); the first bad trial raises.

    Returns the trials' configs in :func:`expand` order.

    Raises:
        ConfigError: naming the trial's parameters and what is wrong with them.
    """
    configs = []
    for params in expand(grid):
        try:
            configs.append(from_dict(run_config_cls, apply_params(base, params)))
        except ConfigError as e:
            raise ConfigError(f"trial {params} is invalid: {e}") from None
    return configs
