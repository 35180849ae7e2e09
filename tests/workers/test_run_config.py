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


def test_members_read_their_own_tokenizers_and_a_mixed_pool_says_each(tmp_path):
    from tests.helpers import bpe_tokenizer
    from workers.run_config import to_job

    docs = ["el niño comió piña y dijo día", "и свет земля вода в на сказал бог", "the light earth water"] * 20
    for name, kind, vocab, tok_vocab, bos in (("a", "llama", 300, 300, False), ("b", "gemma2", 340, 340, True),
                                               ("c", "llama", 300, 300, False)):
        tiny_model(kind, seed=len(name), layers=2, vocab=vocab).save_pretrained(tmp_path / name)
        bpe_tokenizer(docs, tok_vocab, out_dir=tmp_path / name, bos=bos)

    def job(models):
        cfg = {"name": "r", "models": {m: str(tmp_path / m) for m in models}, "train": {"steps": 2},
               "spaces": {"translator": {"q_dim": 12}}}
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
        return to_job(load_run_config(str(tmp_path / "run.yaml")), cfg["models"])

    same = job(["a", "c"])  # two checkpoints saved with equal tokenizers: one tokenizer, ids read as they are
    assert same.tokenizers is None and same.tokenizer == str(tmp_path / "a")
    mixed = job(["a", "b"])  # different tokenizers: each member's recorded, the vocabularies may differ
    assert mixed.tokenizers == {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}
    tiny_model("llama", seed=9, layers=2, vocab=200).save_pretrained(tmp_path / "bare")  # no tokenizer saved
    with pytest.raises(ConfigError, match=r"model 'bare' \(vocabulary 200\) cannot read the tokenizer at .*a \(300 tokens\)"):
        job(["a", "bare"])
