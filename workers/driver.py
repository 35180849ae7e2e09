"""Run a :class:`kvlingua.job.TrainJob` on Ray: model hosts, Ray Train workers, evaluation.

:func:`train_distributed` connects to a cluster (``RayConfig.address``, else
``$RAY_ADDRESS``, else an embedded local Ray), checks that the cluster can hold the
requested hosts and workers (and fails at once with a clear message if not, instead
of waiting forever for resources), starts one ``ModelHost`` per frozen model
(``placement="hosted"``), and launches a ``TorchTrainer`` whose ranks run
:func:`workers.train_worker.train_loop` (gloo on CPU, NCCL on GPU). Rank 0 evaluates
and writes the pool, the table and the plot (:func:`kvlingua.run.finish`); the
driver returns that result.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray

from kvlingua.config import KvlinguaError, to_dict
from kvlingua.run import JOB_FILE, training_key
from kvlingua.tracking import NullTracker, Tracker
from workers.config import RayConfig
from workers.host import spawn_hosts

if TYPE_CHECKING:
    from kvlingua.job import TrainJob

NAMESPACE = "kvlingua"
"""Ray namespace of the named host actors."""


class ClusterResourceError(KvlinguaError, RuntimeError):
    """The cluster cannot hold the actors a run asks for."""


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


TRAIN_HINT = ("Lower the reservations (ray.num_workers, ray.worker_num_cpus, ray.host.num_cpus, "
              "ray.host.num_gpus, ray.use_gpu), or add nodes.")


def check_resources(wants: list[tuple[str, int, dict[str, float]]], what: str, hint: str = TRAIN_HINT) -> None:
    """Raise :class:`ClusterResourceError` naming what is short, before anything waits on resources.

    Args:
        wants: ``(who, how many, resources each)``, e.g. ``RayConfig.requested(n_models)``.
        what: the job, for the message (e.g. ``"this run (hosted, 2 models, 1 worker)"``).
        hint: what to do about it, appended to the message.
    """
    have = ray.cluster_resources()
    need: dict[str, float] = {}
    for _, count, each in wants:
        for k, v in each.items():
            need[k] = need.get(k, 0.0) + count * v
    short = [f"{k}: need {v:g}, cluster has {have.get(k, 0):g}" for k, v in need.items() if v > have.get(k, 0) + 1e-9]
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for who, count, each in wants:
        if count and not any(all(node.get(k, 0) + 1e-9 >= v for k, v in each.items()) for node in nodes):
            short.append(f"no node can hold a {who} ({', '.join(f'{k}={v:g}' for k, v in each.items() if v)})")
    if short:
        raise ClusterResourceError(f"the Ray cluster cannot run {what}: " + "; ".join(short) + ". " + hint)


def check_run_resources(job: TrainJob, cfg: RayConfig) -> None:
    """:func:`check_resources` for the hosts and Train workers of ``job``."""
    check_resources(cfg.requested(len(job.models)),
                    f"this job ({cfg.placement}, {len(job.models)} models, {cfg.num_workers} workers)")


def _replay(tracker: Tracker, histories: dict[str, list[dict]]) -> None:
    for history in histories.values():
        for rec in history:
            tracker.log_metrics({k: v for k, v in rec.items() if k not in ("step", "kind")}, rec["step"])


CHECKPOINT_NAME = re.compile(r".+-\d{7}|final")
"""Names of the checkpoints ``workers.train_worker`` reports: ``<space>-<step, 7 digits>`` and ``final``."""


def earlier_checkpoint(storage: Path, job: TrainJob) -> Path | None:
    """The newest checkpoint that an earlier Ray run of the same training (:func:`kvlingua.run.training_key`, in
    its run directory's job file) left under ``storage``; None where there is none. A driver restarted after a
    stop (a session's end, a crash, an evaluation refused) resumes there instead of from step 0."""
    key = training_key(job)
    found = [d for f in storage.glob(f"{job.name}-*/{JOB_FILE}") if f.read_text() == key
             for d in f.parent.iterdir() if d.is_dir() and CHECKPOINT_NAME.fullmatch(d.name) and any(d.iterdir())]
    return max(found, key=lambda d: d.stat().st_mtime_ns, default=None)


def train_distributed(job: TrainJob, ray_cfg: RayConfig, tracker: Tracker | None = None,
                      progress: bool = True) -> dict:
    """Train every space of ``job`` on Ray, evaluate, write the pool; returns ``kvlingua.run.finish``'s dict.

    Args:
        job: the run.
        ray_cfg: cluster, placement and resources.
        tracker: where metrics go. A tracker with a :meth:`~kvlingua.tracking.Tracker.handle` (MLflow)
            is written live by rank 0; any other gets the metric history after training.
        progress: progress bar on rank 0.

    Raises:
        ClusterResourceError: the cluster lacks the CPUs/GPUs the hosts and workers need.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from workers.train_worker import train_loop

    tracker = tracker or NullTracker()
    handle = tracker.handle()
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    connect(ray_cfg.address)
    check_run_resources(job, ray_cfg)
    run_id = uuid.uuid4().hex[:8]
    host_prefix = f"{job.name}-{run_id}-host-"
    hosts = {}
    if ray_cfg.placement == "hosted":
        hosts = spawn_hosts(job.models, ray_cfg.host, name_prefix=host_prefix, namespace=NAMESPACE)
    storage = Path(ray_cfg.storage_path or Path(job.out_dir) / "ray_train").resolve()
    resume = earlier_checkpoint(storage, job)
    if resume is not None:
        print(f"[train] resuming {job.name} from {resume}", flush=True)
    config = {
        "job": to_dict(job), "placement": ray_cfg.placement, "prefetch": ray_cfg.prefetch,
        "torch_threads": ray_cfg.torch_threads, "host_prefix": host_prefix, "namespace": NAMESPACE,
        "tracking": handle, "progress": progress, "resume_from": None if resume is None else str(resume),
    }
    run_root = storage / f"{job.name}-{run_id}"
    run_root.mkdir(parents=True, exist_ok=True)
    (run_root / JOB_FILE).write_text(training_key(job))  # what a rerun of the same training resumes from
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
    if handle is None:
        _replay(tracker, json.loads(Path(out["files"]["eval_json"]).with_name("histories.json").read_text()))
    return out
