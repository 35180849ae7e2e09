"""``ModelHost``: a Ray actor that holds one frozen pool model.

Each frozen model lives in exactly one actor (its own GPU(s) on a GPU cluster, a
fraction of a CPU here). The actor wraps :class:`kvlingua.backend.LocalBackend` for
that one model, so the math exists once; only plain contiguous CPU tensors cross the
actor boundary (through the object store, zero-copy), never a transformers ``Cache``:

* :meth:`ModelHost.prefix_block`: ``[B, P]`` ids -> ``(keys, values, n_kv_heads)``,
  keys/values ``[B, P, L, D]`` fp32;
* :meth:`ModelHost.suffix_loss_and_grad`: a (translated) block and ``[B, S]`` suffix
  ids -> ``(loss, grad_keys, grad_values)``; frozen weights never leave the host;
* :meth:`ModelHost.suffix_nll`: per-token NLL ``[B, S-1]`` for evaluation.

Several trainer ranks may share a host: the actor is threaded (``max_concurrency``).
Torch inference and ``autograd.grad`` on per-call graphs are thread-safe; the model
is never mutated, and the call counters sit behind a lock. A host that dies (node
loss, OOM, ``ray.kill(h, no_restart=False)``) is restarted (the model is reloaded
in ``__init__``) and the interrupted call retried (``max_restarts`` /
``max_task_retries``).
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import torch
from torch import Tensor

from kvlingua.backend import LocalBackend
from kvlingua.blockstore import BlockStore, CachingBackend
from kvlingua.cache import KVBlock, fingerprint
from kvlingua.models import load_frozen

BlockTuple = tuple[Tensor, Tensor, int]
"""A KV block on the wire: ``(keys [B, P, L, D], values [B, P, L, D], n_kv_heads)``."""


def block_to_wire(block: KVBlock) -> BlockTuple:
    """A block as contiguous, detached CPU tensors (what crosses the object store)."""
    return (block.keys.detach().cpu().contiguous(), block.values.detach().cpu().contiguous(), block.n_kv_heads)


def block_from_wire(wire: BlockTuple) -> KVBlock:
    keys, values, n_kv_heads = wire
    return KVBlock(keys, values, int(n_kv_heads))


@dataclass(frozen=True)
class HostOptions:
    """Resources and fault tolerance of one ``ModelHost`` actor."""

    num_cpus: float = 0.25
    """CPUs reserved per host (a fraction is fine on a small machine)."""
    num_gpus: float = 0.0
    """GPUs per host (models run on ``cuda`` when > 0)."""
    max_concurrency: int = 4
    """Calls a host serves at once (several trainer ranks share one host)."""
    max_restarts: int = 3
    """Restarts of a dead host before calls to it fail."""
    max_task_retries: int = 3
    """Retries of a call interrupted by a host's death."""
    torch_threads: int = 1
    """Intra-op torch threads inside the host process."""
    block_dir: str | None = None
    """Block store directory for source blocks (``None``: extract every time)."""

    def __post_init__(self) -> None:
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if self.max_concurrency < 1 or self.torch_threads < 1:
            raise ValueError("max_concurrency and torch_threads must be >= 1")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ValueError("max_restarts and max_task_retries must be >= -1 (-1: unlimited)")


class ModelHost:
    """Holds one frozen model; serves prefix blocks and suffix losses with block gradients.

    Args:
        name: pool member name.
        path: local ``save_pretrained`` directory (safetensors).
        device: ``None`` picks ``cuda`` when this actor was given a GPU, else ``cpu``.
        block_dir: optional :class:`~kvlingua.blockstore.BlockStore` directory; source
            blocks are then extracted once and served from disk afterwards.
        torch_threads: intra-op threads for this process.
    """

    def __init__(self, name: str, path: str, device: str | None = None, block_dir: str | None = None,
                 torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.name = name
        self.device = device
        model = load_frozen(path, device)
        self._fingerprint = fingerprint(model)
        local = LocalBackend({name: model}, device)
        self._summary = local.summary(name)
        self._backend = local if block_dir is None else CachingBackend(
            local, BlockStore(block_dir), {name: self._fingerprint}
        )
        self._lock = threading.Lock()
        self._calls = {"prefix_block": 0, "suffix_loss_and_grad": 0, "suffix_nll": 0}

    def _count(self, what: str) -> None:
        with self._lock:
            self._calls[what] += 1

    def info(self) -> dict:
        """Name, architecture summary (as a dict), weight fingerprint, device and process id."""
        return {"name": self.name, "summary": self._summary.to_dict(), "fingerprint": self._fingerprint,
                "device": self.device, "pid": os.getpid()}

    def stats(self) -> dict:
        """Calls served since this process started; block-store extractions/hits if a store is used."""
        with self._lock:
            out = dict(self._calls)
        if isinstance(self._backend, CachingBackend):
            out.update(extractions=self._backend.extractions, hits=self._backend.hits)
        return out

    def prefix_block(self, input_ids: Tensor) -> BlockTuple:
        """``[B, P]`` ids -> ``(keys, values, n_kv_heads)``, keys/values ``[B, P, L, D]`` fp32 CPU."""
        self._count("prefix_block")
        return block_to_wire(self._backend.prefix_block(self.name, input_ids))

    def suffix_loss_and_grad(self, keys: Tensor, values: Tensor, n_kv_heads: int,
                             suffix_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Suffix loss after the block and its gradient: ``(loss [], grad_keys, grad_values [B, P, L, D])``."""
        self._count("suffix_loss_and_grad")
        loss, grad = self._backend.suffix_loss_and_grad(self.name, KVBlock(keys, values, n_kv_heads), suffix_ids)
        return loss, grad.keys.contiguous(), grad.values.contiguous()

    def suffix_nll(self, keys: Tensor | None, values: Tensor | None, n_kv_heads: int,
                   suffix_ids: Tensor) -> Tensor:
        """Per-token NLL ``[B, S-1]`` of the suffix after the block (``keys=None``: no prefix)."""
        self._count("suffix_nll")
        block = None if keys is None else KVBlock(keys, values, n_kv_heads)
        return self._backend.suffix_nll(self.name, block, suffix_ids)


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
                    runtime_env={"env_vars": env})
        if name_prefix is not None:
            opts["name"] = f"{name_prefix}{name}"
            if namespace is not None:
                opts["namespace"] = namespace
        device = "cuda" if options.num_gpus > 0 else "cpu"
        hosts[name] = actor_cls.options(**opts).remote(
            name, str(Path(path).resolve()), device, options.block_dir, options.torch_threads
        )
    ray.get([h.info.remote() for h in hosts.values()])
    return hosts
