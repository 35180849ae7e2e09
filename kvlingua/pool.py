"""A trained pool on disk and its verified loading.

A pool directory holds::

    pool.json                      {"format": 2, "space": <SpaceConfig>, "members": [...], "tokenizer": ...,
                                    ...extra}
    adapters-<name>.safetensors    IN/OUT adapters of each model (tensor names in.* / out.*)
    tokenizer/                     the pool's shared tokenizer (optional; ``"tokenizer"`` says whether)

Each member entry records ``name``, ``path`` (the frozen model's ``save_pretrained``
directory, written to survive a move: see :func:`kvlingua.pool_members.model_path_record`), ``path_when_saved``
(the absolute directory at save time, tried when ``path`` does not resolve), ``summary``
(its :class:`~kvlingua.cache.ArchSummary`), ``fingerprint`` (:func:`kvlingua.cache.fingerprint`
of its weights), ``adapter_sha256`` (SHA-256 of its adapter file) and ``params`` (adapter
parameter counts). Format 1 files (absolute or pool-relative paths, no adapter digests)
are still read.

:func:`load_pool` refuses a pool that is damaged or no longer matches its models with a
:class:`~kvlingua.pool_members.PoolMismatchError`, and a missing piece with a
:class:`~kvlingua.pool_members.PoolNotFoundError`; both messages start with the file concerned
(``<file>: <what is wrong>``). Finding and checking the members' checkpoints is :mod:`kvlingua.pool_members`.

Where a training run keeps its pools (one per trained space) is :mod:`kvlingua.rundir`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from transformers import PreTrainedModel

from kvlingua.cache import check_same_vocab
from kvlingua.config import ConfigError, to_dict
from kvlingua.pool_members import (POOL_FILE, PoolMember, PoolMismatchError, PoolNotFoundError, load_member_model,
                                   model_path_record, resolve_model, verify_member)
from kvlingua.space import SharedSpace, adapter_file, summary_from_dict

POOL_FORMAT = 2
"""Written format; 1 (absolute or pool-relative model paths, no adapter digests) is still read."""
READ_FORMATS = (1, 2)
TOKENIZER_DIR = "tokenizer"
MEMBER_TOKENIZERS = "tokenizers"
"""Where a pool that mixes tokenizers keeps each member's (``tokenizers/<member>``)."""
_RESERVED = ("format", "space", "members", "tokenizer")


@dataclass
class LoadedPool:
    """A pool read back by :func:`load_pool`.

    Attributes:
        space: the shared space with every model's adapters loaded.
        members: the pool's models in order; ``path`` resolved to an absolute path.
        models: name -> frozen model (empty when loaded with ``load_models=False``).
        tokenizer: the pool's tokenizer (the first member's where members tokenize differently), or ``None``.
        root: the pool directory.
        meta: the parsed ``pool.json`` (including the extra keys the writer added, e.g. ``job``).
    """

    space: SharedSpace
    members: list[PoolMember]
    models: dict[str, PreTrainedModel]
    tokenizer: Any | None
    root: Path
    meta: dict = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)
    """member -> its tokenizer (each member's own where the pool mixes tokenizers, else the pool's one for every
    member; empty for a pool saved without a tokenizer)."""

    @property
    def mixed_tokenizers(self) -> bool:
        """Whether members tokenize differently (text is then the interface between them)."""
        return any("tokenizer" in e for e in self.meta.get("members", []))


# ---------------------------------------------------------------- writing
def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_pool(out_dir: str | Path, space: SharedSpace, members: list[PoolMember],
              tokenizer_dir: str | Path | None = None, extra: dict | None = None,
              tokenizers: dict[str, str | Path] | None = None) -> Path:
    """Write a pool directory: ``pool.json``, one adapter file per model, the tokenizer.

    Args:
        out_dir: the pool directory (created if needed).
        space: trained shared space; its member names, order and summaries must equal ``members``.
        members: the pool's models in the space's order (a relative ``path`` is relative to ``out_dir``);
            their paths are recorded with :func:`model_path_record`.
        tokenizer_dir: a tokenizer directory to copy to ``out_dir/tokenizer``.
        extra: additional JSON-serialisable top-level keys for ``pool.json`` (e.g. training metadata);
            they may not override ``format``, ``space``, ``members`` or ``tokenizer``.
        tokenizers: member -> its own tokenizer directory, for a pool whose members tokenize differently: each
            is copied to ``out_dir/tokenizers/<member>`` and recorded in its member entry (``tokenizer``).

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
    try:
        json.dumps(extra or {})
    except TypeError as e:
        raise ValueError(f"pool.json extra keys must be JSON-serialisable: {e}") from e
    for d in [tokenizer_dir, *(tokenizers or {}).values()]:
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {d}")
    missing = [m.name for m in members if tokenizers is not None and m.name not in tokenizers]
    if missing:
        raise ValueError(f"tokenizers: member(s) {missing} have none; a pool that mixes tokenizers records each member's")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = space.param_counts()
    entries = []
    for m in members:
        save_file(space.adapter_state(m.name), str(out / adapter_file(m.name)))
        model_dir = (out / m.path).resolve()  # an absolute m.path stays itself
        entries.append({"name": m.name, "path": model_path_record(model_dir, out), "path_when_saved": str(model_dir),
                        "summary": m.summary.to_dict(), "fingerprint": m.fingerprint,
                        "adapter_sha256": file_sha256(out / adapter_file(m.name)), "params": counts[m.name]})
        if tokenizers is not None:
            shutil.copytree(Path(tokenizers[m.name]), out / MEMBER_TOKENIZERS / m.name, dirs_exist_ok=True)
            entries[-1]["tokenizer"] = f"{MEMBER_TOKENIZERS}/{m.name}"
    if tokenizer_dir is not None:
        shutil.copytree(Path(tokenizer_dir), out / TOKENIZER_DIR, dirs_exist_ok=True)
    meta = {"format": POOL_FORMAT, "space": to_dict(space.cfg), "members": entries,
            "tokenizer": TOKENIZER_DIR if tokenizer_dir is not None else None, **(extra or {})}
    (out / POOL_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ---------------------------------------------------------------- reading
def read_pool_meta(pool_dir: str | Path) -> dict:
    """The parsed ``pool.json`` of ``pool_dir``, with its format, keys and member entries checked.

    Raises:
        PoolNotFoundError: no ``pool.json`` in ``pool_dir``.
        PoolMismatchError: not valid JSON, an unknown format, a missing key or a malformed member entry.
    """
    root = Path(pool_dir)
    meta_file = root / POOL_FILE
    if not meta_file.is_file():
        raise PoolNotFoundError(f"{root}: not a pool directory (no {POOL_FILE})")
    try:
        meta = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PoolMismatchError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise PoolMismatchError(f"{meta_file}: top level must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") not in READ_FORMATS:
        raise PoolMismatchError(f"{meta_file}: unsupported format {meta.get('format')!r} "
                                f"(this version reads {list(READ_FORMATS)})")
    for key in ("space", "members"):
        if key not in meta:
            raise PoolMismatchError(f"{meta_file}: missing key {key!r}")
    if not isinstance(meta["members"], list) or not meta["members"]:
        raise PoolMismatchError(f"{meta_file}: 'members' must be a non-empty list")
    needed = ("name", "path", "summary", "fingerprint") + (("adapter_sha256",) if meta["format"] >= 2 else ())
    for i, entry in enumerate(meta["members"]):
        if not isinstance(entry, dict):
            raise PoolMismatchError(f"{meta_file}: members[{i}] must be an object")
        missing = [k for k in needed if k not in entry]
        if missing:
            raise PoolMismatchError(f"{meta_file}: members[{i}] ({entry.get('name')!r}) lacks {missing}")
        bad = [k for k in needed if k != "summary" and not isinstance(entry[k], str)]
        if bad:
            raise PoolMismatchError(f"{meta_file}: members[{i}] ({entry['name']!r}): {bad} must be strings")
    return meta


def _members(meta: dict, root: Path, models_root: str | Path | None) -> tuple[list[PoolMember], dict[str, str]]:
    """Members with resolved paths, and name -> why its model directory was not found (when it was not)."""
    members, missing = [], {}
    for entry in meta["members"]:
        try:
            summary = summary_from_dict(entry["summary"], f"model {entry['name']!r}")
        except (TypeError, ValueError) as e:
            raise PoolMismatchError(f"{root / POOL_FILE}: {e}") from e
        path, why = resolve_model(entry, root, models_root)
        if why is not None:
            missing[entry["name"]] = why
        members.append(PoolMember(entry["name"], str(path), summary, entry["fingerprint"]))
    return members, missing


def _load_adapters(space: SharedSpace, meta: dict, root: Path) -> None:
    """Each member's adapter file, its SHA-256 checked against pool.json, then its tensor names and shapes."""
    for entry in meta["members"]:
        name = entry["name"]
        f = root / adapter_file(name)
        if not f.is_file():
            raise PoolNotFoundError(f"{f}: adapter file of model {name!r} not found")
        recorded = entry.get("adapter_sha256")
        if recorded is not None:
            actual = file_sha256(f)
            if actual != recorded:
                raise PoolMismatchError(f"{f}: SHA-256 {actual[:12]}.. != {recorded[:12]}.. recorded in "
                                        f"{POOL_FILE} (the adapter file of model {name!r} changed or is damaged)")
        try:
            space.load_adapter_file(name, f)
        except SafetensorError as e:
            raise PoolMismatchError(f"{f}: not a readable safetensors file ({e})") from e
        except ValueError as e:
            raise PoolMismatchError(f"{f}: {e}") from e


def _load_tokenizer(meta: dict, root: Path, sub: str = TOKENIZER_DIR) -> Any | None:
    tok_dir = root / sub
    if meta.get("tokenizer") is None and not tok_dir.is_dir():
        return None  # the pool was saved without one (format 1 pools say nothing: optional)
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise PoolNotFoundError(f"{tok_dir}: the pool's tokenizer is missing (no tokenizer_config.json)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise PoolMismatchError(f"{tok_dir}: cannot load the pool's tokenizer ({e})") from e


def load_pool(pool_dir: str | Path, *, device: str | torch.device = "cpu", load_models: bool = True,
              verify: bool = True, dtype: torch.dtype | None = None,
              models_root: str | Path | None = None) -> LoadedPool:
    """Load a pool directory written by :func:`save_pool`.

    Each adapter file's SHA-256 is checked against ``pool.json`` (format 2) before it is read.
    A model is looked for where ``pool.json`` records it (``$KVLINGUA_HOME/...`` under today's
    :func:`~kvlingua.home.data_home`, a relative path against the pool directory), then where it was
    when the pool was saved; with ``models_root``, only in ``models_root/<its directory name>`` and
    ``models_root/<member name>``.

    Args:
        pool_dir: the pool directory.
        device: where the adapters and models go.
        load_models: load each frozen model with :func:`kvlingua.models.load_frozen` (safetensors only).
            Without models, each checkpoint's ``config.json`` is still checked against the recorded
            summary when ``verify`` is on (the fingerprint needs the weights).
        verify: check each model's architecture and weight fingerprint against ``pool.json``.
        dtype: cast the models to this dtype *after* verification (fingerprints are of the fp32
            weights as loaded); ``None`` keeps fp32. The adapters stay fp32.
        models_root: a directory the pool's models were moved to.

    Raises:
        PoolMismatchError: ``pool.json`` is unreadable, an adapter file is damaged (SHA-256, safetensors,
            tensor names or shapes), or a model's architecture or fingerprint differs from what the pool
            records; the message starts with the file and names the model.
        PoolNotFoundError: the pool, an adapter file, the tokenizer or a model checkpoint is missing (named).
    """
    root = Path(pool_dir).resolve()
    meta = read_pool_meta(root)
    members, missing = _members(meta, root, models_root)
    mixed = any("tokenizer" in e for e in meta.get("members", []))
    try:
        if not mixed:  # one tokenizer: every member reads the same ids
            check_same_vocab({m.name: m.summary for m in members})
        space = SharedSpace.from_config_dict(meta["space"], [(m.name, m.summary) for m in members])
    except (ConfigError, ValueError) as e:
        raise PoolMismatchError(f"{root / POOL_FILE}: cannot rebuild the shared space: {e}") from e
    _load_adapters(space, meta, root)
    space = space.to(device)
    tokenizer = _load_tokenizer(meta, root)
    if mixed:
        lacking = [e["name"] for e in meta["members"] if "tokenizer" not in e]
        if lacking:
            raise PoolMismatchError(f"{root / POOL_FILE}: the members tokenize differently, but {lacking} record no "
                                    "tokenizer")
        tokenizers = {e["name"]: _load_tokenizer({"tokenizer": e["tokenizer"]}, root, e["tokenizer"])
                      for e in meta["members"]}
        tokenizer = tokenizers[members[0].name]
    else:
        tokenizers = {m.name: tokenizer for m in members} if tokenizer is not None else {}
    models: dict[str, PreTrainedModel] = {}
    for m in members:
        if (load_models or verify) and m.name in missing:
            raise PoolNotFoundError(missing[m.name])
        if not load_models:
            if verify:
                verify_member(m)
            continue
        model = load_member_model(m, verify=verify)
        models[m.name] = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    space.bind_tokens(models)  # a token readout reads each member's own embeddings (none without models)
    return LoadedPool(space=space, members=members, models=models, tokenizer=tokenizer, root=root, meta=meta,
                      tokenizers=tokenizers)
