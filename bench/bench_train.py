"""Σ-training throughput on Ray (hosted and colocated placements) vs the in-process loop.

How to run (starts and stops a local Ray with 2 CPUs)::

    python bench/bench_train.py                      # 2 tiny models, B=8, P=S=32, 30 timed steps
    python bench/bench_train.py --steps 60 --warmup 5 --hidden 128 --threads 1

The same tiny pool (two frozen models of different architectures, saved as
safetensors), the same batches and the same shared space are trained with
:func:`kvlingua.train.fit` three ways:

* **in-process**: ``LocalBackend`` in this process (the reference loop);
* **hosted**: one Ray Train worker, the frozen models in ``ModelHost`` actors reached
  through ``RayBackend`` with the bounded block prefetcher;
* **colocated**: one Ray Train worker that loads the frozen models itself.

Training tokens/s = steps x batch x (prefix + suffix) / wall time, timed from the
end of the warm-up steps to the last step (a tracker records the time of every
step). Printed side by side with the ratio to the in-process loop (target >= 0.8x),
which is measured before and after the Ray runs and averaged (load on a shared
machine drifts; the two in-process numbers show how much).
Every process uses ``--threads`` torch threads.
"""
from __future__ import annotations

import argparse
import itertools
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
from kvlingua.train import Batch, TrainConfig, fit
from kvlingua.translator import SpaceConfig


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


def make_batches(names: list[str], n: int, batch: int, prefix: int, suffix: int, vocab: int) -> list[Batch]:
    g = torch.Generator().manual_seed(0)
    return [Batch.same_text(torch.randint(0, vocab, (batch, prefix + suffix), generator=g), names, prefix, f"b{i}")
            for i in range(n)]


def measure(backend: PoolBackend, settings: dict, prefetch: int = 0) -> float:
    """Train with ``fit`` on ``backend``; returns training tokens/s after the warm-up steps."""
    s = settings
    names = list(s["models"])
    space = SharedSpace({m: backend.summary(m) for m in names}, SpaceConfig(**s["space"]))
    batches = itertools.cycle(make_batches(names, 8, s["batch"], s["prefix"], s["suffix"], s["vocab"]))
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=35, help="total steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="steps not timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--suffix", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
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
