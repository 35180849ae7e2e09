"""``kvlingua tune SWEEP.yaml --space NAME``: a Ray Tune sweep of Σ training over a base run config."""
from __future__ import annotations

import argparse
import json

from kvlingua.config import parse_override


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="sweep Σ-training hyper-parameters with Ray Tune (trials share the pool's model hosts)",
        description="Run a named search space (paper_grid, paths_per_step, recon_weight, adapter_size, debug) "
        "over the base run config of a sweep YAML (configs/sweeps/*.yaml). Every trial's config is validated "
        "before any trial starts; source KV blocks are extracted once and shared by all trials. Writes "
        "results.csv / results.md, best.yaml (a run config for `kvlingua train`) and, with --report, "
        "the ablation plots.",
    )
    p.add_argument("config", help="sweep YAML, e.g. configs/sweeps/paper_grid.yaml")
    p.add_argument("--space", default=None, help="search space name (default: the sweep YAML's `space`)")
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="space.KEY=[values] changes the grid (e.g. -o space.lr=[1e-3,1e-4]); base.KEY=V the base "
                   "run config (e.g. -o base.train.steps=50); FIELD=V a sweep field (e.g. -o num_samples=2)")
    p.add_argument("--resume", action="store_true", help="resume the interrupted sweep in the sweep directory")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else local Ray)")
    p.add_argument("--report", action="store_true", help="also write the ablation plots and Markdown")
    p.add_argument("--no-progress", action="store_true", help="no Tune progress table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tune_spaces.sweep import run_sweep
    from tune_spaces.sweep_config import load_sweep_config

    overrides = dict(parse_override(o) for o in args.override)
    cfg = load_sweep_config(args.config, overrides, space=args.space)
    if args.address:
        cfg = replace(cfg, address=args.address)
    summary = run_sweep(cfg, resume=args.resume, progress=not args.no_progress)
    print(open(summary["files"]["markdown"]).read())
    if args.report:
        from tune_spaces.report import write_ablation_report

        summary["files"].update(write_ablation_report(cfg.resolved_dir()))
    for name, path in summary["files"].items():
        print(f"{name:>12}: {path}")
    if summary["best"]:
        print(f"{'best':>12}: {json.dumps(summary['best'])}")
    if not summary["complete"]:
        print(f"\nthe sweep was interrupted; resume it with: kvlingua tune {args.config} --resume")
        return 1
    return 0
