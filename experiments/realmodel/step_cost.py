"""The cost of one Σ training step at the real-model pool's shape, in process (``python bench/bench_train.py
--shape smollm2``; issue #21 item 6).

Run as::

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
import os
import statistics
import time
from pathlib import Path

import torch

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.batch import Batch
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.train import train_step
from kvlingua.train_config import TrainConfig, make_optimizer

REPO = Path(__file__).resolve().parents[2]


def random_batches(names: list[str], n: int, batch: int, prefix: int, suffix: int, vocab: int) -> list[Batch]:
    """``n`` batches of random ids ``[batch, prefix + suffix]`` (seed 0), the same text for every model."""
    g = torch.Generator().manual_seed(0)
    return [Batch.same_text(torch.randint(0, vocab, (batch, prefix + suffix), generator=g), names, prefix, f"b{i}")
            for i in range(n)]


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


def run_real_shape(args: argparse.Namespace, argv: list[str]) -> None:
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
    batches = random_batches(names, 2, args.batch, args.prefix, args.suffix, vocab)
    nll_batch = random_batches(names, 1, args.nll_rows, args.prefix, args.suffix, vocab)[0]

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
