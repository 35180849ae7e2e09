"""The per-rank Ray Train loop: :func:`kvlingua.run.train_spaces` with this rank's runtime.

What Ray adds to the in-process run, and nothing else:

* the backend: the frozen pool behind the driver's ``ModelHost`` actors
  (``placement="hosted"``, a ``RayBackend`` whose source blocks a bounded prefetcher
  requests ahead) or loaded inside the worker (``"colocated"``, a ``LocalBackend``);
* the runtime: this rank's shard of the batches, the gradient all-reduce across ranks
  (one flat buffer, mean: simpler than a DDP wrapper around a module never called as a
  whole), and the driver's MLflow run on rank 0;
* checkpoints: every ``train.checkpoint_every`` steps rank 0 writes every space trained
  so far (:func:`kvlingua.run.save_spaces`) and reports it through ``ray.train.report``;
  after a worker failure Ray Train restarts the group and the spaces resume from the
  last checkpoint, continuing the step count.

When all spaces are trained, rank 0 runs :func:`kvlingua.run.finish` (evaluation, pool
directory, table and plot) and reports its result.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.config import from_dict
from kvlingua.job import TrainJob
from kvlingua.models import load_frozen
from kvlingua.paths import PathSampler
from kvlingua.run import SpaceHooks, finish, save_spaces, train_spaces
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.tracking import attach
from kvlingua.train_config import TrainConfig, TrainState
from workers.backend import RayBackend
from workers.streaming import BlockPrefetcher


def allreduce_mean(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks with one flat all-reduce."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels]
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def make_backend(job: TrainJob, config: dict, device: torch.device) -> PoolBackend:
    """Hosted: a ``RayBackend`` over the driver's named hosts; colocated: the models in this worker."""
    if config["placement"] == "hosted":
        hosts = {m: ray.get_actor(f"{config['host_prefix']}{m}", namespace=config["namespace"]) for m in job.models}
        return RayBackend(hosts)
    return LocalBackend({m: load_frozen(p, device) for m, p in job.models.items()}, device)


def step_sources(space: SharedSpace, cfg: TrainConfig):
    """step -> models whose own prefix block that step reads (sources; targets too with recon loss)."""
    sampler = PathSampler(space.names, cfg.paths_per_step, cfg.seed, cfg.paths, cfg.trainable)

    def sources(step: int) -> list[str]:
        paths = sampler.sample(step)
        models = [i for i, _ in paths] + ([j for _, j in paths] if cfg.recon_weight > 0 else [])
        return list(dict.fromkeys(models))

    return sources


def report(metrics: dict, spaces: dict[str, SharedSpace] | None, states: dict[str, TrainState], name: str,
           is_main: bool) -> None:
    """``ray.train.report`` on every rank; rank 0 attaches a checkpoint of ``states`` (all spaces so far)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if is_main:
            save_spaces(tmp, spaces, states)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def train_loop(config: dict) -> None:
    """Ray Train worker function. ``config``: ``job`` (``to_dict(TrainJob)``), ``placement``, ``prefetch``,
    ``torch_threads``, ``host_prefix``, ``namespace``, ``tracking`` (the driver's tracker handle or None),
    ``progress``, ``resume_from`` (an earlier run's checkpoint directory, :func:`workers.driver.earlier_checkpoint`,
    or None)."""
    job = from_dict(TrainJob, config["job"])
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    backend = make_backend(job, config, device)
    runtime = Runtime.for_rank(rank, world, attach(config["tracking"]), allreduce_mean, config["progress"])
    checkpoint = ray.train.get_checkpoint()  # this run's own, after a worker failure; else an earlier run's
    resume_from = (Path(checkpoint.to_directory()) if checkpoint is not None
                   else Path(config["resume_from"]) if config.get("resume_from") else None)

    def save(name: str, spaces: dict[str, SharedSpace], states: dict[str, TrainState]) -> None:
        state = states[name]
        report({"space": name, "step": state.step}, spaces, states, f"{name}-{state.step:07d}", runtime.is_main)

    wrap = None
    if isinstance(backend, RayBackend) and config["prefetch"] > 0:
        def wrap(space, cfg, batches, start):
            return BlockPrefetcher(backend, batches, config["prefetch"], step_sources(space, cfg), start)

    hooks = SpaceHooks(save=save if job.train.checkpoint_every else None, wrap_batches=wrap)
    spaces, states = train_spaces(job, backend, runtime, device=device, resume_from=resume_from, hooks=hooks)
    result = {}
    if runtime.is_main:
        result = finish(job, spaces, backend, states, runtime.tracker)
        result.pop("eval")  # the table and file paths; eval.json has the rest
    report({"space": "", "step": job.max_steps, "result": json.dumps(result)}, spaces, states, "final",
           runtime.is_main)
