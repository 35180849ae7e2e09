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

**At the real shape** (``--shape smollm2``, in process, no Ray; issue #21 item 6)::

    python bench/bench_train.py --shape smollm2 [--steps 2 --warmup 0] [--bf16 auto|time|skip] [--nll-rows 4]
                                [--doc docs/results/benchmarks.md]

The real-model pool's shape with random weights built from configs (no download): SmolLM2-135M
(``configs/shapes/smollm2-135m.json``) and the tiny Gemma-2 member (``1.9m-l2-d256``, SmolLM2's vocabulary), the
main space of ``configs/real.yaml``, batch 8, prefix 64, suffix 32, all 4 paths. One run prints side by side:

* the step time (:func:`kvlingua.train.train_step` + clipping + AdamW, ``LocalBackend``) with the frozen models
  in fp32 and in bf16 autocast (``LocalBackend(precision="bf16")``), steps interleaved, medians;
* the FLOPs of one step, counted by ``FlopCounterMode`` on a step of its own (not a timed one), and the
  GFLOP/s each precision achieves;
* this machine's matmul peak (the best of repeated n×n matmuls, fp32 and bf16) and the share of it a step uses;
* what bf16 costs in suffix NLL: each model reading its own prefix cache, the same rows under both precisions,
  the mean difference over rows ± its standard error.

bf16 steps are timed unless the measured bf16 matmul peak puts a step's frozen FLOPs alone over two minutes
(``--bf16 auto``; a CPU without bf16 instructions runs bf16 products 10-200x slower than fp32): the table then
says why and what the measured bf16 peak implies. ``--doc`` rewrites the generated section of a Markdown file
with the tables. No timing is asserted.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
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
from kvlingua.batch import Batch
from kvlingua.train import fit, train_step
from kvlingua.train_config import TrainConfig, make_optimizer
from kvlingua.translator import SpaceConfig

REPO = Path(__file__).resolve().parents[1]


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


# --- at the real shape (--shape smollm2) -----------------------------------------------------------------------

BF16_AUTO_S = 120.0
"""``--bf16 auto`` times bf16 steps unless their frozen FLOPs at the measured bf16 peak alone take longer."""

TINY_SIZE = "1.9m-l2-d256"
"""The tiny member of ``configs/pools/real.yaml`` (a pre-trained Gemma-2 there; random weights here)."""


def real_shape_pool() -> dict[str, torch.nn.Module]:
    """SmolLM2-135M from its shape file and the tiny Gemma-2 on SmolLM2's vocabulary, random weights, frozen."""
    from transformers import AutoModelForCausalLM, Gemma2ForCausalLM

    from kvlingua.models import freeze
    from kvlingua.plan import load_model_config
    from kvlingua.pretrain.sizes import gemma2_config

    cfg = load_model_config(REPO / "configs/shapes/smollm2-135m.json")
    cfg._attn_implementation = "eager"  # as load_frozen loads every pool model
    torch.manual_seed(0)
    smollm2 = AutoModelForCausalLM.from_config(cfg)
    torch.manual_seed(1)
    tiny = Gemma2ForCausalLM(gemma2_config(TINY_SIZE, vocab_size=cfg.vocab_size))
    return {"smollm2": freeze(smollm2), "tiny": freeze(tiny)}


def real_space_config() -> SpaceConfig:
    """The main space of ``configs/real.yaml`` (``spaces.translator``): the method's defaults, per-layer output."""
    from kvlingua.config import from_dict, load_yaml

    return from_dict(SpaceConfig, load_yaml(REPO / "configs/real.yaml")["spaces"]["translator"], "spaces.translator")


def matmul_peak(dtype: torch.dtype, n_max: int = 2048, budget_s: float = 1.0) -> tuple[float, int]:
    """``(best GFLOP/s, n)`` of an ``[n, n] @ [n, n]`` product in ``dtype`` (2 n³ flops), repeated for ``budget_s``
    seconds by the faster of ``torch.mm`` and ``F.linear`` (the kernel a model's layers use; on a CPU they can
    differ tenfold in bf16) on a 256² probe.

    ``n`` is ``n_max`` unless the probe says one product would take longer than ``2 * budget_s`` (bf16 on a CPU
    without bf16 instructions): then the largest power of two that fits, so the peak takes seconds.
    """
    products = {"mm": torch.mm, "linear": torch.nn.functional.linear}

    def best_of(product, n: int, min_reps: int, min_s: float) -> float:
        g = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        product(a, b)  # warm-up
        best, reps, start = float("inf"), 0, time.perf_counter()
        while reps < min_reps or time.perf_counter() - start < min_s:
            t = time.perf_counter()
            product(a, b)
            best = min(best, time.perf_counter() - t)
            reps += 1
        return 2 * n ** 3 / best  # flop/s

    probe = {name: best_of(f, 256, 10, 0.0) for name, f in products.items()}
    fastest = max(probe, key=probe.get)
    n = n_max
    while n > 256 and 2 * n ** 3 / probe[fastest] > 2 * budget_s:
        n //= 2
    return best_of(products[fastest], n, 3, budget_s) / 1e9, n


def step_flops(space: SharedSpace, backend: LocalBackend, batch: Batch, paths, cfg: TrainConfig) -> dict[str, float]:
    """FLOPs of one ``train_step`` (forward and backward, frozen models and adapters) by ``FlopCounterMode``:
    ``total``, ``frozen`` (the pool models' own modules), ``adapters`` (Σ's translators) and ``other``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(space, backend, batch, paths, cfg)
    space.zero_grad(set_to_none=True)
    by_module = {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}
    frozen = sum(by_module.get(c, 0.0) for c in {type(m).__name__ for m in backend.models.values()})
    adapters = sum(v for k, v in by_module.items() if "." not in k and k.endswith(("Translator", "Adapter")))
    total = float(counter.get_total_flops())
    return {"total": total, "frozen": frozen, "adapters": adapters, "other": total - frozen - adapters}


def timed_step(space: SharedSpace, backend: PoolBackend, batch: Batch, paths, cfg: TrainConfig, opt) -> float:
    """Seconds of one optimiser step as :func:`kvlingua.train.fit` takes it: losses and gradients of every path,
    clipping, AdamW."""
    t = time.perf_counter()
    train_step(space, backend, batch, paths, cfg)
    torch.nn.utils.clip_grad_norm_(space.parameters_of(space.names), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def nll_cost(backends: dict[str, PoolBackend], batch: Batch) -> dict[str, tuple[float, float, float, int]]:
    """Per model: its suffix NLL after its own prefix cache, fp32 vs bf16 (each computed end to end by the backend
    of that precision), on the same rows. model -> (mean fp32 NLL, mean bf16 - fp32 over rows, its standard error,
    rows); a row's NLL is the mean over its suffix tokens."""
    out = {}
    for m in backends["fp32"].names():
        rows = {p: b.suffix_nll(m, b.prefix_block(m, batch.prefix(m)), batch.suffix(m)).mean(1)  # [rows]
                for p, b in backends.items()}
        diff = rows["bf16"] - rows["fp32"]
        out[m] = (float(rows["fp32"].mean()), float(diff.mean()), float(diff.std() / len(diff) ** 0.5), len(diff))
    return out


def cpu_line() -> str:
    """The CPU's model name and torch's CPU capability (e.g. ``AVX2``, ``AVX512``): what bf16 speed depends on."""
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def real_shape(args: argparse.Namespace, argv: list[str]) -> None:
    """Step time, FLOPs, peak share and bf16 frozen models at the real pool's shape, in one run."""
    wall, load = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    models = real_shape_pool()
    backends = {p: LocalBackend(models, precision=p) for p in ("fp32", "bf16")}
    names = list(models)
    summaries = {m: backends["fp32"].summary(m) for m in names}
    torch.manual_seed(0)
    space = SharedSpace(summaries, real_space_config())
    cfg = TrainConfig(steps=1000, lr=2e-5)  # real.yaml's lr (AdamW costs the same at any lr)
    opt, _ = make_optimizer(space, cfg)
    paths = [(i, j) for i in names for j in names]
    vocab = summaries["smollm2"].vocab_size
    batches = make_batches(names, 2, args.batch, args.prefix, args.suffix, vocab)
    nll_batch = make_batches(names, 1, args.nll_rows, args.prefix, args.suffix, vocab)[0]

    peaks = {"fp32": [matmul_peak(torch.float32)], "bf16": [matmul_peak(torch.bfloat16)]}
    flops = step_flops(space, backends["fp32"], batches[0], paths, cfg)  # also the fp32 backend's warm-up step
    bf16_bound_s = flops["frozen"] / 1e9 / peaks["bf16"][0][0]  # a bf16 step's frozen passes at the bf16 peak
    timed = ["fp32"] + (["bf16"] if args.bf16 == "time" or (args.bf16 == "auto" and bf16_bound_s <= BF16_AUTO_S)
                        else [])
    times: dict[str, list[float]] = {p: [] for p in timed}
    for step in range(args.steps):  # interleaved: a shared machine's load drifts
        for prec in timed:
            t = timed_step(space, backends[prec], batches[step % len(batches)], paths, cfg, opt)
            if step >= args.warmup:
                times[prec].append(t)
    peaks["fp32"].append(matmul_peak(torch.float32))  # again after the steps: the best of the two is the peak
    cost = nll_cost(backends, nll_batch) if args.bf16 != "skip" else {}
    result = dict(args=vars(args), flops=flops, times=times, nll=cost, space=space, summaries=summaries,
                  peak={p: max(v) for p, v in peaks.items()}, peaks=peaks,
                  params={m: sum(p.numel() for p in models[m].parameters()) for m in names},
                  wall_s=time.perf_counter() - wall, load_start=load, cpu=cpu_line())
    lines = real_shape_table(result)
    print("\n".join(lines))
    if args.doc:
        write_doc(args.doc, lines, result, argv)


def real_shape_table(r: dict) -> list[str]:
    """The Markdown lines of one ``--shape smollm2`` run: setting, step table, NLL table."""
    a, f = r["args"], {k: v / 1e9 for k, v in r["flops"].items()}
    (p32, n32), (p16, n16) = r["peak"]["fp32"], r["peak"]["bf16"]
    med = {p: statistics.median(t) for p, t in r["times"].items()}
    pool = ", ".join(f"{m} ({s.model_type}, L={s.num_layers}, D={s.width}, {r['params'][m] / 1e6:.1f}M params)"
                     for m, s in r["summaries"].items())
    cfg = r["space"].cfg
    adapters = sum(p.numel() for p in r["space"].parameters())
    lines = [f"Pool (random weights, built from configs): {pool}. Space: `configs/real.yaml` spaces.translator "
             f"(Q = {cfg.q}, output {cfg.output}, init {cfg.init} (not run: a step costs the same), sink "
             f"{cfg.sink_tokens}, keys {cfg.keys}; {adapters / 1e6:.1f}M adapter parameters). B={a['batch']}, "
             f"P={a['prefix']}, S={a['suffix']}, all 4 paths, in process (`LocalBackend`); a step is `train_step` + "
             f"clipping + AdamW; {a['steps'] - a['warmup']} timed steps per precision after {a['warmup']} warm-up "
             f"(and one FLOP-counted step), precisions interleaved; {a['threads']} torch thread(s) on {r['cpu']}.",
             "",
             f"FLOPs of one step (`FlopCounterMode`, forward + backward): **{f['total']:.1f} GFLOP** (frozen models "
             f"{f['frozen']:.1f}, adapters {f['adapters']:.1f}, other {f['other']:.1f}). Matmul peak (best "
             f"n×n @ n×n of `torch.mm` and `F.linear`): fp32 **{p32:.1f} GFLOP/s** (n={n32}; before / after the "
             f"steps: {' / '.join(f'{p:.1f}' for p, _ in r['peaks']['fp32'])}), bf16 **{p16:.1f} GFLOP/s** (n={n16}) = "
             f"{p16 / p32:.3f}× fp32.", "",
             "| frozen models | step median (s) | steps (s) | × fp32 | GFLOP/s | share of fp32 peak | "
             "share of bf16 peak |", "|---|---|---|---|---|---|---|"]
    for prec in ("fp32", "bf16"):
        if prec not in med:
            why = ("`--bf16 skip`" if a["bf16"] == "skip" else f"bf16 matmul runs at {p16 / p32:.3f}× fp32 on this "
                   f"machine (no fast bf16 kernel), so a step's {f['frozen']:.0f} frozen GFLOP alone would take "
                   f"≥ {f['frozen'] / p16:.0f} s (> {BF16_AUTO_S:.0f} s); `--bf16 time` times it anyway")
            lines.append(f"| {prec} | not timed: {why} | | | | | |")
            continue
        rate = f["total"] / med[prec]
        lines.append(f"| {prec} | {med[prec]:.2f} | {', '.join(f'{x:.2f}' for x in r['times'][prec])} | "
                     f"{med[prec] / med['fp32']:.2f} | {rate:.1f} | {rate / p32:.3f} | {rate / p16:.3f} |")
    if r["nll"]:
        lines += ["", "What bf16 frozen models cost in suffix NLL: each model reads its own prefix cache, the "
                  f"same {a['nll_rows']} rows of random ids under both precisions (computed end to end by each "
                  f"backend); a row's NLL is its mean over {a['suffix'] - 1} suffix tokens:", "",
                  "| model | NLL fp32 (nats) | bf16 − fp32 (nats) | ± SE over rows | rows |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {base:.4f} | {d:+.5f} | {se:.5f} | {n} |" for m, (base, d, se, n) in r["nll"].items()]
    return lines


BEGIN = "<!-- bench_train --shape smollm2: generated, begin -->"
END = "<!-- bench_train --shape smollm2: generated, end -->"


def write_doc(path: Path, lines: list[str], r: dict, argv: list[str]) -> None:
    """Rewrite the generated section of ``path`` (appended when absent) with this run's tables."""
    from experiments.toolkit.provenance import commit, machine

    head = (f"**Σ step at the real shape** (generated by `python bench/bench_train.py {' '.join(argv)}`, commit "
            f"`{commit()}`, {machine()} ({r['load_start']:.1f} at the start), wall {r['wall_s']:.0f} s).")
    block = "\n".join([BEGIN, "", head, "", *lines, "", END])
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


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
        return real_shape(args, sys.argv[1:] if argv is None else list(argv))
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
