"""Search spaces and trial validation (no Ray cluster needed)."""
import time

import pytest

from kvlingua.config import ConfigError, to_dict
from orchestrator.cli import main as cli_main
from orchestrator.run_config import RunConfig, load_run_config
from tests.tune_spaces.tiny_run import make_tiny_run, write_sweep
from tune_spaces.spaces import SPACES, apply_params, expand, grid_of, resolve_space, validate_trials
from tune_spaces.sweep import plan
from tune_spaces.sweep_config import load_sweep_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, make_tiny_run(root)


def test_registry_has_the_paper_spaces():
    assert set(SPACES) >= {"paper_grid", "paths_per_step", "recon_weight", "adapter_size", "debug"}
    assert grid_of(SPACES["paper_grid"](2)[0]) == {"train.lr": [1e-3, 1e-4, 1e-5], "batch_size": [8, 16, 32]}
    assert grid_of(SPACES["recon_weight"](2)[0]) == {"train.recon_weight": [0.0, 0.5, 1.0]}
    # {1, 2, 4, N²} capped at N²: 2 models -> 4 paths at most; 3 models -> 9
    assert grid_of(SPACES["paths_per_step"](2)[0]) == {"train.paths_per_step": [1, 2, 4]}
    assert grid_of(SPACES["paths_per_step"](3)[0]) == {"train.paths_per_step": [1, 2, 4, 9]}
    assert len(expand(grid_of(SPACES["debug"](2)[0]))) >= 2
    sizes = grid_of(SPACES["adapter_size"](2)[0])
    assert set(sizes) == {"spaces.translator.embed_dim_factor", "spaces.translator.translation_dim_factor"}


def test_expand_is_the_cartesian_product():
    trials = expand({"a": [1, 2, 3], "b": ["x", "y"]})
    assert len(trials) == 6
    assert {(t["a"], t["b"]) for t in trials} == {(a, b) for a in (1, 2, 3) for b in ("x", "y")}


def test_overrides_by_suffix_full_key_and_new_axis():
    grid, kwargs = resolve_space("paper_grid", 2, {"lr": ["1e-3", 1e-4], "train.recon_weight": 0.5})
    assert grid == {"train.lr": [1e-3, 1e-4], "batch_size": [8, 16, 32], "train.recon_weight": [0.5]}
    assert kwargs["metric"] == "eval_nll" and kwargs["mode"] == "min"
    with pytest.raises(ConfigError, match="unknown search space 'nope'.*paper_grid"):
        resolve_space("nope", 2)


def test_validation_refuses_bad_values_and_keys(tiny):
    _, base_yaml = tiny
    base = to_dict(load_run_config(base_yaml))
    configs = validate_trials(RunConfig, base, {"train.lr": [1e-3, 1e-2], "batch_size": [4, 8]})
    assert sorted((c.train.lr, c.batch_size) for c in configs) == [(1e-3, 4), (1e-3, 8), (1e-2, 4), (1e-2, 8)]
    assert all(c.train.steps == 4 and c.spaces["translator"].q_dim == 16 for c in configs)
    with pytest.raises(ConfigError, match=r"trial \{'train.lr': -0.001\}.*lr must be > 0"):
        validate_trials(RunConfig, base, {"train.lr": [1e-3, -1e-3]})
    with pytest.raises(ConfigError, match="train has no key 'lrr'"):
        validate_trials(RunConfig, base, {"train.lrr": [1e-3]})
    with pytest.raises(ConfigError, match="spaces has no key 'transltor'"):
        apply_params(base, {"spaces.transltor.embed_dim_factor": 2.0})
    with pytest.raises(ConfigError, match="'models' is fixed"):
        apply_params(base, {"models.a": "elsewhere"})


def test_sweep_refuses_up_front_and_fast(tiny):
    root, base_yaml = tiny
    sweep = write_sweep(root, base_yaml, name="bad")
    cases = [({}, "nope", "unknown search space 'nope'"),
             ({"space.lr": [-1.0]}, None, "lr must be > 0"),
             ({"space.train.nonsense": [1]}, None, "train has no key 'nonsense'"),
             ({"space.batch_size": [1]}, None, "batch_size must be >= 2"),
             ({"asha": {"grace_period": 2}, "base.train.eval_every": 0}, None, "asha needs train.eval_every > 0"),
             ({"metric": "eval_nll/a->zz"}, None, "names no trained path"),
             ({"asha": {"grace_period": 50}}, None, "exceeds train.steps"),
             ({"space.models.a": ["x"]}, None, "'models' is fixed")]
    for overrides, space, message in cases:
        t0 = time.perf_counter()
        with pytest.raises(ConfigError, match=message):
            plan(load_sweep_config(sweep, overrides, space=space))
        assert time.perf_counter() - t0 < 5.0
    assert not (root / "bad").exists()  # nothing was started or written
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep_config(sweep, {"max_concurent_trials": 3})


def test_cli_refuses_unknown_space_before_any_trial(tiny, capsys):
    root, base_yaml = tiny
    sweep = write_sweep(root, base_yaml, name="cli")
    t0 = time.perf_counter()
    assert cli_main(["tune", str(sweep), "--space", "nope", "--no-progress"]) == 2
    assert time.perf_counter() - t0 < 5.0
    assert "unknown search space 'nope'" in capsys.readouterr().err
    assert not (root / "cli").exists()
