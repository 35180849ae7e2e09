"""Σ-training throughput on Ray (hosted and colocated placements) vs the in-process loop.

How to run (starts and stops a local Ray with 2 CPUs)::

    python bench/bench_train.py                      # 2 tiny models, B=8, P=S=32, 30 timed steps
    python bench/bench_train.py --steps 60 --warmup 5 --hidden 128 --threads 1

The same tiny pool (two frozen models of different architectures, saved as safetensors), the same batches
and the same shared space are trained with :func:`kvlingua.train.fit` three ways:

* **in-process**: ``LocalBackend`` in this process (the reference loop);
* **hosted**: one Ray Train worker, the frozen models in ``ModelHost`` actors reached
  through ``RayBackend`` with the bounded block prefetcher;
* **colocated**: one Ray Train worker that loads the frozen models itself.

Training tokens/s = steps x batch x (prefix + suffix) / wall time, timed from the end of the warm-up steps
to the last step (a tracker records the time of every step). Printed side by side with the ratio to the
in-process loop (target >= 0.8x), which is measured before and after the Ray runs and averaged (load on a
shared machine drifts; the two in-process numbers show how much). Every process uses ``--threads`` threads.

``--shape smollm2`` measures instead the cost of one step at the real pool's shape, in process
(:mod:`experiments.realmodel.step_cost`).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import torch

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.cache import arch_summary
from kvlingua.models import load_frozen
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.train import fit
from kvlingua.train_config import TrainConfig
from experiments.realmodel.step_cost import BF16_AUTO_S, random_batches, run_real_shape


class StepClock:
    """A tracker that records the wall time of every logged step."""

    def __init__(self):
        self.times: dict[int, float] = {}

    def log_params(self, params) -> None:
        pass

    def log_metrics(self, metrics, step: int) -> None:
        self.times[step] = time.perf_counter()

    def log_artifact(self, path) -> None:
        pass

    def handle(self) -> None:
        return None

    def close(self, status: str = "FINISHED") -> None:
        pass


def save_pool(root: Path, hidden: int, vocab: int) -> dict[str, str]:
    """Two frozen tiny models (gemma2, llama) with random weights, saved as safetensors."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=512)
    specs = {"a": (Gemma2ForCausalLM, Gemma2Config(**common, num_hidden_layers=2, query_pre_attn_scalar=hidden // 4,
                                                   sliding_window=16)),
             "b": (LlamaForCausalLM, LlamaConfig(**common, num_hidden_layers=3))}
    paths = {}
    for i, (name, (cls, cfg)) in enumerate(specs.items()):
        torch.manual_seed(i)
        cfg._attn_implementation = "eager"
        cls(cfg).save_pretrained(root / name, safe_serialization=True)
        paths[name] = str(root / name)
    return paths


def measure(backend: PoolBackend, settings: dict, prefetch: int = 0) -> float:
    """Train with ``fit`` on ``backend``; returns training tokens/s after the warm-up steps."""
    s = settings
    names = list(s["models"])
    space = SharedSpace({m: backend.summary(m) for m in names}, SpaceConfig(**s["space"]))
    batches = itertools.cycle(random_batches(names, 8, s["batch"], s["prefix"], s["suffix"], s["vocab"]))
    if prefetch:
        from workers.streaming import BlockPrefetcher
        from workers.train_worker import step_sources

        batches = BlockPrefetcher(backend, batches, prefetch, step_sources(space, TrainConfig(**s["train"])))
    clock = StepClock()
    fit(space, backend, batches, TrainConfig(**s["train"]), runtime=Runtime(tracker=clock, progress=False))
    first, last = s["warmup"], s["train"]["steps"]
    tokens = (last - first) * s["batch"] * (s["prefix"] + s["suffix"])
    return tokens / (clock.times[last] - clock.times[first])


def bench_worker(config: dict) -> None:
    """Ray Train worker: build the placement's backend, measure, report tokens/s."""
    import ray.train

    from workers.train_worker import make_backend

    torch.set_num_threads(config["threads"])
    job = SimpleNamespace(models=config["models"])
    backend = make_backend(job, config, torch.device("cpu"))
    tps = measure(backend, config, prefetch=config["prefetch"] if config["placement"] == "hosted" else 0)
    with tempfile.TemporaryDirectory() as tmp:  # Train keeps the metrics of reports that carry a checkpoint
        Path(tmp, "tokens_per_s.txt").write_text(f"{tps}\n")
        ray.train.report({"tokens_per_s": tps}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_on_ray(placement: str, settings: dict, prefetch: int) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workers.config import HostOptions
    from workers.host import spawn_hosts

    hosts = {}
    config = dict(settings, placement=placement, prefetch=prefetch, host_prefix="bench-host-", namespace="kvlingua")
    if placement == "hosted":
        hosts = spawn_hosts(settings["models"], HostOptions(num_cpus=0.25, torch_threads=settings["threads"]),
                            name_prefix="bench-host-", namespace="kvlingua")
    try:
        with tempfile.TemporaryDirectory() as storage:
            trainer = TorchTrainer(bench_worker, train_loop_config=config,
                                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                                   run_config=RunConfig(name=f"bench-{placement}", storage_path=storage))
            return trainer.fit().metrics["tokens_per_s"]
    finally:
        for h in hosts.values():
            ray.kill(h, no_restart=True)


SHAPE_DEFAULTS = {"tiny": dict(steps=35, warmup=5, prefix=32, threads=1),
                  "smollm2": dict(steps=2, warmup=0, prefix=64, threads=os.cpu_count())}
"""``--shape`` -> the defaults of the flags it leaves unset."""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["tiny", "smollm2"], default="tiny",
                   help="tiny: Ray placements vs in process (the default); smollm2: step time, FLOPs, peak share "
                   "and bf16 frozen models at the real pool's shape (in process)")
    p.add_argument("--steps", type=int, default=None,
                   help="total steps per measurement, warm-up included (default 35; --shape smollm2: 2 per precision)")
    p.add_argument("--warmup", type=int, default=None,
                   help="steps not timed (default 5; --shape smollm2: 0, after one FLOP-counted step)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefix", type=int, default=None, help="prefix tokens (default 32; --shape smollm2: 64)")
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64, help="width of the tiny pool (--shape tiny)")
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default 1; --shape smollm2: every core)")
    p.add_argument("--bf16", choices=["auto", "time", "skip"], default="auto",
                   help="--shape smollm2: time steps with bf16 frozen models unless this machine's bf16 matmul peak "
                   f"puts a step over {BF16_AUTO_S:.0f} s (auto), always (time), or never, NLL cost included (skip)")
    p.add_argument("--nll-rows", type=int, default=4, help="rows of the bf16 NLL cost (--shape smollm2)")
    p.add_argument("--doc", type=Path, default=None,
                   help="--shape smollm2: Markdown file whose generated section (between the bench_train markers) "
                   "this run rewrites, e.g. docs/results/benchmarks.md")
    args = p.parse_args(argv)
    for key, value in SHAPE_DEFAULTS[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.shape == "smollm2":
        return run_real_shape(args, sys.argv[1:] if argv is None else list(argv))
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = 512
        settings = dict(models=save_pool(Path(tmp), args.hidden, vocab), batch=args.batch, prefix=args.prefix,
                        suffix=args.suffix, vocab=vocab, warmup=args.warmup, threads=args.threads,
                        space=dict(q_dim=48, n_heads=2, embed_dim_factor=1.0),
                        train=dict(steps=args.steps, lr=1e-3, log_every=1))
        summary = {m: arch_summary(path) for m, path in settings["models"].items()}
        local = LocalBackend({m: load_frozen(path) for m, path in settings["models"].items()})
        before = measure(local, settings)
        results = {}
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            results["hosted (ModelHost actors)"] = run_on_ray("hosted", settings, args.prefetch)
            results["colocated (models in worker)"] = run_on_ray("colocated", settings, args.prefetch)
        finally:
            ray.shutdown()
        after = measure(local, settings)
    # the reference is measured before and after the Ray runs (a shared machine's load drifts)
    base = (before + after) / 2
    results = {"in-process, before Ray": before, "in-process, after Ray": after, **results}
    print(f"pool: {', '.join(f'{m}={s.model_type} L={s.num_layers} D={s.width}' for m, s in summary.items())}; "
          f"B={args.batch} P={args.prefix} S={args.suffix}; {args.steps - args.warmup} timed steps, "
          f"{args.threads} torch thread(s) per process")
    for name, tps in results.items():
        print(f"{name:>30}: {tps:8.0f} tokens/s  {tps / base:5.2f}x")
    print("target: hosted and colocated >= 0.8x the in-process loop")


if __name__ == "__main__":
    main()
