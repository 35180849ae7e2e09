"""``kvlingua real-model``: a pool with a real pretrained model, end to end, into one generated report.

Runs, each stage skipped when its output exists (so an interrupted run resumes):

1. ``train`` — the run config (default ``configs/real.yaml``: SmolLM2-135M-Instruct and a tiny Gemma-2
   pre-trained here with SmolLM2's tokenizer) through the one training route, on Ray unless
   ``--in-process``: the pool is fetched/pre-trained first, every space trains, the final table is
   on the test split;
2. ``positions`` — the trained pool re-scored at each ``--positions`` prefix length
   (:func:`kvlingua.run.evaluate_pool_dir`);
3. ``levers`` — each lever's start against the trained space (:func:`kvlingua.levers.lever_starts`), and, with
   ``--objective-seconds S``, ``objectives``: the main space trained afresh for S wall seconds per training
   objective (suffix cross-entropy, suffix KL, + reconstruction; :func:`kvlingua.levers.objective_runs`);
4. ``bench`` — ``bench/bench_handoff.py`` on the trained pool: translating a ``--bench-prefix``-token
   cache from the shallow model into the deep one against the deep one re-reading the text;

then writes the report (``--report``, default ``docs/results/real-model.md``) from those files only:
the pool, the final table, the claims with paired differences and standard errors, the depth-linear
adapter against the paper's at the training wall times the run recorded, the levers (and the training objectives
at equal wall time, where that stage ran), the position table, the hand-off benchmark, and the adapter sizes at the
public shapes of ``configs/shapes/``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "real.yaml"
DEFAULT_REPORT = REPO / "docs" / "results" / "real-model.md"
SHAPES = REPO / "configs" / "shapes"
STAGES_FILE = "real_model_stages.json"
"""Wall seconds of each finished stage, kept beside the run so a resumed run reports every stage."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "real-model",
        help="a real pretrained model in the pool: train, positions, hand-off bench, report",
        description="Trains the shared space of a pool with a real pretrained model (configs/real.yaml: "
        "SmolLM2-135M-Instruct beside a tiny Gemma-2 that reads its tokenizer), re-scores it at several prefix "
        "lengths, benchmarks the hand-off, and generates docs/results/real-model.md. Stages whose files exist "
        "are skipped.",
    )
    p.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG), help="run YAML (default configs/real.yaml)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, as for `kvlingua train` (repeatable)")
    p.add_argument("--positions", type=int, nargs="+", default=[16, 64, 256, 512], metavar="P",
                   help="prefix lengths of the position table (default 16 64 256 512)")
    p.add_argument("--bench-prefix", type=int, default=512, help="prefix tokens of the hand-off benchmark")
    p.add_argument("--bench-repeats", type=int, default=5, help="timed rounds of the hand-off benchmark")
    p.add_argument("--report", default=None, help="report path (default docs/results/real-model.md)")
    p.add_argument("--objective-seconds", type=float, default=0.0, metavar="S",
                   help="train the main space afresh for S wall seconds per training objective (suffix, kl, recon) "
                   "and score each on the levers' rows (default 0: skip this stage)")
    p.add_argument("--levers", nargs="+", default=None, metavar="NAME",
                   help="the levers to score at the start (default all of kvlingua.levers.DEFAULT_LEVERS, e.g. "
                   "'start (closed form)' 'sink_tokens: 0'); each costs a calibration pass and a scoring")
    p.add_argument("--in-process", action="store_true", help="train without Ray (the reference loop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _stages(run_dir: Path) -> dict:
    f = run_dir / STAGES_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _record(run_dir: Path, stage: str, seconds: float) -> None:
    stages = _stages(run_dir)
    stages[stage] = round(seconds, 1)
    (run_dir / STAGES_FILE).write_text(json.dumps(stages, indent=1) + "\n")


def _roles(pool_json: dict) -> tuple[str, str]:
    """``(deep, shallow)``: the members with the most and the fewest layers."""
    members = sorted(pool_json["members"], key=lambda m: m["summary"]["num_layers"])
    return members[-1]["name"], members[0]["name"]


def _bench_text(path: Path, split: str = "test") -> Path:
    """The held-out split's English text in one file (the benchmark's real prefix and suffix)."""
    from kvlingua.data.views import DataConfig, documents

    path.write_text("\n".join(documents(DataConfig(view="en"), split)))
    return path


def _record_held_prefix(run_dir: Path, positions_dir: Path, positions: list[int], tol: float = 0.05) -> None:
    """Write ``held_prefix_len`` into each pool's ``pool.json``: the longest prefix of the position grid up to which
    every path of the main space keeps its content within ``tol`` of its content at the trained top. Serving then
    hands over latents up to that length (a pool with un-rotated keys has no other position limit)."""
    from kvlingua.evaluate import EvalResult
    from kvlingua.pool import POOL_FILE
    from kvlingua.rundir import main_space, read_run_pools

    pools = read_run_pools(run_dir)
    meta = json.loads((pools[main_space(pools)] / POOL_FILE).read_text())
    top = meta.get("trained_prefix_len", [None, None])[1]
    files = {p: positions_dir / f"eval-test-P{p}.json" for p in sorted(positions)}
    if top not in files or not all(f.is_file() for f in files.values()):
        return
    results = {p: EvalResult.from_dict(json.loads(f.read_text())) for p, f in files.items()}
    space = main_space(pools)
    ref = {path: results[top].summary_for(path, space).content for path in results[top].paths}
    held = None
    for p, r in results.items():
        if p > top and any(r.summary_for(path, space).content < ref[path] - tol for path in r.paths):
            break
        held = p
    for d in pools.values():
        m = json.loads((d / POOL_FILE).read_text())
        if m.get("held_prefix_len", "unset") != held:  # a rerun leaves the file as it is
            m["held_prefix_len"] = held
            (d / POOL_FILE).write_text(json.dumps(m, indent=2) + "\n")


def _levers(run_dir: Path, out: Path, names: list[str] | None = None) -> None:
    """``levers/<k>.json`` per lever (:func:`kvlingua.levers.lever_starts`) and ``names.json`` (file key -> name)."""
    from kvlingua.levers import DEFAULT_LEVERS, lever_starts

    out.mkdir(exist_ok=True)
    levers = None if names is None else {n: DEFAULT_LEVERS[n] for n in names}
    results = lever_starts(run_dir, levers, batches=4)  # 4 held-out batches: each variant is a calibration + a scoring
    names = {}
    for n, (name, result) in enumerate(results.items()):
        key = "trained" if name == "trained" else f"lever{n}"
        result.to_json(out / f"{key}.json")
        names[key] = name
    (out / "names.json").write_text(json.dumps(names, indent=1) + "\n")


def _objectives(run_dir: Path, out: Path, seconds: float, progress: bool) -> None:
    """``objectives/<name>.json`` per objective (:func:`kvlingua.levers.objective_runs`, on the levers' 4 held-out
    batches) and ``runs.json`` (objective -> steps reached, schedule, train seconds, kept step; the budget)."""
    from kvlingua.levers import objective_runs

    out.mkdir(exist_ok=True)
    runs = objective_runs(run_dir, seconds=seconds, batches=4, progress=progress)
    for name, run in runs.items():
        run.result.to_json(out / f"{name}.json")
    table = {name: {"steps": r.steps, "schedule_steps": r.schedule_steps, "train_s": round(r.train_s, 1),
                    "best_step": r.best_step} for name, r in runs.items()}
    (out / "runs.json").write_text(json.dumps({"seconds": seconds, "runs": table}, indent=1) + "\n")


def _continuations(run_dir: Path, source: str, target: str, n: int = 3, prompt_tokens: int = 48,
                   max_new_tokens: int = 32) -> None:
    """Greedy continuations of ``n`` held-out prompts: ``target`` after ``source``'s cache through Σ, and after
    re-reading the text (``continuations.json``; :func:`kvlingua.crosstext.continuations`)."""
    from kvlingua.crosstext import continuations
    from kvlingua.pool import load_pool

    rows = continuations(load_pool(run_dir / "pool"), source, target, n, prompt_tokens, max_new_tokens)
    (run_dir / "continuations.json").write_text(json.dumps(
        {"source": source, "target": target, "max_new_tokens": max_new_tokens, "rows": rows}, indent=1) + "\n")


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import ConfigError, parse_override
    from kvlingua.run import evaluate_pool_dir
    from orchestrator.commands.train import execute
    from workers.run_config import load_run_config, run_dir_of

    if any(p < 1 for p in args.positions) or args.bench_prefix < 1 or args.bench_repeats < 1:
        raise ConfigError("--positions, --bench-prefix and --bench-repeats must be positive")
    if args.levers is not None:
        from kvlingua.levers import DEFAULT_LEVERS

        unknown = [n for n in args.levers if n not in DEFAULT_LEVERS]
        if unknown:
            raise ConfigError(f"--levers: unknown lever(s) {unknown}; known: {list(DEFAULT_LEVERS)}")
    if args.objective_seconds < 0:
        raise ConfigError("--objective-seconds must be >= 0 (0: skip the objectives stage)")
    cfg = load_run_config(args.config, dict(parse_override(o) for o in args.override))
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    command = "kvlingua real-model" + (f" {args.config}" if Path(args.config).resolve() != DEFAULT_CONFIG else "")
    command += "".join(f" -o {o}" for o in args.override) + (" --in-process" if args.in_process else "")
    command += f" --objective-seconds {args.objective_seconds:g}" if args.objective_seconds > 0 else ""
    command += " --levers " + " ".join(f"'{n}'" for n in args.levers) if args.levers else ""

    if not ((run_dir / "eval.json").is_file() and (run_dir / "pool" / "pool.json").is_file()):
        print(f"[real-model] train: {args.config} -> {run_dir}", flush=True)
        start = time.perf_counter()
        execute(cfg, address=os.environ.get("RAY_ADDRESS"), in_process=args.in_process, progress=progress)
        _record(run_dir, "train", time.perf_counter() - start)
    positions_dir = run_dir / "positions"
    positions_dir.mkdir(exist_ok=True)
    for p in args.positions:
        out = positions_dir / f"eval-test-P{p}.json"
        if out.is_file():
            continue
        print(f"[real-model] positions: P = {p}", flush=True)
        start = time.perf_counter()
        result, _ = evaluate_pool_dir(run_dir, split="test", prefix_len=p)
        result.to_json(out)
        _record(run_dir, f"positions P={p}", time.perf_counter() - start)
    _record_held_prefix(run_dir, positions_dir, args.positions)
    levers_dir = run_dir / "levers"
    if not (levers_dir / "names.json").is_file():
        print("[real-model] levers: each lever's closed-form start against the trained space", flush=True)
        start = time.perf_counter()
        _levers(run_dir, levers_dir, args.levers)
        _record(run_dir, "levers", time.perf_counter() - start)
    objectives_dir = run_dir / "objectives"
    if args.objective_seconds > 0 and not (objectives_dir / "runs.json").is_file():
        print(f"[real-model] objectives: the main space trained {args.objective_seconds:g} s per objective",
              flush=True)
        start = time.perf_counter()
        _objectives(run_dir, objectives_dir, args.objective_seconds, progress)
        _record(run_dir, "objectives", time.perf_counter() - start)
    pool_json = json.loads((run_dir / "pool" / "pool.json").read_text())
    deep, shallow = _roles(pool_json)
    if not (run_dir / "continuations.json").is_file():
        print(f"[real-model] continuations: {shallow} -> {deep}, latent and text", flush=True)
        start = time.perf_counter()
        _continuations(run_dir, shallow, deep)
        _record(run_dir, "continuations", time.perf_counter() - start)
    # both ways where the members tokenize differently (two real families), else the shallow model into the deep one
    mixed = any("tokenizer" in m for m in pool_json["members"])
    for source, target, name in [(shallow, deep, "bench_handoff.json")] + (
            [(deep, shallow, "bench_handoff_reverse.json")] if mixed else []):
        bench_json = run_dir / name
        if bench_json.is_file():
            continue
        print(f"[real-model] bench: {source} -> {target}, {args.bench_prefix}-token prefix", flush=True)
        start = time.perf_counter()
        text = _bench_text(run_dir / "bench_text.txt")
        cmd = [sys.executable, str(REPO / "bench" / "bench_handoff.py"), "--pool", str(run_dir / "pool"),
               "--source", source, "--target", target, "--text", str(text), "--prefix", str(args.bench_prefix),
               "--suffix", str(cfg.suffix_len), "--repeats", str(args.bench_repeats), "--threads",
               str(cfg.ray.torch_threads or 2), "--no-variants", "--json", str(bench_json)]
        subprocess.run(cmd, check=True)
        _record(run_dir, "bench" if name == "bench_handoff.json" else f"bench {source} -> {target}",
                time.perf_counter() - start)
    from kvlingua.provenance import commit, machine
    from kvlingua.realreport import write_real_model_report

    report = Path(args.report) if args.report else DEFAULT_REPORT
    write_real_model_report(run_dir, report, command=command, positions=args.positions, shapes_dir=SHAPES,
                            machine=machine(), stages=_stages(run_dir), commit=commit(), pool=cfg.pool)
    print(f"report: {report}")
    return 0

