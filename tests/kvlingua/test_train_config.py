"""The training config and optimiser: config checks and YAML mirror, the warm-up + cosine schedule, parameter groups."""
from __future__ import annotations

import math

import pytest

from kvlingua.backend import LocalBackend
from kvlingua.config import ConfigError, from_dict
from kvlingua.train_config import TrainConfig, make_optimizer
from tests.helpers import paper_space as make_space, tiny_model


@pytest.fixture(scope="module")
def pool2():
    return LocalBackend({"a": tiny_model("gemma2", seed=0), "c": tiny_model("llama", seed=2, layers=3, kv_heads=2)})


def test_train_config_checks_and_yaml_mirror():
    cfg = from_dict(TrainConfig, {"steps": 10, "trainable": ["c"], "paths": [["a", "c"], ["c", "c"]]})
    assert cfg.trainable == ("c",) and cfg.paths == (("a", "c"), ("c", "c"))
    for bad, match in [({"steps": 0}, "steps"), ({"steps": 5, "lr": 0.0}, "lr"),
                       ({"steps": 5, "precision": "fp16"}, "precision"), ({"steps": 5, "warmup_frac": 1.0}, "warmup"),
                       ({"steps": 5, "paths_per_step": 0}, "paths_per_step"),
                       ({"steps": 5, "trainable": []}, "trainable"),
                       ({"steps": 5, "grad_clip": 0.0}, "grad_clip"), ({"steps": 5, "log_every": -1}, "log_every"),
                       ({"steps": 5, "stepz": 1}, "unknown key")]:
        with pytest.raises(ConfigError, match=match):
            from_dict(TrainConfig, bad)


def test_schedule_is_linear_warmup_then_cosine_to_zero(pool2):
    space = make_space(pool2, adapter="linear")
    cfg = TrainConfig(steps=200, lr=2e-3)
    opt, sched = make_optimizer(space, cfg)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])  # after the last step
    warm = 10  # 5% of 200
    for s, lr in enumerate(lrs):
        expected = 2e-3 * (s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (200 - warm))))
        assert abs(lr - expected) < 1e-12, s
    assert lrs[0] == 0.0 and lrs[warm] == pytest.approx(2e-3) and max(lrs) == pytest.approx(2e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-15) and lrs[150] < lrs[100] < lrs[50]
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in space.parameters())


def test_stack_lr_scale_gives_the_stack_its_own_rate(pool2):
    space = make_space(pool2, short_path=True)  # the translator with a dense short path
    cfg = TrainConfig(steps=20, lr=1e-3, stack_lr_scale=30.0, warmup_frac=0.0)
    opt, _ = make_optimizer(space, cfg)
    short = {id(p) for m in space.names for side in ("in", "out")
             for name in ("short_k", "short_v") for p in getattr(space.adapters(m)[side], name).parameters()}
    assert short, "the space has a short path"
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3), pytest.approx(3e-2)]
    assert {id(p) for p in opt.param_groups[0]["params"]} == short
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in space.parameters()} - short
    one, _ = make_optimizer(space, TrainConfig(steps=20, lr=1e-3))  # the default: one group, as before
    assert len(one.param_groups) == 1
    with pytest.raises(ValueError, match="stack_lr_scale"):
        TrainConfig(steps=1, stack_lr_scale=0.0)
