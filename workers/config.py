"""How a run uses Ray: placement, resources, fault tolerance. Plain dataclasses, no Ray import.

:class:`RayConfig` is the ``ray`` section of a run config; its ``host`` section is the
:class:`HostOptions` of every ``ModelHost`` actor. Loading a run YAML reads these
without importing Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvlingua.backend import FROZEN_PRECISIONS


@dataclass(frozen=True)
class HostOptions:
    """Resources and fault tolerance of one ``ModelHost`` actor (the ``ray.host`` section)."""

    num_cpus: float = 0.25
    """CPUs reserved per host (a fraction is fine on a small machine)."""
    num_gpus: float = 0.0
    """GPUs per host (models run on ``cuda`` when > 0)."""
    resources: dict[str, float] | None = None
    """Custom Ray resources per host, e.g. ``{"node2": 1}`` to pin the hosts to the nodes that have it."""
    max_concurrency: int = 4
    """Calls a host serves at once (several trainer ranks share one host)."""
    max_restarts: int = 3
    """Restarts of a dead host before calls to it fail (-1: unlimited)."""
    max_task_retries: int = 3
    """Retries of a call interrupted by a host's death (-1: unlimited)."""
    torch_threads: int = 1
    """Intra-op torch threads inside the host process."""
    block_dir: str | None = None
    """Block store directory for source blocks (extract once, reuse); None: extract every time."""
    precision: str = "fp32"
    """How the host runs its frozen model: ``fp32`` as loaded, ``bf16`` autocast of its forward passes (blocks,
    gradients and NLLs still cross as fp32; :class:`kvlingua.backend.LocalBackend`)."""

    def __post_init__(self) -> None:
        if self.precision not in FROZEN_PRECISIONS:
            raise ValueError(f"precision must be one of {list(FROZEN_PRECISIONS)}, got {self.precision!r}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError(f"num_cpus and num_gpus must be >= 0, got {self.num_cpus}, {self.num_gpus}")
        if any(v < 0 for v in (self.resources or {}).values()):
            raise ValueError(f"resources must be >= 0, got {self.resources}")
        if self.max_concurrency < 1 or self.torch_threads < 1:
            raise ValueError("max_concurrency and torch_threads must be >= 1")
        if self.max_restarts < -1 or self.max_task_retries < -1:
            raise ValueError("max_restarts and max_task_retries must be >= -1 (-1: unlimited)")

    def ray_resources(self) -> dict[str, float]:
        """What one host reserves, in Ray's resource names."""
        return {"CPU": self.num_cpus, "GPU": self.num_gpus, **(self.resources or {})}


@dataclass(frozen=True)
class RayConfig:
    """Where and how a Σ-training run uses Ray (the ``ray`` section of a run config)."""

    address: str | None = None
    """Cluster address (``ray://...`` or ``host:port``); None: ``$RAY_ADDRESS``, else an embedded local Ray."""
    placement: Literal["hosted", "colocated"] = "hosted"
    """hosted: one ModelHost actor per frozen model; colocated: every worker loads the frozen models."""
    num_workers: int = 1
    """Ray Train workers (ranks); each holds all adapters, reads its own data shard, and the ranks average their gradients."""
    worker_num_cpus: float = 1.0
    """CPUs reserved per Train worker (a fraction is fine: Ray does not cap a process at its reservation)."""
    use_gpu: bool = False
    """One GPU per Train worker (NCCL); False: CPU and gloo."""
    host: HostOptions = field(default_factory=HostOptions)
    """The ModelHost actors (hosted placement)."""
    prefetch: int = 4
    """Most source-block requests in flight per rank (hosted placement); 0: no prefetching."""
    max_failures: int = 2
    """Worker-group failures Ray Train recovers from (resuming from the last checkpoint; -1: unlimited)."""
    torch_threads: int = 1
    """Intra-op torch threads per Train worker."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (shared by all nodes); None: ``<job.out_dir>/ray_train``."""

    def __post_init__(self) -> None:
        if self.placement not in ("hosted", "colocated"):
            raise ValueError(f"placement must be 'hosted' or 'colocated', got {self.placement!r}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.worker_num_cpus <= 0:
            raise ValueError(f"worker_num_cpus must be > 0, got {self.worker_num_cpus}")
        if self.prefetch < 0 or self.max_failures < -1:
            raise ValueError("prefetch must be >= 0 and max_failures >= -1 (-1: unlimited)")
        if self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")

    def worker_resources(self) -> dict[str, float]:
        """What one Train worker reserves, in Ray's resource names."""
        return {"CPU": self.worker_num_cpus, "GPU": 1.0 if self.use_gpu else 0.0}

    def requested(self, n_models: int) -> list[tuple[str, int, dict[str, float]]]:
        """``(who, how many, resources each)`` of a run over ``n_models`` models: the hosts (hosted) and workers."""
        wants = [("Train worker", self.num_workers, self.worker_resources())]
        if self.placement == "hosted":
            wants.insert(0, ("model host", n_models, self.host.ray_resources()))
        return wants
