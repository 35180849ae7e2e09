"""Search spaces and trial validation (no Ray cluster needed)."""
import itertools
import time

import pytest

from kvlingua.cache import ArchSummary
from kvlingua.config import ConfigError, to_dict
from kvlingua.paths import PathSampler
from kvlingua.space import SharedSpace
from orchestrator.cli import main as cli_main
from workers.run_config import RunConfig, load_run_config
from tests.tune_spaces.tiny_run import make_tiny_run, write_sweep
from tune_spaces.spaces import SPACES, apply_params, expand, grid_of, resolve_space, validate_trials
from tune_spaces.sweep import plan
from tune_spaces.sweep_config import load_sweep_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return root, make_tiny_run(root)


# The paper's sweeps and ablations (§3, Fig. 6, Table 2, the adapter-size ablation), written from the paper.
# Batch sizes are the paper's 256/512/1024 scaled to CPU by 1/32.
PAPER = {
    "paper_grid": {"train.lr": {1e-3, 1e-4, 1e-5}, "batch_size": {b // 32 for b in (256, 512, 1024)}},
    "recon_weight": {"train.recon_weight": {0.0, 0.5, 1.0}},
    "adapter_size": {"spaces.translator.embed_dim_factor": {0.5, 1.0, 2.0, 4.0},
                     "spaces.translator.translation_dim_factor": {1.0, 2.0}},
}
THREE = ("a", "b", "c")


def _field(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _trials(base: dict, space: str) -> list[tuple[dict, RunConfig]]:
    """Each trial's parameters and its validated run config, for a 3-model pool."""
    grid, _ = resolve_space(space, len(THREE))
    return list(zip(expand(grid), validate_trials(RunConfig, base, grid)))


@pytest.fixture(scope="module")
def base3(tiny):
    """The tiny run's config as a dict, with a third model (a second copy of ``a``)."""
    _, base_yaml = tiny
    base = to_dict(load_run_config(base_yaml))
    base["models"] = base["models"] | {"c": base["models"]["a"]}
    return base


@pytest.mark.parametrize("space", sorted(PAPER))
def test_paper_spaces_cover_the_papers_values_in_the_right_fields(base3, space):
    trials = _trials(base3, space)
    expected = PAPER[space]
    # Every combination of the paper's values once, and each trial's config carries its values where the loop reads them.
    combos = {tuple(params[k] for k in expected) for params, _ in trials}
    assert combos == set(itertools.product(*expected.values())) and len(trials) == len(combos)
    for params, cfg in trials:
        assert {k: _field(cfg, k) for k in expected} == params
        assert list(cfg.models) == list(THREE)


def test_paths_per_step_for_three_models_is_1_2_4_all(base3):
    """Paper Fig. 6 (3 seed models): 1, 2, 4 and all 9 paths (i->i included) per step."""
    all_paths = set(itertools.product(THREE, repeat=2))
    trials = _trials(base3, "paths_per_step")
    assert sorted(cfg.train.paths_per_step for _, cfg in trials) == [1, 2, 4, len(all_paths)] == [1, 2, 4, 9]
    for _, cfg in trials:  # the sampler trains that many distinct paths a step; the largest trains every path
        step = PathSampler(THREE, cfg.train.paths_per_step, seed=cfg.train.seed).sample(0)
        assert len(set(step)) == cfg.train.paths_per_step and set(step) <= all_paths
    assert set(PathSampler(THREE, 9).sample(0)) == all_paths
    # With 2 models there are only 4 paths: nothing above 4 is a trial.
    assert grid_of(SPACES["paths_per_step"](2)[0]) == {"train.paths_per_step": [1, 2, 4]}


def test_adapter_size_trials_change_the_translator(base3):
    """Both axes of the adapter-size ablation reach the translator: more width, more parameters."""
    arch = ArchSummary("gemma2", num_layers=2, n_kv_heads=1, head_dim=8, vocab_size=300, hidden_size=32)
    size = {}
    for params, cfg in _trials(base3, "adapter_size"):
        space = SharedSpace({m: arch for m in THREE}, cfg.spaces["translator"])
        size[(params["spaces.translator.embed_dim_factor"], params["spaces.translator.translation_dim_factor"])] = \
            sum(space.param_counts()["a"].values())
    for ffn in (1.0, 2.0):
        by_width = [size[(e, ffn)] for e in (0.5, 1.0, 2.0, 4.0)]
        assert by_width == sorted(set(by_width)), by_width
    assert all(size[(e, 2.0)] > size[(e, 1.0)] for e in (0.5, 1.0, 2.0, 4.0))


def test_debug_space_has_two_valid_trials(base3):
    assert len({cfg.train.lr for _, cfg in _trials(base3, "debug")}) == 2


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
