"""``ModelHost``: a Ray actor that holds one frozen pool model.

Each frozen model lives in exactly one actor (its own GPU(s) on a GPU cluster, a
fraction of a CPU here). The actor wraps :class:`kvlingua.backend.LocalBackend` for
that one model, so the math exists once; only plain contiguous CPU tensors cross the
actor boundary, never a transformers ``Cache``:

* :meth:`ModelHost.prefix_block`: ``[B, P]`` ids -> a :class:`WireBlock` (keys/values
  ``[B, P, L, D]`` fp32);
* :meth:`ModelHost.suffix_loss_and_grad`: a (translated) block and ``[B, S]`` suffix
  ids -> ``(loss, grad_keys, grad_values)``; frozen weights never leave the host;
* :meth:`ModelHost.suffix_kl_and_grad`: the same with the suffix KL to the model's own-cache
  distribution; the host computes that teacher from the prefix ids and keeps it for recurring ids
  (no teacher tensor crosses the wire);
* :meth:`ModelHost.suffix_nll`: per-token NLL ``[B, S-1]`` for evaluation;
* :meth:`ModelHost.attention_received`: the attention mass ``[B, L, P]`` a suffix puts on each prefix position (the
  ``out_weights: attention`` closed form weights OUT's regression by it);
* :meth:`ModelHost.refresh`: a translated block with the positions the model reads most recomputed by the model
  (a space's ``refresh``, :mod:`kvlingua.refresh`).

Tensors cross as :mod:`workers.wire` types (:class:`~workers.wire.WireTensor`, :class:`~workers.wire.WireBlock`).

Several trainer ranks may share a host: the actor is threaded (``max_concurrency``).
Torch inference and ``autograd.grad`` on per-call graphs are thread-safe; the model
is never mutated, and the call counters sit behind a lock. A host that dies (node
loss, OOM, ``ray.kill(h, no_restart=False)``) is restarted (the model is reloaded
in ``__init__``) and the interrupted call retried (``max_restarts`` /
``max_task_retries``).
"""
from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import torch
from torch import Tensor

from kvlingua.backend import LocalBackend
from kvlingua.blockstore import BlockStore, CachingBackend
from kvlingua.cache import fingerprint
from kvlingua.models import load_frozen
from workers.config import HostOptions
from workers.wire import WireBlock, WireTensor, as_tensor, block_from_wire, block_to_wire, tensor_to_wire


class ModelHost:
    """Holds one frozen model; serves prefix blocks and suffix losses with block gradients.

    Args:
        name: pool member name.
        path: local ``save_pretrained`` directory (safetensors).
        device: ``None`` picks ``cuda`` when this actor was given a GPU, else ``cpu``.
        block_dir: optional :class:`~kvlingua.blockstore.BlockStore` directory; source
            blocks are then extracted once and served from disk afterwards.
        torch_threads: intra-op threads for this process.
        precision: ``fp32`` or ``bf16`` (autocast of the frozen model's passes; see
            :class:`~kvlingua.backend.LocalBackend`). A bf16 host keeps its blocks apart from fp32 ones in a
            shared block store (its store key is the fingerprint with ``+bf16`` appended).
    """

    def __init__(self, name: str, path: str, device: str | None = None, block_dir: str | None = None,
                 torch_threads: int = 1, precision: str = "fp32"):
        torch.set_num_threads(torch_threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        self.device = device
        model = load_frozen(path, device)
        self._fingerprint = fingerprint(model)
        local = LocalBackend({name: model}, device, precision)
        self._summary = local.summary(name)
        store_key = self._fingerprint if precision == "fp32" else f"{self._fingerprint}+{precision}"
        self._backend = local if block_dir is None else CachingBackend(
            local, BlockStore(block_dir), {name: store_key}
        )
        self._lock = threading.Lock()
        self._calls = {"prefix_block": 0, "suffix_loss_and_grad": 0, "suffix_kl_and_grad": 0, "suffix_nll": 0,
                       "attention_received": 0, "refresh": 0, "token_embeddings": 0}

    def _count(self, what: str) -> None:
        with self._lock:
            self._calls[what] += 1

    def info(self) -> dict:
        """Name, architecture summary (as a dict), weight fingerprint, device, process id and Ray node id."""
        return {"name": self.name, "summary": self._summary.to_dict(), "fingerprint": self._fingerprint,
                "device": self.device, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def stats(self) -> dict:
        """Calls served since this process started; block-store extractions/hits if a store is used."""
        with self._lock:
            out = dict(self._calls)
        if isinstance(self._backend, CachingBackend):
            out.update(extractions=self._backend.extractions, hits=self._backend.hits)
        local = getattr(self._backend, "inner", self._backend)  # the LocalBackend, under a block store or not
        out.update(teacher_hits=local.teacher_hits, teacher_misses=local.teacher_misses)
        return out

    def rotation(self) -> bytes:
        """The model's rotary embedding (:class:`kvlingua.rotary.KeyRotation`: a few small buffers), pickled to
        bytes here: as an object its tensors would arrive as read-only zero-copy views of the store."""
        return pickle.dumps(self._backend.rotation(self.name))

    def prefix_block(self, input_ids: Tensor | WireTensor) -> WireBlock:
        """``[B, P]`` ids -> the block, keys/values ``[B, P, L, D]`` fp32."""
        self._count("prefix_block")
        ids = as_tensor(input_ids, copy=True)  # [B, P]; ids are tiny, a private copy costs nothing
        return block_to_wire(self._backend.prefix_block(self.name, ids))

    def token_embeddings(self, input_ids: Tensor | WireTensor) -> WireTensor:
        """``[B, P]`` ids -> the model's input embeddings of them ``[B, P, H]`` fp32 (a token readout's fit)."""
        self._count("token_embeddings")
        return tensor_to_wire(self._backend.token_embeddings(self.name, as_tensor(input_ids, copy=True)))

    def suffix_loss_and_grad(self, block: WireBlock,
                             suffix_ids: Tensor | WireTensor) -> tuple[WireTensor, WireTensor, WireTensor]:
        """Suffix loss after the block and its gradient: ``(loss [], grad_keys, grad_values [B, P, L, D])``.

        The block is read in place (no copy): the backend detaches it into autograd leaves
        that ``autograd.grad`` differentiates (it never accumulates into them), and the cache
        built over it concatenates new positions into fresh tensors.
        """
        self._count("suffix_loss_and_grad")
        loss, grad = self._backend.suffix_loss_and_grad(self.name, block_from_wire(block, copy=False),
                                                        as_tensor(suffix_ids, copy=True))
        return tensor_to_wire(loss), tensor_to_wire(grad.keys), tensor_to_wire(grad.values)

    def suffix_kl_and_grad(self, block: WireBlock, suffix_ids: Tensor | WireTensor,
                           prefix_ids: Tensor | WireTensor) -> tuple[WireTensor, WireTensor, WireTensor]:
        """Suffix KL after the block to the model after its own cache of ``prefix_ids`` ``[B, P]`` (computed and
        kept here), and its gradient: ``(loss [], grad_keys, grad_values [B, P, L, D])``; the block is read in
        place as in :meth:`suffix_loss_and_grad`."""
        self._count("suffix_kl_and_grad")
        loss, grad = self._backend.suffix_kl_and_grad(self.name, block_from_wire(block, copy=False),
                                                      as_tensor(suffix_ids, copy=True),
                                                      as_tensor(prefix_ids, copy=True))
        return tensor_to_wire(loss), tensor_to_wire(grad.keys), tensor_to_wire(grad.values)

    def suffix_nll(self, block: WireBlock | None, suffix_ids: Tensor | WireTensor) -> WireTensor:
        """Per-token NLL ``[B, S-1]`` of the suffix after the block (``None``: no prefix); read-only use of the block."""
        self._count("suffix_nll")
        kv = None if block is None else block_from_wire(block, copy=False)
        return tensor_to_wire(self._backend.suffix_nll(self.name, kv, as_tensor(suffix_ids, copy=True)))

    def attention_received(self, block: WireBlock, suffix_ids: Tensor | WireTensor) -> WireTensor:
        """Attention mass ``[B, L, P]`` the suffix puts on each of the block's positions; read-only use of the block."""
        self._count("attention_received")
        kv = block_from_wire(block, copy=False)
        return tensor_to_wire(self._backend.attention_received(self.name, kv, as_tensor(suffix_ids, copy=True)))

    def refresh(self, block: WireBlock, ids: Tensor | WireTensor, read_ids: Tensor | WireTensor, share: float,
                skip: int) -> WireBlock:
        """The block with ``share`` of its positions after ``skip`` recomputed here (:meth:`PoolBackend.refresh`)."""
        self._count("refresh")
        kv = block_from_wire(block, copy=False)  # read only: the refresh writes a new block
        out = self._backend.refresh(self.name, kv, as_tensor(ids, copy=True), as_tensor(read_ids, copy=True), share, skip)
        return block_to_wire(out)


def spawn_hosts(models: dict[str, str], options: HostOptions = HostOptions(), name_prefix: str | None = None,
                namespace: str | None = None) -> dict[str, "ray.actor.ActorHandle"]:
    """Start one ``ModelHost`` actor per pool model (pool order) and wait until all are loaded.

    Args:
        models: model name -> checkpoint directory.
        options: resources and fault tolerance of every host.
        name_prefix: if given, actors are named ``f"{name_prefix}{model}"`` (findable with
            ``ray.get_actor``) so several processes can share them.
        namespace: Ray namespace of the named actors (default: the caller's).

    Returns:
        model name -> actor handle.
    """
    for name, path in models.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: {path} is not a checkpoint directory (no config.json)")
    actor_cls = ray.remote(ModelHost)
    env = {k: os.environ[k] for k in ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "KVLINGUA_HOME") if k in os.environ}
    hosts = {}
    for name, path in models.items():
        opts = dict(num_cpus=options.num_cpus, num_gpus=options.num_gpus, max_concurrency=options.max_concurrency,
                    max_restarts=options.max_restarts, max_task_retries=options.max_task_retries,
                    resources=dict(options.resources or {}), runtime_env={"env_vars": env})
        if name_prefix is not None:
            opts["name"] = f"{name_prefix}{name}"
            if namespace is not None:
                opts["namespace"] = namespace
        device = "cuda" if options.num_gpus > 0 else "cpu"
        hosts[name] = actor_cls.options(**opts).remote(
            name, str(Path(path).resolve()), device, options.block_dir, options.torch_threads, options.precision
        )
    ray.get([h.info.remote() for h in hosts.values()])
    return hosts
