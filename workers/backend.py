"""``RayBackend``: the :class:`kvlingua.backend.PoolBackend` protocol over ``ModelHost`` actors.

The training loop (:func:`kvlingua.train.fit`) cannot tell this backend from the
in-process ``LocalBackend``: it asks for source blocks and for suffix losses with
block gradients, and the calls go to the host actor of the model named.

Source blocks can be requested ahead of use (:meth:`RayBackend.submit_prefix`, used
by :class:`workers.streaming.BlockPrefetcher`): ``prefix_block`` then takes the block
that is already in flight (or done) for the same model and ids instead of asking
again.

Tensors cross as :class:`workers.wire.WireTensor` (see ``workers/wire.py``). Source
blocks are views of the object store's read-only bytes, not copies: the loop only
reads them (they are the input of ``IN_i``, and autograd never writes into a tensor
that does not require grad); ``tests/workers/test_host.py`` checks their version
counters after training steps. Losses, gradients and NLLs are private copies: a
gradient handed to ``autograd.backward`` may become a parameter's ``.grad`` and be
accumulated into in place.
"""
from __future__ import annotations

import pickle
import threading
from collections import defaultdict, deque

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
from torch import Tensor

from kvlingua.blockstore import ids_digest
from kvlingua.cache import ArchSummary, KVBlock, check_block_fits
from workers.wire import block_from_wire, block_to_wire, tensor_from_wire, tensor_to_wire


class RayBackend:
    """Pool backend whose frozen models live in ``ModelHost`` actors.

    Args:
        hosts: model name -> ``ModelHost`` actor handle, in pool order.
    """

    def __init__(self, hosts: dict[str, "ray.actor.ActorHandle"]):
        if not hosts:
            raise ValueError("a pool needs at least one model host")
        self.hosts = dict(hosts)
        infos = ray.get([h.info.remote() for h in self.hosts.values()])
        self._summaries = {n: ArchSummary(**i["summary"]) for n, i in zip(self.hosts, infos)}
        self._fingerprints = {n: i["fingerprint"] for n, i in zip(self.hosts, infos)}
        self._pending: dict[tuple[str, str], deque] = defaultdict(deque)
        self._rotations: dict = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.hosts)

    def _check(self, model: str) -> str:
        if model not in self.hosts:
            raise KeyError(f"unknown pool model {model!r}; pool has {self.names()}")
        return model

    def summary(self, model: str) -> ArchSummary:
        return self._summaries[self._check(model)]

    def fingerprint(self, model: str) -> str:
        return self._fingerprints[self._check(model)]

    # -- source blocks ---------------------------------------------------------------------
    def submit_prefix(self, model: str, input_ids: Tensor) -> tuple[tuple[str, str], "ray.ObjectRef"]:
        """Ask ``model``'s host for the block of ``[B, P]`` ids now; ``prefix_block`` will take it.

        Returns ``(key, ref)``; drop an unused request with :meth:`forget`.
        """
        key = (self._check(model), ids_digest(input_ids))
        ref = self.hosts[model].prefix_block.remote(tensor_to_wire(input_ids))
        with self._lock:
            self._pending[key].append(ref)
        return key, ref

    def is_pending(self, key: tuple[str, str], ref: "ray.ObjectRef") -> bool:
        """Whether a submitted request is still waiting to be taken by ``prefix_block``."""
        with self._lock:
            queue = self._pending.get(key)
            return queue is not None and ref in queue

    def forget(self, key: tuple[str, str], ref: "ray.ObjectRef") -> bool:
        """Drop a submitted request that was not used; ``False`` if it was already taken."""
        with self._lock:
            queue = self._pending.get(key)
            if queue is None or ref not in queue:
                return False
            queue.remove(ref)
            if not queue:
                del self._pending[key]
            return True

    def pending(self) -> int:
        """Submitted source-block requests not yet taken by ``prefix_block`` nor forgotten."""
        with self._lock:
            return sum(len(q) for q in self._pending.values())

    def prefix_block(self, model: str, input_ids: Tensor) -> KVBlock:
        """``[B, P]`` ids -> ``model``'s block ``[B, P, L, D]`` (a prefetched one if submitted)."""
        key = (self._check(model), ids_digest(input_ids))
        with self._lock:
            queue = self._pending.get(key)
            ref = queue.popleft() if queue else None
            if queue is not None and not queue:
                del self._pending[key]
        if ref is None:
            ref = self.hosts[model].prefix_block.remote(tensor_to_wire(input_ids))
        return block_from_wire(ray.get(ref), copy=False)  # read-only view: the loop never writes a source block

    def token_embeddings(self, model: str, input_ids: Tensor) -> Tensor:
        """``[B, P]`` ids -> ``model``'s input embeddings ``[B, P, H]`` (fp32), computed by its host."""
        emb = ray.get(self.hosts[self._check(model)].token_embeddings.remote(tensor_to_wire(input_ids)))
        return tensor_from_wire(emb, copy=True)  # [B, P, H], the caller's to keep

    def rotation(self, model: str):
        """``model``'s :class:`~kvlingua.rotary.KeyRotation`, asked of its host once."""
        if model not in self._rotations:
            # bytes from our own host actor (ModelHost.rotation), not untrusted input
            self._rotations[model] = pickle.loads(ray.get(self.hosts[self._check(model)].rotation.remote()))
        return self._rotations[model]

    # -- target side -----------------------------------------------------------------------
    def suffix_loss_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        """Loss of ``[B, S]`` suffix ids after ``block`` and d loss / d block, computed on the host."""
        check_block_fits(block, self.summary(model), model)
        wire = block_to_wire(block.map(lambda t: t.float()))  # [B, P, L, D] fp32; no copy when it already is
        loss, gk, gv = ray.get(self.hosts[model].suffix_loss_and_grad.remote(wire, tensor_to_wire(suffix_ids)))
        # private copies: the caller hands the gradient to autograd.backward (see the module docstring)
        return tensor_from_wire(loss, copy=True), KVBlock(tensor_from_wire(gk, copy=True),
                                                          tensor_from_wire(gv, copy=True), block.n_kv_heads)

    def suffix_kl_and_grad(self, model: str, block: KVBlock, suffix_ids: Tensor,
                           prefix_ids: Tensor) -> tuple[Tensor, KVBlock]:
        """Suffix KL after ``block`` to ``model`` after its own cache of ``prefix_ids`` and d loss / d block; the
        host computes (and keeps) that teacher from the ids: only ids, the block and its gradient cross."""
        check_block_fits(block, self.summary(model), model)
        wire = block_to_wire(block.map(lambda t: t.float()))  # [B, P, L, D] fp32
        loss, gk, gv = ray.get(self.hosts[model].suffix_kl_and_grad.remote(wire, tensor_to_wire(suffix_ids),
                                                                           tensor_to_wire(prefix_ids)))
        return tensor_from_wire(loss, copy=True), KVBlock(tensor_from_wire(gk, copy=True),
                                                          tensor_from_wire(gv, copy=True), block.n_kv_heads)

    def suffix_nll(self, model: str, block: KVBlock | None, suffix_ids: Tensor) -> Tensor:
        """Per-token NLL ``[B, S-1]`` of the suffix after ``block`` (``None``: no prefix)."""
        self._check(model)
        wire = None
        if block is not None:
            check_block_fits(block, self.summary(model), model)
            wire = block_to_wire(block.map(lambda t: t.float()))
        nll = ray.get(self.hosts[model].suffix_nll.remote(wire, tensor_to_wire(suffix_ids)))
        return tensor_from_wire(nll, copy=True)  # [B, S-1], the caller's to keep

    def attention_received(self, model: str, block: KVBlock, suffix_ids: Tensor) -> Tensor:
        """Attention mass ``[B, L, P]`` each of ``block``'s positions receives from the suffix."""
        self._check(model)
        check_block_fits(block, self.summary(model), model)
        wire = block_to_wire(block.map(lambda t: t.float()))
        mass = ray.get(self.hosts[model].attention_received.remote(wire, tensor_to_wire(suffix_ids)))
        return tensor_from_wire(mass, copy=True)  # [B, L, P]

    def refresh(self, model: str, block: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int) -> KVBlock:
        """``block`` with ``share`` of its positions recomputed by the model's host (:meth:`PoolBackend.refresh`)."""
        self._check(model)
        check_block_fits(block, self.summary(model), model)
        wire = block_to_wire(block.map(lambda t: t.float()))
        out = ray.get(self.hosts[model].refresh.remote(wire, tensor_to_wire(ids), tensor_to_wire(read_ids), share, skip))
        return block_from_wire(out, copy=True)  # [B, P, L, D], the caller's to keep

    def stats(self) -> dict[str, dict]:
        """Per-host call counters (see ``ModelHost.stats``)."""
        return dict(zip(self.hosts, ray.get([h.stats.remote() for h in self.hosts.values()])))
