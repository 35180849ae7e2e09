"""Run a :class:`kvlingua.job.TrainJob` on Ray: model hosts, Ray Train workers, evaluation.

:func:`train_distributed` connects to a cluster (``RayConfig.address``, else
``$RAY_ADDRESS``, else an embedded local Ray), checks that the cluster can hold the
requested hosts and workers (and fails at once with a clear message if not, instead
of waiting forever for resources), starts one ``ModelHost`` per frozen model
(``placement="hosted"``), and launches a ``TorchTrainer`` whose ranks run
:func:`workers.train_worker.train_loop` (gloo on CPU, NCCL on GPU). Rank 0 evaluates
and writes the pool, the table and the plot (:func:`kvlingua.job.finish`); the
driver returns that result.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray

from kvlingua.config import to_dict
from kvlingua.tracking import NullTracker, Tracker
from workers.host import HostOptions, spawn_hosts

if TYPE_CHECKING:
    from kvlingua.job import TrainJob

NAMESPACE = "kvlingua"
"""Ray namespace of the named host actors."""


class ClusterResourceError(RuntimeError):
    """The cluster cannot hold the hosts and workers a run asks for."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how a Σ-training run uses Ray (the ``ray`` section of a run config)."""

    address: str | None = None
    """Cluster address (``ray://...`` or ``host:port``); None: ``$RAY_ADDRESS``, else an embedded local Ray."""
    placement: Literal["hosted", "colocated"] = "hosted"
    """hosted: one ModelHost actor per frozen model; colocated: every worker loads the frozen models."""
    num_workers: int = 1
    """Ray Train workers (DDP ranks); each holds all adapters and reads its own data shard."""
    worker_num_cpus: float = 1.0
    """CPUs reserved per Train worker."""
    use_gpu: bool = False
    """One GPU per Train worker (NCCL); False: CPU and gloo."""
    host_num_cpus: float = 0.25
    """CPUs reserved per ModelHost actor (hosted placement)."""
    host_num_gpus: float = 0.0
    """GPUs per ModelHost actor (hosted placement); the model then runs on cuda."""
    host_max_concurrency: int = 4
    """Calls a host serves at once (trainer ranks share hosts)."""
    prefetch: int = 4
    """Most source-block requests in flight per rank (hosted placement); 0: no prefetching."""
    max_failures: int = 2
    """Worker-group failures Ray Train recovers from (resuming from the last checkpoint)."""
    host_max_restarts: int = 3
    """Restarts of a dead ModelHost (its interrupted calls are retried)."""
    checkpoint_every: int = 50
    """Steps between checkpoints reported to Ray Train (each report costs time: not every step)."""
    torch_threads: int = 1
    """Intra-op torch threads per worker and per host."""
    block_dir: str | None = None
    """Block store directory for the hosts' source blocks (extract once, reuse); None: no store."""
    storage_path: str | None = None
    """Ray Train storage for checkpoints (shared by all nodes); None: ``<job.out_dir>/ray_train``."""

    def __post_init__(self) -> None:
        if self.placement not in ("hosted", "colocated"):
            raise ValueError(f"placement must be 'hosted' or 'colocated', got {self.placement!r}")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.worker_num_cpus <= 0 or self.host_num_cpus < 0 or self.host_num_gpus < 0:
            raise ValueError("worker_num_cpus must be > 0; host_num_cpus and host_num_gpus >= 0")
        if self.prefetch < 0 or self.max_failures < -1 or self.host_max_restarts < -1:
            raise ValueError("prefetch must be >= 0; max_failures and host_max_restarts >= -1 (-1: unlimited)")
        if self.checkpoint_every < 1 or self.torch_threads < 1 or self.host_max_concurrency < 1:
            raise ValueError("checkpoint_every, torch_threads and host_max_concurrency must be >= 1")

    def host_options(self) -> HostOptions:
        return HostOptions(num_cpus=self.host_num_cpus, num_gpus=self.host_num_gpus,
                           max_concurrency=self.host_max_concurrency, max_restarts=self.host_max_restarts,
                           max_task_retries=max(self.host_max_restarts, 1), torch_threads=self.torch_threads,
                           block_dir=self.block_dir)


def _submitted_job_env_vars() -> dict:
    """Env vars of the runtime env of the Ray job this driver was submitted as (``ray job submit``), if any."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}


def connect(address: str | None = None) -> None:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start an embedded local Ray (no dashboard).

    Workers get this process's zero-copy / Train settings and ``KVLINGUA_HOME`` as runtime-env
    variables, except those a submitted job's runtime env already sets (Ray refuses a conflict).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    job_env = _submitted_job_env_vars()
    env = {k: os.environ[k] for k in ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                      "KVLINGUA_HOME") if k in os.environ and k not in job_env}
    runtime_env = {"env_vars": env} if env else None
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        # Without a dashboard there is no State API, and Ray Train's placement-group cleaner
        # warns about that every few seconds for the whole run; the hook quiets that one logger.
        runtime_env = (runtime_env or {}) | {"worker_process_setup_hook": "workers.quiet_embedded_worker"}
        ray.init(include_dashboard=False, runtime_env=runtime_env)


def requested_resources(job: TrainJob, cfg: RayConfig) -> dict[str, float]:
    """Total CPUs/GPUs a run reserves at once: the hosts (hosted) plus the Train workers."""
    n_hosts = len(job.models) if cfg.placement == "hosted" else 0
    return {
        "CPU": n_hosts * cfg.host_num_cpus + cfg.num_workers * cfg.worker_num_cpus,
        "GPU": n_hosts * cfg.host_num_gpus + (cfg.num_workers if cfg.use_gpu else 0),
    }


def check_resources(job: TrainJob, cfg: RayConfig) -> None:
    """Raise :class:`ClusterResourceError` naming what is short, before anything waits on resources."""
    have = ray.cluster_resources()
    need = requested_resources(job, cfg)
    short = [f"{k}: need {v:g}, cluster has {have.get(k, 0):g}" for k, v in need.items() if v > have.get(k, 0) + 1e-9]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    singles = {"a Train worker": {"CPU": cfg.worker_num_cpus, "GPU": 1.0 if cfg.use_gpu else 0.0}}
    if cfg.placement == "hosted":
        singles["a model host"] = {"CPU": cfg.host_num_cpus, "GPU": cfg.host_num_gpus}
    for who, req in singles.items():
        if not any(all(node.get(k, 0) + 1e-9 >= v for k, v in req.items()) for node in nodes):
            short.append(f"no node can hold {who} ({', '.join(f'{k}={v:g}' for k, v in req.items())})")
    if short:
        raise ClusterResourceError(
            f"the Ray cluster cannot run this job ({cfg.placement}, {len(job.models)} models, "
            f"{cfg.num_workers} workers): " + "; ".join(short)
            + ". Lower ray.num_workers / ray.worker_num_cpus / ray.host_num_cpus / ray.host_num_gpus, "
            "set ray.use_gpu=false, or add nodes."
        )


def _replay(tracker: Tracker, histories: dict[str, list[dict]]) -> None:
    for history in histories.values():
        for rec in history:
            tracker.log_metrics({k: v for k, v in rec.items() if k not in ("step", "kind")}, rec["step"])


def train_distributed(job: TrainJob, ray_cfg: RayConfig, tracker: Tracker | None = None, progress: bool = True,
                      tracking: dict | None = None) -> dict:
    """Train every space of ``job`` on Ray, evaluate, write the pool; returns ``kvlingua.job.finish``'s dict.

    Args:
        job: the run.
        ray_cfg: cluster, placement and resources.
        tracker: where metrics go. An ``MlflowTracker`` run is written live by rank 0 (metrics and
            artifacts into the same run); any other tracker gets the metric history after training.
        progress: progress bar on rank 0.
        tracking: ``{"uri", "run_id"}`` of an existing MLflow run to write into (instead of ``tracker``).

    Raises:
        ClusterResourceError: the cluster lacks the CPUs/GPUs the hosts and workers need.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_worker import train_loop

    tracker = tracker or NullTracker()
    if tracking is None and hasattr(tracker, "run_id") and hasattr(tracker, "tracking_uri"):
        tracking = {"uri": tracker.tracking_uri, "run_id": tracker.run_id}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    connect(ray_cfg.address)
    check_resources(job, ray_cfg)
    run_id = uuid.uuid4().hex[:8]
    host_prefix = f"{job.name}-{run_id}-host-"
    hosts = {}
    if ray_cfg.placement == "hosted":
        hosts = spawn_hosts(job.models, ray_cfg.host_options(), name_prefix=host_prefix, namespace=NAMESPACE)
    train = replace(job.train, checkpoint_every=ray_cfg.checkpoint_every)
    config = {
        "job": to_dict(job), "train": to_dict(train), "placement": ray_cfg.placement, "prefetch": ray_cfg.prefetch,
        "torch_threads": ray_cfg.torch_threads, "host_prefix": host_prefix, "namespace": NAMESPACE,
        "tracking": tracking, "progress": progress,
    }
    storage = Path(ray_cfg.storage_path or Path(job.out_dir) / "ray_train").resolve()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.worker_num_cpus}),
        run_config=RunConfig(name=f"{job.name}-{run_id}", storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    try:
        result = trainer.fit()
    finally:
        for h in hosts.values():
            ray.kill(h, no_restart=True)
    out = json.loads(result.metrics["result"])
    out["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    if tracking is None:
        _replay(tracker, json.loads(Path(out["files"]["eval_json"]).with_name("histories.json").read_text()))
    return out
