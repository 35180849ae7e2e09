"""A pool's frozen members: where their checkpoints are and whether they are still the models it was trained with.

Each member entry of ``pool.json`` (:mod:`kvlingua.pool`) records its model directory so that the pool can move
(:func:`model_path_record`: under ``$KVLINGUA_HOME``, beside the pool, or absolute), its cache layout and the
fingerprint of its weights. :func:`resolve_model` finds the directory again; :func:`verify_member` and
:func:`load_member_model` refuse a checkpoint whose layout or weights differ, with a :class:`PoolMismatchError`,
and a missing one with a :class:`PoolNotFoundError`; both messages start with the directory concerned.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError
from transformers import PreTrainedModel

from kvlingua.cache import ArchSummary, arch_summary, fingerprint
from kvlingua.config import KvlinguaError
from kvlingua.home import data_home
from kvlingua.models import load_frozen

POOL_FILE = "pool.json"
"""The pool directory's manifest (:mod:`kvlingua.pool`)."""
HOME_PREFIX = "$KVLINGUA_HOME/"
"""A recorded model path starting with this lies under :func:`kvlingua.home.data_home` where it is read."""


class PoolMismatchError(KvlinguaError, ValueError):
    """A pool directory is damaged or no longer matches its models (names the file and what differs)."""


class PoolNotFoundError(KvlinguaError, FileNotFoundError):
    """A pool directory, or a file or model it needs, is missing (names where it was looked for)."""


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


def model_path_record(model_dir: str | Path, pool_dir: str | Path) -> str:
    """How ``pool.json`` records a model directory so the pool can move.

    ``$KVLINGUA_HOME/<relative path>`` when the model lies under :func:`kvlingua.home.data_home`;
    a path relative to the pool directory when the model lies beside the pool (under the pool
    directory's parent, e.g. in the same run directory); else the absolute path.
    """
    model_dir, pool_dir = Path(model_dir).resolve(), Path(pool_dir).resolve()
    home = data_home().resolve()
    if model_dir.is_relative_to(home):
        return HOME_PREFIX + model_dir.relative_to(home).as_posix()
    if model_dir.is_relative_to(pool_dir.parent):
        return Path(os.path.relpath(model_dir, pool_dir)).as_posix()
    return str(model_dir)


def _model_candidates(entry: dict, root: Path, models_root: str | Path | None) -> list[Path]:
    """Directories to look for a member's model in, best first (see :func:`load_pool`)."""
    recorded = entry["path"]
    if models_root is not None:
        base = Path(models_root).expanduser().resolve()
        found = [base / Path(recorded).name, base / entry["name"]]
    else:
        if recorded.startswith(HOME_PREFIX):
            first = data_home() / recorded[len(HOME_PREFIX):]
        else:
            first = root / recorded  # an absolute recorded path stays itself
        found = [first.resolve()]
        if isinstance(entry.get("path_when_saved"), str):
            found.append(Path(entry["path_when_saved"]))
    return list(dict.fromkeys(found))


def resolve_model(entry: dict, root: Path, models_root: str | Path | None) -> tuple[Path, str | None]:
    """The member's model directory, and, when none of the candidates exists, why (a one-line message)."""
    candidates = _model_candidates(entry, root, models_root)
    for c in candidates:
        if c.is_dir():
            return c, None
    where = f"looked in {models_root}" if models_root is not None else f"pool.json records {entry['path']!r}"
    also = f"; also tried {', '.join(map(str, candidates[1:]))}" if len(candidates) > 1 else ""
    hint = "" if models_root is not None else "; if the models moved, point models_root (--models-root DIR) at them"
    return candidates[0], (f"{candidates[0]}: model {entry['name']!r}: checkpoint directory not found "
                           f"({where}{also}{hint})")


def verify_member(member: PoolMember, model: PreTrainedModel | None = None) -> None:
    """Check a loaded ``model`` (or, without one, its checkpoint's ``config.json``) against ``member``.

    Raises:
        PoolNotFoundError: the member's checkpoint directory does not exist (named with the model).
        PoolMismatchError: architecture fields differ (``model 'seed-1': num_layers: 2 != 4``) or the
            weights' fingerprint differs (``model 'seed-2': fingerprint 1a2b.. != 9f8e.. (weights changed)``).
    """
    if model is None:
        if not Path(member.path).is_dir():
            raise PoolNotFoundError(f"{member.path}: model {member.name!r}: checkpoint directory not found")
        try:
            actual = arch_summary(member.path)
        except FileNotFoundError as e:
            raise PoolNotFoundError(f"{member.path}: model {member.name!r}: {e}") from e
        except (OSError, ValueError) as e:
            raise PoolMismatchError(f"{member.path}: model {member.name!r}: unreadable config.json ({e})") from e
    else:
        actual = arch_summary(model)
    diffs = actual.diff(member.summary)
    if diffs:
        raise PoolMismatchError(f"{member.path}: model {member.name!r}: {'; '.join(diffs)} "
                                f"(the checkpoint differs from {POOL_FILE})")
    if model is not None:
        fp = fingerprint(model)
        if fp != member.fingerprint:
            raise PoolMismatchError(
                f"{member.path}: model {member.name!r}: fingerprint {fp[:8]}.. != {member.fingerprint[:8]}.. "
                f"(weights changed since the pool was trained)"
            )


def load_member_model(member: PoolMember, device: str | torch.device = "cpu", verify: bool = True
                      ) -> PreTrainedModel:
    """Load ``member``'s frozen model (safetensors only) and, with ``verify``, check it against the pool.

    Raises:
        PoolNotFoundError: no checkpoint directory, config.json or safetensors weights.
        PoolMismatchError: unreadable weights, other architecture or other weights (fingerprint).
    """
    try:
        model = load_frozen(member.path, device="cpu")
    except FileNotFoundError as e:
        raise PoolNotFoundError(f"{member.path}: model {member.name!r}: {e}") from e
    except (OSError, SafetensorError, ValueError) as e:
        raise PoolMismatchError(f"{member.path}: model {member.name!r}: cannot load the checkpoint ({e})") from e
    if verify:
        verify_member(member, model)
    return model.to(device)


def verify_models(members: Iterable[PoolMember]) -> None:
    """Load each member's checkpoint in turn (CPU, one in memory at a time) and check its fingerprint."""
    for m in members:
        load_member_model(m)  # checked, then dropped
