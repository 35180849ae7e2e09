"""Meta-training (paper §6.1) on Ray Train: :func:`kvlingua.modules.conditions.run_meta_training` per rank.

What Ray adds, as for Σ training (``workers.train_worker``), and nothing else: each rank loads
the pool's frozen models (colocated: a meta-training step reads only small module blocks, so
there is nothing to stream), reads its shard of the meta-train tasks (task t on rank
``t % world``), all-reduces the adapters' gradients (:func:`workers.train_worker.allreduce_mean`)
and writes into the driver's MLflow run from rank 0 (:func:`kvlingua.tracking.attach`). The
modules are learned (or found in the store) by the driver before the ranks start, so every rank
reads them from the store instead of learning them again. Rank 0 writes ``<out_dir>/pool-meta``.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import ray.train
import torch

from kvlingua.config import from_dict, to_dict
from kvlingua.modules.conditions import ModulesConfig, run_meta_training
from kvlingua.runtime import Runtime
from kvlingua.tracking import NullTracker, Tracker, attach
from workers.driver import check_resources, connect
from workers.train_worker import allreduce_mean

RESULT_FILE = "meta_result.json"
"""Rank 0's result in ``out_dir``."""


def meta_loop(config: dict) -> None:
    """Ray Train worker function. ``config``: ``modules`` (``to_dict(ModulesConfig)``), ``tracking`` (the
    driver's tracker handle or None), ``progress``, ``torch_threads``."""
    cfg = from_dict(ModulesConfig, config["modules"])
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    runtime = Runtime.for_rank(ctx.get_world_rank(), ctx.get_world_size(), attach(config["tracking"]),
                               allreduce_mean, config["progress"])
    result = run_meta_training(cfg, runtime=runtime, log=lambda _: None)
    if runtime.is_main:  # the driver reads it from the run directory (no checkpoint to carry it)
        (Path(cfg.out_dir) / RESULT_FILE).write_text(json.dumps(result))
    ray.train.report({"steps": result["steps"]})


def meta_train_distributed(cfg: ModulesConfig, *, num_workers: int = 1, worker_num_cpus: float = 1.0,
                           tracker: Tracker | None = None, progress: bool = True, address: str | None = None) -> dict:
    """Meta-train on ``num_workers`` Ray Train ranks (gloo); returns rank 0's result
    (``init``, ``tasks_seen``, ``loss``, ``pool``, ``steps``)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    tracker = tracker or NullTracker()
    # the ranks run in Ray's session directory: every path they read or write is made absolute here
    cfg = replace(cfg, pool=str(Path(cfg.pool).resolve()), out_dir=str(Path(cfg.out_dir).resolve()),
                  store=str(cfg.store_dir().resolve()),
                  pool_recon=str(Path(cfg.pool_recon).resolve()) if cfg.pool_recon else None)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    connect(address)
    check_resources([("meta-training worker", num_workers, {"CPU": worker_num_cpus})],
                    f"meta-training ({num_workers} workers)")
    name = f"modules-meta-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        meta_loop,
        train_loop_config={"modules": to_dict(cfg), "tracking": tracker.handle(), "progress": progress,
                           "torch_threads": max(1, int(worker_num_cpus))},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": worker_num_cpus}),
        run_config=RunConfig(name=name, storage_path=str((Path(cfg.out_dir) / "ray_train").resolve()),
                             failure_config=FailureConfig(max_failures=0)),
    )
    (Path(cfg.out_dir) / RESULT_FILE).unlink(missing_ok=True)
    trainer.fit()
    return json.loads((Path(cfg.out_dir) / RESULT_FILE).read_text())
