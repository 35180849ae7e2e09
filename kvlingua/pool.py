"""A trained pool on disk, and its verified loading.

A pool directory holds::

    pool.json                      {"format": 1, "space": <SpaceConfig>, "members": [...], ...extra}
    adapters-<name>.safetensors    IN/OUT adapters of each model (tensor names in.* / out.*)
    tokenizer/                     the pool's shared tokenizer (optional)

Each member entry records ``name``, ``path`` (the frozen model's ``save_pretrained``
directory; a relative path resolves against the pool directory), ``summary`` (its
:class:`~kvlingua.cache.ArchSummary`), ``fingerprint`` (:func:`kvlingua.cache.fingerprint`
of its weights) and ``params`` (adapter parameter counts). :func:`load_pool` refuses a
pool whose models or adapter files no longer match what was recorded, with a
:class:`PoolMismatchError` naming the model and what differs.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from kvlingua.cache import ArchSummary, arch_summary, fingerprint
from kvlingua.config import ConfigError, to_dict
from kvlingua.models import load_frozen
from kvlingua.space import SharedSpace, adapter_file, summary_from_dict

POOL_FILE = "pool.json"
POOL_FORMAT = 1
TOKENIZER_DIR = "tokenizer"
_RESERVED = ("format", "space", "members")


class PoolMismatchError(ValueError):
    """A pool directory does not match its models or its own config (names the model and what differs)."""


@dataclass(frozen=True)
class PoolMember:
    """One frozen model of a pool."""

    name: str
    """Name of the model inside the pool (used for adapter file names and paths ``i -> j``)."""
    path: str
    """Its ``save_pretrained`` directory; relative paths resolve against the pool directory."""
    summary: ArchSummary
    """Cache layout the adapters were built for."""
    fingerprint: str
    """Digest of its weights (:func:`kvlingua.cache.fingerprint`)."""


@dataclass
class LoadedPool:
    """A pool read back by :func:`load_pool`.

    Attributes:
        space: the shared space with every model's adapters loaded.
        members: the pool's models in order; ``path`` resolved to an absolute path.
        models: name -> frozen model (empty when loaded with ``load_models=False``).
        tokenizer: the pool's tokenizer, or ``None`` if the pool has none.
        root: the pool directory.
    """

    space: SharedSpace
    members: list[PoolMember]
    models: dict[str, PreTrainedModel]
    tokenizer: Any | None
    root: Path


def save_pool(out_dir: str | Path, space: SharedSpace, members: list[PoolMember],
              tokenizer_dir: str | Path | None = None, extra: dict | None = None) -> Path:
    """Write a pool directory: ``pool.json``, one adapter file per model, the tokenizer.

    Args:
        out_dir: the pool directory (created if needed).
        space: trained shared space; its member names, order and summaries must equal ``members``.
        members: the pool's models in the space's order.
        tokenizer_dir: a tokenizer directory to copy to ``out_dir/tokenizer``.
        extra: additional JSON-serialisable top-level keys for ``pool.json`` (e.g. training metadata);
            they may not override ``format``, ``space`` or ``members``.

    Returns the pool directory.
    """
    names = [m.name for m in members]
    if names != space.names:
        raise ValueError(f"pool members {names} do not match the space's models {space.names} (same order)")
    for m in members:
        if m.summary != space.members[m.name]:
            diffs = "; ".join(m.summary.diff(space.members[m.name]))
            raise ValueError(f"model {m.name!r}: summary differs from the space's: {diffs}")
    clash = sorted(set(extra or {}) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite reserved pool.json keys {list(_RESERVED)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = space.param_counts()
    meta = {
        "format": POOL_FORMAT,
        "space": to_dict(space.cfg),
        "members": [
            {"name": m.name, "path": str(m.path), "summary": m.summary.to_dict(), "fingerprint": m.fingerprint,
             "params": counts[m.name]}
            for m in members
        ],
        **(extra or {}),
    }
    try:
        text = json.dumps(meta, indent=2) + "\n"
    except TypeError as e:
        raise ValueError(f"pool.json extra keys must be JSON-serialisable: {e}") from e
    for m in members:
        save_file(space.adapter_state(m.name), str(out / adapter_file(m.name)))
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if not src.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {src}")
        shutil.copytree(src, out / TOKENIZER_DIR, dirs_exist_ok=True)
    (out / POOL_FILE).write_text(text)
    return out


def read_pool_meta(pool_dir: str | Path) -> dict:
    """The parsed ``pool.json`` of ``pool_dir``, with its format checked."""
    root = Path(pool_dir)
    meta_file = root / POOL_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{root}: not a pool directory (no {POOL_FILE})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != POOL_FORMAT:
        raise PoolMismatchError(f"{meta_file}: unsupported format {meta.get('format')!r} (expected {POOL_FORMAT})")
    for key in _RESERVED:
        if key not in meta:
            raise PoolMismatchError(f"{meta_file}: missing key {key!r}")
    return meta


def _members(meta: dict, root: Path) -> list[PoolMember]:
    out = []
    for entry in meta["members"]:
        name = entry.get("name")
        missing = [k for k in ("name", "path", "summary", "fingerprint") if k not in entry]
        if missing:
            raise PoolMismatchError(f"{root / POOL_FILE}: member {name!r} lacks {missing}")
        path = Path(entry["path"])
        path = path if path.is_absolute() else (root / path)
        try:
            summary = summary_from_dict(entry["summary"], f"model {name!r}")
        except (TypeError, ValueError) as e:
            raise PoolMismatchError(str(e)) from e
        out.append(PoolMember(name, str(path.resolve()), summary, entry["fingerprint"]))
    return out


def verify_member(member: PoolMember, model: PreTrainedModel | None = None) -> None:
    """Check a loaded ``model`` (or, without one, its checkpoint's ``config.json``) against ``member``.

    Raises:
        FileNotFoundError: the member's checkpoint directory does not exist (named with the model).
        PoolMismatchError: architecture fields differ (``model 'seed-1': num_layers: 2 != 4``) or the
            weights' fingerprint differs (``model 'seed-2': fingerprint 1a2b.. != 9f8e.. (weights changed)``).
    """
    if model is None and not Path(member.path).is_dir():
        raise FileNotFoundError(f"model {member.name!r}: checkpoint directory not found: {member.path}")
    actual = arch_summary(model if model is not None else member.path)
    diffs = actual.diff(member.summary)
    if diffs:
        raise PoolMismatchError(f"model {member.name!r}: {'; '.join(diffs)} (checkpoint {member.path} != pool.json)")
    if model is not None:
        fp = fingerprint(model)
        if fp != member.fingerprint:
            raise PoolMismatchError(
                f"model {member.name!r}: fingerprint {fp[:8]}.. != {member.fingerprint[:8]}.. "
                f"(weights changed since the pool was trained; checkpoint {member.path})"
            )


def load_pool(pool_dir: str | Path, *, device: str | torch.device = "cpu", load_models: bool = True,
              verify: bool = True, dtype: torch.dtype | None = None) -> LoadedPool:
    """Load a pool directory written by :func:`save_pool`.

    Args:
        pool_dir: the pool directory.
        device: where the adapters and models go.
        load_models: load each frozen model with :func:`kvlingua.models.load_frozen` (safetensors only).
            Without models, each checkpoint's ``config.json`` is still checked against the recorded
            summary when ``verify`` is on (the fingerprint needs the weights).
        verify: check each model's architecture and weight fingerprint against ``pool.json``.
        dtype: cast the models to this dtype *after* verification (fingerprints are of the fp32
            weights as loaded); ``None`` keeps fp32. The adapters stay fp32.

    Raises:
        PoolMismatchError: a model's architecture or fingerprint, or an adapter tensor's name or shape,
            differs from what the pool records; the message names the model and what differs.
        FileNotFoundError: the pool, an adapter file or a model checkpoint is missing (named).
    """
    root = Path(pool_dir).resolve()
    meta = read_pool_meta(root)
    members = _members(meta, root)
    try:
        space = SharedSpace.from_config_dict(meta["space"], [(m.name, m.summary) for m in members])
    except (ConfigError, ValueError) as e:
        raise PoolMismatchError(f"{root / POOL_FILE}: cannot rebuild the shared space: {e}") from e
    for m in members:
        try:
            space.load_adapter_file(m.name, root / adapter_file(m.name))
        except ValueError as e:
            raise PoolMismatchError(str(e)) from e
    space = space.to(device)
    models: dict[str, PreTrainedModel] = {}
    for m in members:
        if not load_models:
            if verify:
                verify_member(m)
            continue
        if not Path(m.path).is_dir():
            raise FileNotFoundError(f"model {m.name!r}: checkpoint directory not found: {m.path}")
        model = load_frozen(m.path, device="cpu")
        if verify:
            verify_member(m, model)
        models[m.name] = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    tokenizer = None
    if (root / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(root / TOKENIZER_DIR), local_files_only=True)
    return LoadedPool(space=space, members=members, models=models, tokenizer=tokenizer, root=root)
