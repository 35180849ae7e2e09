"""Strict config loading: unknown keys, wrong types and missing files are clear errors."""
from dataclasses import dataclass, field

import pytest

from kvlingua.config import ConfigError, from_dict, load_config, parse_override, to_dict


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    """learning rate"""
    steps: int = 10

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    tags: tuple[str, ...] = ()
    models: dict[str, str] = field(default_factory=dict)
    maybe: int | None = None


def test_round_trip_and_nested():
    cfg = from_dict(Outer, {"name": "x", "inner": {"lr": 1, "steps": 3}, "tags": ["a"], "models": {"m": "p"}})
    assert cfg == Outer("x", Inner(1.0, 3), ("a",), {"m": "p"})
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "x", "inner": {"lrr": 1}}, r"Outer.inner: unknown key\(s\) \['lrr'\]"),
        ({"name": "x", "extra": 1}, r"unknown key\(s\) \['extra'\]"),
        ({}, "required key 'name'"),
        ({"name": "x", "inner": {"steps": "ten"}}, "Outer.inner.steps: expected an integer"),
        ({"name": "x", "inner": {"steps": 0}}, "steps must be >= 1"),
        ({"name": "x", "inner": {"lr": True}}, "expected a number"),
        ({"name": "x", "maybe": "no"}, "Outer.maybe"),
        ({"name": 3}, "expected a string"),
    ],
)
def test_bad_input_is_named(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    good = tmp_path / "good.yaml"
    good.write_text("name: run\ninner:\n  lr: 0.01\n")
    assert load_config(Outer, good, overrides={"inner.steps": 7}).inner == Inner(0.01, 7)


def test_parse_override():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    with pytest.raises(ConfigError):
        parse_override("nonsense")


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ninner:\n  lr: 3e-4\n")
    assert load_config(Outer, f).inner.lr == 3e-4
