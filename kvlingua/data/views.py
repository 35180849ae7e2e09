"""Views of a text source: documents per language or mixed, packed token chunks, aligned parallel chunks.

Sources: ``"bible"`` (the prepared en/es/ru corpus, :mod:`kvlingua.data.corpus`) or any
``datasets`` source: a local file, directory or glob of .txt/.json/.jsonl/.parquet files,
or ``"hub:<name>"`` where a hub is reachable. Plain text files give one document per
paragraph (blank-line separated). Held-out splits a source lacks are carved from its ``train``
split by a hash of each document's text (fixed, independent of the seed; equal documents land
in the same split): a document's bucket is ``train`` (90%), ``validation`` (5%) or ``test`` (5%),
and a missing split takes its bucket out of train. Only ``train``: 90/5/5; ``train`` and
``validation`` (the common layout): the given validation, ``test`` = 5% of train, train the
other 95%. :func:`carve_note` says which splits were carved (logged once per source, and
written at the top of ``kvlingua eval``'s report).

Views of the bible (one document = one chapter in one language, verses joined by spaces):

* ``en`` / ``es`` / ``ru``: every chapter of the split in that language, canonical order.
* ``mixed``: languages in proportion ``mix`` by characters, using as much text as the
  proportions allow: the language that limits the total is used whole, the others are
  a seeded random choice of chapters; all documents are then shuffled with the seed.
  A chapter may appear in several languages (all within the same split).
* ``parallel``: every chapter in all three languages (en, es, ru per chapter); aligned
  tensors come from :func:`parallel_chunks` (prefix and suffix cut at one verse boundary).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kvlingua.config import ConfigError, to_dict
from kvlingua.data.corpus import LANGS, SPLITS, corpus_dir, load_split
from kvlingua.home import data_home

VIEWS = ("en", "es", "ru", "mixed", "parallel", "text")
_BIBLE_VIEWS = ("en", "es", "ru", "mixed", "parallel")
_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CACHE_VERSION = 2
"""Bumped when packing changes, so stale token caches are not reused."""


@dataclass(frozen=True)
class DataConfig:
    """Which text, in which view, for tokenizers, pretraining and Σ training."""

    source: str = "bible"
    """``"bible"`` (the prepared parallel corpus), a local file, dir or glob of .txt/.json/.jsonl/.parquet
    files, or ``"hub:<name>"``."""
    view: str = "mixed"
    """bible: ``en``, ``es``, ``ru``, ``mixed`` or ``parallel``; other sources: ``mixed`` or ``text``
    (both mean the text column)."""
    mix: dict[str, float] = field(default_factory=lambda: {"en": 0.5, "es": 0.25, "ru": 0.25})
    """Share of characters per language in the ``mixed`` bible view; keys among en/es/ru, values sum to 1."""
    text_field: str = "text"
    """Column holding the text for non-bible sources (.txt files always use ``text``)."""
    seed: int = 0
    """Seed of the mixed view's chapter choice and document order."""

    def __post_init__(self):
        if not self.source.strip():
            raise ConfigError("DataConfig.source: must not be empty")
        if self.view not in VIEWS:
            raise ConfigError(f"DataConfig.view: {self.view!r} is not one of {list(VIEWS)}")
        if self.source == "bible" and self.view not in _BIBLE_VIEWS:
            raise ConfigError(f"DataConfig.view: {self.view!r} is not a view of the bible; use one of "
                              f"{list(_BIBLE_VIEWS)}")
        if self.source != "bible" and self.view not in ("mixed", "text"):
            raise ConfigError(f"DataConfig.view: source {self.source!r} has one text column; view must be "
                              f"'mixed' or 'text', not {self.view!r}")
        unknown = sorted(set(self.mix) - set(LANGS))
        if unknown:
            raise ConfigError(f"DataConfig.mix: unknown language(s) {unknown}; valid are {list(LANGS)}")
        if not self.mix or any(not isinstance(v, (int, float)) or v < 0 for v in self.mix.values()):
            raise ConfigError(f"DataConfig.mix: needs at least one language and no negative share, got {self.mix}")
        if abs(sum(self.mix.values()) - 1.0) > 1e-6:
            raise ConfigError(f"DataConfig.mix: shares must sum to 1, got {sum(self.mix.values()):.6g} ({self.mix})")
        if not self.text_field:
            raise ConfigError("DataConfig.text_field: must not be empty")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


# ---------------------------------------------------------------------------------------------- bible
def bible_chapters(split: str) -> list[tuple[int, int, dict[str, str]]]:
    """``(book, chapter, {lang: chapter text})`` of a split, canonical order; verses joined by spaces."""
    table = load_split(split).to_dict()
    chapters: dict[tuple[int, int], dict[str, list[str]]] = {}
    for i, (book, chapter) in enumerate(zip(table["book"], table["chapter"])):
        texts = chapters.setdefault((book, chapter), {lang: [] for lang in LANGS})
        for lang in LANGS:
            texts[lang].append(table[lang][i])
    return [(b, c, {lang: " ".join(v) for lang, v in texts.items()}) for (b, c), texts in sorted(chapters.items())]


def _mixed(chapters: list[dict[str, str]], mix: dict[str, float], seed: int) -> list[str]:
    """Chapters per language in proportion ``mix`` by characters, as much text as possible; shuffled."""
    rng = random.Random(seed)
    langs = [lang for lang in LANGS if mix.get(lang, 0) > 0]
    avail = {lang: sum(len(ch[lang]) for ch in chapters) for lang in langs}
    total = min(avail[lang] / mix[lang] for lang in langs)  # characters the mix can reach
    docs = []
    for lang in langs:
        order = list(range(len(chapters)))
        rng.shuffle(order)
        budget, used = mix[lang] * total, 0
        for i in order:
            n = len(chapters[i][lang])
            if used + n / 2 > budget:  # take a chapter while that brings the count closer to the budget
                continue
            docs.append(chapters[i][lang])
            used += n
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------------------------------------- other sources
def _local_files(source: str) -> list[Path]:
    """The .txt/.json/.jsonl/.parquet files of a local source: a file, a directory (recursive) or a glob."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*"))
    else:
        files = [path] if path.is_file() else sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    files = [p for p in files if p.is_file() and p.suffix in _FILE_BUILDERS]
    if not files:
        raise FileNotFoundError(f"DataConfig.source {source!r}: no .txt/.json/.jsonl/.parquet files found")
    return files


def _load_source(cfg: DataConfig):
    """The ``datasets.DatasetDict`` of a non-bible source: split files (or folders) named train /
    validation / test, else every file as ``train``."""
    import datasets

    cache_dir = str(data_home() / "hf_datasets")
    if cfg.source.startswith("hub:"):
        return datasets.load_dataset(cfg.source[4:], cache_dir=cache_dir)
    files = _local_files(cfg.source)
    builders = {_FILE_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise ConfigError(f"DataConfig.source {cfg.source!r}: mixes file kinds {sorted(builders)}; use one kind")
    builder = builders.pop()
    by_split = {s: [str(p) for p in files if p.stem == s or p.parent.name == s] for s in SPLITS}
    if by_split["train"]:  # files named (or in folders named) train / validation / test
        data_files = {s: f for s, f in by_split.items() if f}
    else:
        data_files = {"train": [str(p) for p in files]}
    extra = {"sample_by": "paragraph"} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=data_files, cache_dir=cache_dir, **extra)


_NOTED: set[tuple[str, tuple[str, ...]]] = set()


def _carved(cfg: DataConfig, loaded) -> tuple[str, ...]:
    """The held-out splits the source lacks, carved from its train split (see the module docstring)."""
    if "train" not in loaded:
        return ()
    carved = tuple(s for s in SPLITS if s != "train" and s not in loaded)
    if carved and (cfg.source, carved) not in _NOTED:
        _NOTED.add((cfg.source, carved))
        logging.getLogger(__name__).warning("data: %s", _note(cfg.source, carved))
    return carved


def _note(source: str, carved: tuple[str, ...]) -> str:
    share = {"validation": 5, "test": 5}
    parts = ", ".join(f"{s} = {share[s]}% of train" for s in carved)
    return (f"{source!r} has no {' or '.join(carved)} split: carved from its train split by a hash of each "
            f"document's text ({parts}; train keeps the rest)")


def carve_note(cfg: DataConfig) -> str | None:
    """One line saying which held-out splits of ``cfg.source`` are carved from its train split, or None
    (the bible, or a source that has them all)."""
    if cfg.source == "bible":
        return None
    carved = _carved(cfg, _load_source(cfg))
    return _note(cfg.source, carved) if carved else None


def _source_split(cfg: DataConfig, split: str):
    """The ``datasets.Dataset`` holding ``split`` of a non-bible source, and the buckets (of :func:`_carve`)
    to keep from it: None to keep every document."""
    loaded = _load_source(cfg)
    carved = _carved(cfg, loaded)
    if split in carved:
        return loaded["train"], {split}
    if split == "train" and carved:
        return loaded["train"], set(SPLITS) - set(carved)
    if split not in loaded:
        raise ConfigError(f"DataConfig.source {cfg.source!r}: has splits {sorted(loaded)}, not {split!r}")
    return loaded[split], None


def _carve(text: str) -> str:
    """90/5/5 split of a document by a hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % 1000
    return "train" if bucket < 900 else "validation" if bucket < 950 else "test"


def documents(cfg: DataConfig, split: str) -> list[str]:
    """The documents of ``split`` under ``cfg`` (see the module docstring for each view)."""
    _check_split(split)
    if cfg.source == "bible":
        chapters = [texts for _, _, texts in bible_chapters(split)]
        if cfg.view in LANGS:
            return [ch[cfg.view] for ch in chapters]
        if cfg.view == "parallel":
            return [ch[lang] for ch in chapters for lang in LANGS]
        return _mixed(chapters, cfg.mix, cfg.seed)
    table, keep = _source_split(cfg, split)
    if cfg.text_field not in table.column_names:
        raise ConfigError(f"DataConfig.text_field {cfg.text_field!r} is not a column of {cfg.source!r}; "
                         f"columns are {table.column_names}")
    docs = [t.strip() for t in table[cfg.text_field] if isinstance(t, str) and t.strip()]
    return [t for t in docs if _carve(t) in keep] if keep is not None else docs


# ---------------------------------------------------------------------------------------------- token caches
def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's full serialisation (vocabulary, merges, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def source_fingerprint(cfg: DataConfig) -> str:
    """What the source's content depends on: the corpus manifest, or local files' sizes and mtimes."""
    if cfg.source == "bible":
        manifest = corpus_dir() / "manifest.json"
        if not manifest.is_file():
            load_split("train")  # prepares the corpus
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    if cfg.source.startswith("hub:"):
        return cfg.source
    return json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in _local_files(cfg.source)])


def cached_tensors(kind: str, key: dict, build) -> dict[str, torch.Tensor]:
    """Tensors stored under ``data_home()/tokens/<kind>-<hash>.safetensors``, built once by ``build()``."""
    digest = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()[:24]
    path = data_home() / "tokens" / f"{kind}-{digest}.safetensors"
    if path.is_file():
        try:
            return {k: v.long() for k, v in load_file(path).items()}
        except (OSError, ValueError, SafetensorError):  # a torn or foreign file is rebuilt below
            path.unlink(missing_ok=True)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{kind}-", suffix=".tmp")
    os.close(fd)
    save_file({k: v.to(torch.int32).contiguous() for k, v in tensors.items()}, tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
    os.replace(tmp, path)
    return tensors


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def token_chunks(cfg: DataConfig, tokenizer, split: str, seq_len: int) -> torch.LongTensor:
    """Documents packed into rows: ``[N, seq_len]`` token ids.

    Each document's ids are followed by ``eos``; the concatenation is cut into
    ``N = total // seq_len`` rows (the remainder is dropped). Deterministic; cached under
    ``data_home()/tokens/`` keyed by the tokenizer's content hash, cfg, split and seq_len.
    """
    _check_split(split)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token")
    key = {"tok": tokenizer_hash(tokenizer), "cfg": to_dict(cfg), "split": split, "seq_len": seq_len,
           "src": source_fingerprint(cfg)}

    def build():
        ids = []
        for doc in _encode(tokenizer, documents(cfg, split)):
            ids.extend(doc)
            ids.append(tokenizer.eos_token_id)
        n = len(ids) // seq_len
        return {"ids": torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)}  # [N, seq_len]

    return cached_tensors("chunks", key, build)["ids"]


def parallel_chunks(cfg: DataConfig, tokenizer, split: str, prefix_len: int, suffix_len: int,
                    langs: Sequence[str]) -> dict[str, torch.LongTensor]:
    """Aligned passages of the bible: ``{lang: [N, P+S]}``; row n is the same passage in every language,
    cut into prefix and suffix at the **same verse boundary** in every language.

    A passage is a run of consecutive verses (crossing chapter ends, never book ends or a
    gap left by another split) in two parts: *prefix verses*, just enough that every language
    has ``prefix_len`` tokens, then *suffix verses*, just enough that every language has
    ``suffix_len`` tokens. Each language's row is the **last** ``prefix_len`` tokens of its
    prefix verses followed by the **first** ``suffix_len`` tokens of its suffix verses, so
    every prefix ends, and every suffix starts, on the same verse boundary: no verse is in
    both a prefix (of any language) and a suffix (of any language) of one row, whichever
    language needs more tokens per verse. The next passage starts at the next verse.
    Leftover verses at a run's end are dropped.
    """
    _check_split(split)
    if cfg.source != "bible":
        raise ValueError(f"parallel_chunks needs the bible source, got {cfg.source!r}")
    langs = list(langs)
    if not langs or set(langs) - set(LANGS) or len(set(langs)) != len(langs):
        raise ValueError(f"langs must be distinct languages among {list(LANGS)}, got {langs}")
    if prefix_len < 1 or suffix_len < 1:
        raise ValueError(f"prefix_len and suffix_len must be positive, got {prefix_len} and {suffix_len}")
    key = {"tok": tokenizer_hash(tokenizer), "src": source_fingerprint(cfg), "split": split,
           "prefix_len": prefix_len, "suffix_len": suffix_len, "langs": langs, "cut": "verse-boundary"}
    return cached_tensors("parallel", key, lambda: _build_parallel(tokenizer, split, prefix_len, suffix_len, langs))


VerseKey = tuple[int, int, int]
"""``(book, chapter, verse)``."""


def passages(split: str, tokenizer, prefix_len: int, suffix_len: int,
             langs: Sequence[str]) -> list[tuple[list[VerseKey], list[VerseKey]]]:
    """``(prefix verse keys, suffix verse keys)`` of each row of :func:`parallel_chunks`, in order."""
    return [(pre, suf) for pre, suf, _ in _passage_ids(tokenizer, split, prefix_len, suffix_len, list(langs))]


def _passage_ids(tokenizer, split: str, prefix_len: int, suffix_len: int, langs: list[str]):
    table = load_split(split).to_dict()
    keys = list(zip(table["book"], table["chapter"], table["verse"]))
    # Each verse is encoded with its leading space, as it reads inside a passage.
    ids = {lang: _encode(tokenizer, [" " + t for t in table[lang]]) for lang in langs}

    def follows(k: int) -> bool:  # verse k continues the run of verse k-1 (same book, same or next chapter)
        (b0, c0, _), (b1, c1, _) = keys[k - 1], keys[k]
        return b1 == b0 and c1 in (c0, c0 + 1)

    def take(start: int, need: int) -> tuple[int, dict[str, list[int]], bool]:
        """Verses from ``start`` until every language has ``need`` tokens: (end, tokens, complete)."""
        got = {lang: [] for lang in langs}
        end = start
        while end < len(keys) and any(len(got[lang]) < need for lang in langs):
            if end > start and not follows(end):
                break
            for lang in langs:
                got[lang].extend(ids[lang][end])
            end += 1
        return end, got, all(len(got[lang]) >= need for lang in langs)

    out, start = [], 0
    while start < len(keys):
        mid, pre, ok = take(start, prefix_len)
        if not ok:
            start = mid
            continue
        if mid >= len(keys) or not follows(mid):  # the suffix must continue the same run
            start = mid
            continue
        end, suf, ok = take(mid, suffix_len)
        if ok:
            row = {lang: pre[lang][-prefix_len:] + suf[lang][:suffix_len] for lang in langs}
            out.append((keys[start:mid], keys[mid:end], row))
        start = end
    return out


def _build_parallel(tokenizer, split: str, prefix_len: int, suffix_len: int, langs: list[str]) -> dict[str, torch.Tensor]:
    rows = _passage_ids(tokenizer, split, prefix_len, suffix_len, langs)
    n, seq = len(rows), prefix_len + suffix_len
    return {lang: torch.tensor([r[lang] for _, _, r in rows], dtype=torch.long).reshape(n, seq)  # [N, P+S]
            for lang in langs}
