"""Run configs: the checks that need the members' shapes run on load, before any compute, without Ray."""
import pytest
import yaml

from kvlingua.config import ConfigError
from tests.helpers import tiny_model
from workers.run_config import load_run_config


def write_run(tmp_path, models: dict[str, str], q_dim: int = 12) -> str:
    cfg = {"name": "r", "models": models, "tokenizer": str(tmp_path), "train": {"steps": 2},
           "spaces": {"translator": {"q_dim": q_dim}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_members_with_different_vocabularies_are_refused_on_load(tmp_path):
    tiny_model("llama", seed=0, layers=2, vocab=64).save_pretrained(tmp_path / "small")
    tiny_model("llama", seed=1, layers=2, vocab=96).save_pretrained(tmp_path / "big")
    with pytest.raises(ConfigError, match=r"(?s)small.*64.*big.*96|big.*96.*small.*64"):
        load_run_config(write_run(tmp_path, {"small": str(tmp_path / "small"), "big": str(tmp_path / "big")}))
    tiny_model("llama", seed=2, layers=3, vocab=64).save_pretrained(tmp_path / "deep")
    assert load_run_config(write_run(tmp_path, {"small": str(tmp_path / "small"), "deep": str(tmp_path / "deep")},
                                     q_dim=12)).models.keys() == {"small", "deep"}
    with pytest.raises(ConfigError, match=r"q_dim=8 is not divisible by the layer count of deep \(L=3\)"):
        load_run_config(write_run(tmp_path, {"small": str(tmp_path / "small"), "deep": str(tmp_path / "deep")},
                                  q_dim=8))
