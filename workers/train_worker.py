"""The per-rank Ray Train loop: :func:`kvlingua.train.fit` against the pool, checkpointed.

Every rank holds all adapters of every shared space (they are small) and reads its
own shard of the batches. After each backward, ``grad_sync`` all-reduces the adapter
gradients across ranks (one flat buffer, mean) — correct with sampled paths, where
some adapters get no gradient on a step (``fit`` gives them zeros so every rank
reduces the same tensors), and simpler than a DDP wrapper around a module that is
never called as a whole.

The frozen pool is reached through ``ModelHost`` actors (``placement="hosted"``, a
``RayBackend`` with a bounded block prefetcher) or loaded inside the worker
(``placement="colocated"``, a ``LocalBackend``). The job's spaces train one after
the other with the same loop. Every ``checkpoint_every`` steps rank 0 writes every
space trained so far to a checkpoint reported through ``ray.train.report``; after a
worker failure Ray Train restarts the group and :func:`train_loop` resumes from the
last checkpoint, continuing the step count. Rank 0 logs metrics and, when all
spaces are trained, runs :func:`kvlingua.job.finish` (evaluation, pool directory,
table and plot) and reports its result.
"""
from __future__ import annotations

import json
import tempfile
from itertools import islice
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.config import from_dict
from kvlingua.evaluate import make_eval_fn
from kvlingua.job import TrainJob, main_space, allowed_paths, build_space, eval_batches, finish, train_batches
from kvlingua.models import load_frozen
from kvlingua.paths import PathSampler
from kvlingua.space import SharedSpace
from kvlingua.tracking import MlflowTracker, NullTracker, Tracker, space_tracker
from kvlingua.train import TrainConfig, TrainState, fit, load_checkpoint, save_checkpoint
from workers.backend import RayBackend
from workers.streaming import BlockPrefetcher

PROGRESS_FILE = "progress.json"
"""In a checkpoint: ``{"done": [finished spaces], "current": space or null}``."""


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


def _write_checkpoint(root: Path, spaces: dict[str, SharedSpace], states: dict[str, TrainState],
                      done: list[str], current: str | None) -> None:
    for name in [*done, *([current] if current else [])]:
        save_checkpoint(root / name, spaces[name], states[name])
    (root / PROGRESS_FILE).write_text(json.dumps({"done": done, "current": current}))


def train_loop(config: dict) -> None:
    """Ray Train worker function. ``config``: ``job`` (``to_dict(TrainJob)``), ``train`` (the loop's
    ``TrainConfig`` as a dict), ``placement``, ``prefetch``, ``torch_threads``, ``host_prefix``,
    ``namespace``, ``tracking`` (``{"uri", "run_id"}`` or None), ``progress``."""
    job = from_dict(TrainJob, config["job"])
    cfg = from_dict(TrainConfig, config["train"])
    torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    is_main = rank == 0
    device = torch.device("cuda", ctx.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    backend = make_backend(job, config, device)
    summaries = {m: backend.summary(m) for m in job.models}
    tracking = config.get("tracking")
    tracker: Tracker = MlflowTracker.attach(tracking["uri"], tracking["run_id"]) if is_main and tracking \
        else NullTracker()

    spaces, states, done, current = {}, {}, [], None
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory())
        progress = json.loads((resume_dir / PROGRESS_FILE).read_text())
        done, current = list(progress["done"]), progress["current"]

    held_out = eval_batches(job)[: max(1, job.eval.batches // 4)] if is_main else []
    for name in job.spaces:
        space = build_space(job, name, summaries).to(device)
        spaces[name] = space
        state = None
        if resume_dir is not None and (name in done or name == current):
            state = load_checkpoint(resume_dir / name, space)
        if name in done:
            states[name] = state
            continue

        def checkpoint_fn(s: TrainState, name: str = name) -> None:
            states[name] = s
            metrics = {"space": name, "step": s.step}
            with tempfile.TemporaryDirectory() as tmp:
                if is_main:
                    _write_checkpoint(Path(tmp), spaces, states, list(done), name)
                ckpt = ray.train.Checkpoint.from_directory(tmp) if is_main else None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"{name}-{s.step:07d}")

        space_cfg = job.train_for(name, cfg)
        start = state.step if state is not None else 0
        batches = islice(train_batches(job, rank=rank, world_size=world), start, None)
        if isinstance(backend, RayBackend) and config["prefetch"] > 0:
            batches = BlockPrefetcher(backend, batches, config["prefetch"], step_sources(space, space_cfg), start)
        eval_fn = make_eval_fn(backend, held_out, allowed_paths(job), space,
                               first_tokens=job.eval.first_tokens) if is_main else None
        states[name] = fit(space, backend, batches, space_cfg, tracker=space_tracker(tracker, name, main_space(job.spaces)), state=state, eval_fn=eval_fn,
                           checkpoint_fn=checkpoint_fn, grad_sync=allreduce_mean if world > 1 else None,
                           is_main=is_main, progress=config["progress"] and is_main)
        done.append(name)

    result = {}
    if is_main:
        result = finish(job, spaces, backend, {name: states[name] for name in job.spaces}, tracker)
    with tempfile.TemporaryDirectory() as tmp:
        if is_main:
            _write_checkpoint(Path(tmp), spaces, states, done, None)
        ckpt = ray.train.Checkpoint.from_directory(tmp) if is_main else None
        summary = {k: v for k, v in result.items() if k != "eval"}  # the table and file paths; eval.json has the rest
        ray.train.report({"space": "", "step": job.max_steps, "result": json.dumps(summary)}, checkpoint=ckpt,
                         checkpoint_dir_name="final")
