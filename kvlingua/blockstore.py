"""A store of source KV blocks, so frozen models extract each prefix once.

The pool is frozen, so a model's KV block for given prefix ids never changes: it can
be computed once and reused across epochs, runs and Tune trials. :class:`BlockStore`
keeps one safetensors file per (model weight fingerprint, prefix length, prefix ids)
under a directory (default ``data_home()/blocks``)::

    <root>/<fingerprint>/p<P>/<digest of the ids>.safetensors

The digest of the ids bytes is the data-shard / batch key: it is stable across
epochs and runs for the same batch, and two different batches never share a file
(each file also holds its ids, and a read checks them). :class:`CachingBackend` wraps
any :class:`~kvlingua.backend.PoolBackend` and serves ``prefix_block`` from the
store, counting how many blocks it really extracted (``extractions``) and how many
it served from disk (``hits``). Writes are atomic (temporary file + rename), so
several processes may share one store.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvlingua.backend import PoolBackend
from kvlingua.batch import ids_digest  # noqa: F401  (the key of a block; imported from here by callers)
from kvlingua.cache import ArchSummary, KVBlock
from kvlingua.home import data_home


class BlockStore:
    """Source KV blocks on disk, one safetensors file per (fingerprint, prefix length, ids).

    Args:
        root: directory of the store (created on first write); default ``data_home()/blocks``.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else data_home() / "blocks"

    def path(self, fingerprint: str, input_ids: Tensor) -> Path:
        """File that holds (or would hold) the block of ``input_ids`` ``[B, P]`` for that model."""
        if not fingerprint or "/" in fingerprint or fingerprint.startswith("."):
            raise ValueError(f"model fingerprint must be a plain non-empty name, got {fingerprint!r}")
        return self.root / fingerprint / f"p{input_ids.shape[1]}" / f"{ids_digest(input_ids)}.safetensors"

    def get(self, fingerprint: str, input_ids: Tensor) -> KVBlock | None:
        """The stored block ``[B, P, L, D]`` for these ids, or ``None`` if not stored yet.

        Raises ``ValueError`` if the file's ids differ from ``input_ids`` (a digest
        collision or a corrupted store), instead of serving another batch's block.
        """
        path = self.path(fingerprint, input_ids)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        stored_ids = tensors["input_ids"]  # [B, P]
        if not torch.equal(stored_ids, input_ids.detach().to("cpu", torch.int64)):
            raise ValueError(f"{path}: stored prefix ids differ from the requested ones; remove the file")
        n_kv_heads = int(tensors["n_kv_heads"].item())
        return KVBlock(tensors["keys"], tensors["values"], n_kv_heads)

    def put(self, fingerprint: str, input_ids: Tensor, block: KVBlock) -> Path:
        """Write ``block`` (keys/values ``[B, P, L, D]``) for ``input_ids`` ``[B, P]``; returns the file."""
        if block.batch_size != input_ids.shape[0] or block.seq_len != input_ids.shape[1]:
            raise ValueError(
                f"block of batch {block.batch_size} x {block.seq_len} positions does not match "
                f"prefix ids of shape {tuple(input_ids.shape)}"
            )
        path = self.path(fingerprint, input_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "keys": block.keys.detach().cpu().contiguous(),
            "values": block.values.detach().cpu().contiguous(),
            "input_ids": input_ids.detach().to("cpu", torch.int64).contiguous(),
            "n_kv_heads": torch.tensor(block.n_kv_heads, dtype=torch.int64),
        }
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"fingerprint": fingerprint})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/p*/*.safetensors")) if self.root.is_dir() else 0


class CachingBackend:
    """A :class:`PoolBackend` that serves source blocks from a :class:`BlockStore`.

    ``prefix_block`` looks the block up by (fingerprint of the model, prefix ids);
    on a miss it asks ``inner`` and stores the result. Everything else is passed to
    ``inner`` unchanged. Thread-safe counters:

    * ``extractions``: blocks computed by ``inner`` (misses);
    * ``hits``: blocks served from the store.

    Args:
        inner: the backend that really runs the frozen models.
        store: where blocks live.
        fingerprints: model name -> weight fingerprint; default ``inner.fingerprint(name)``
            (both ``LocalBackend`` and ``workers.backend.RayBackend`` provide it).
    """

    def __init__(self, inner: PoolBackend, store: BlockStore, fingerprints: dict[str, str] | None = None):
        self.inner = inner
        self.store = store
        if fingerprints is None:
            if not hasattr(inner, "fingerprint"):
                raise TypeError(f"{type(inner).__name__} has no fingerprint(model); pass fingerprints=")
            fingerprints = {n: inner.fingerprint(n) for n in inner.names()}
        missing = sorted(set(inner.names()) - set(fingerprints))
        if missing:
            raise ValueError(f"no fingerprint for pool model(s) {missing}")
        self.fingerprints = dict(fingerprints)
        self.extractions = 0
        self.hits = 0
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return self.inner.names()

    def summary(self, model: str) -> ArchSummary:
        return self.inner.summary(model)

    def fingerprint(self, model: str) -> str:
        if model not in self.fingerprints:
            raise KeyError(f"unknown pool model {model!r}; pool has {self.names()}")
        return self.fingerprints[model]

    def rotation(self, model: str):
        return self.inner.rotation(model)

    def token_embeddings(self, model: str, input_ids: Tensor) -> Tensor:
        return self.inner.token_embeddings(model, input_ids)

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        """``[B, P]`` ids -> ``[B, P, L, D]`` block, extracted at most once per store."""
        fp = self.fingerprint(model)
        block = self.store.get(fp, input_ids)
        if block is not None:
            with self._lock:
                self.hits += 1
            return block
        block = self.inner.prefix_block(model, input_ids)
        self.store.put(fp, input_ids, block)
        with self._lock:
            self.extractions += 1
        return block

    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        return self.inner.suffix_loss_and_grad(model, block, suffix_ids)

    def suffix_kl_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor,
                           prefix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        return self.inner.suffix_kl_and_grad(model, block, suffix_ids, prefix_ids)

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        return self.inner.suffix_nll(model, block, suffix_ids)

    def attention_received(self, model: str, block: KVBlock, suffix_ids: Tensor) -> Tensor:
        return self.inner.attention_received(model, block, suffix_ids)

    def refresh(self, model: str, block: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int) -> KVBlock:
        return self.inner.refresh(model, block, ids, read_ids, share, skip)
