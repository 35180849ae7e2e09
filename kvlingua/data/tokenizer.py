"""The pool's shared tokenizer: a byte-level BPE trained with ``tokenizers`` on the mixed view.

Every model of a pool shares this tokenizer (KV caches are translated position for
position). Special tokens, in this order from id 0: ``<pad> <bos> <eos> <unk>``. Encoding
adds no special tokens by itself; :func:`kvlingua.data.views.token_chunks` ends each
document with ``<eos>``, and callers that want ``<bos>`` prepend it. Byte-level BPE covers
every string, so ``<unk>`` is never produced. The directory is a ``save_pretrained``
tokenizer (``tokenizer.json`` ...) plus ``kvlingua_tokenizer.json`` recording how it was trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvlingua.config import to_dict
from kvlingua.data.corpus import file_lock
from kvlingua.data.views import DataConfig, documents
from kvlingua.home import data_home

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
BYTE_ALPHABET = 256
"""Byte-level BPE starts from one token per byte."""
INFO_FILE = "kvlingua_tokenizer.json"


def train_tokenizer(cfg: DataConfig, vocab_size: int = 8192, out_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of exactly ``vocab_size`` tokens on ``documents(cfg, "train")`` (mixed view).

    For the bible the view is forced to ``mixed`` (all languages the mix names). Saved with
    ``save_pretrained`` into ``out_dir`` when given. Raises ValueError when the vocabulary is
    smaller than bytes plus specials, or when the corpus is too small to learn that many merges.
    """
    floor = BYTE_ALPHABET + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size must exceed {floor} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
                         f"got {vocab_size}")
    train_cfg = replace(cfg, view="mixed")
    docs = documents(train_cfg, "train")
    if not docs:
        raise ValueError(f"no training documents in source {cfg.source!r}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(docs, trainer=trainer, length=len(docs))
    if bpe.get_vocab_size() != vocab_size:
        raise ValueError(f"the {cfg.source!r} training text yields only {bpe.get_vocab_size()} tokens, "
                         f"not vocab_size={vocab_size}; use a smaller vocabulary or more text")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>",
                                  eos_token="<eos>", unk_token="<unk>")
    if out_dir is not None:
        out = Path(out_dir)
        tok.save_pretrained(str(out))
        info = {"vocab_size": vocab_size, "data": to_dict(train_cfg), "documents": len(docs),
                "characters": sum(map(len, docs))}
        (out / INFO_FILE).write_text(json.dumps(info, indent=1))
    return tok


def tokenizer_dir(vocab_size: int = 8192, source: str = "bible", home: Path | None = None) -> Path:
    """``data_home()/tokenizers/<source>-v<vocab_size>`` (a path-like source becomes a slug plus a short hash)."""
    name = source
    if not re.fullmatch(r"[A-Za-z0-9._-]+", source):
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", source).strip("_.")[-40:]
        name = f"{slug}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
    return Path(home or data_home()) / "tokenizers" / f"{name}-v{vocab_size}"


def is_tokenizer_dir(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def ensure_tokenizer(cfg: DataConfig, vocab_size: int = 8192) -> Path:
    """The tokenizer directory for ``cfg.source`` and ``vocab_size``, trained once (atomically) and then reused."""
    path = tokenizer_dir(vocab_size, cfg.source)
    if is_tokenizer_dir(path):
        return path
    with file_lock(path.parent / f".{path.name}.lock"):  # concurrent callers wait, then reuse
        if is_tokenizer_dir(path):
            return path
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
        tmp.chmod(0o755)  # mkdtemp makes it private; the tokenizer is shared
        try:
            train_tokenizer(cfg, vocab_size, tmp)
            if path.exists():  # an incomplete directory from an interrupted run
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer directory written by :func:`train_tokenizer` / :func:`ensure_tokenizer`."""
    path = Path(path)
    if not is_tokenizer_dir(path):
        raise FileNotFoundError(f"no tokenizer at {path} (expected tokenizer.json and tokenizer_config.json); "
                                f"create one with `kvlingua data tokenizer`")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
