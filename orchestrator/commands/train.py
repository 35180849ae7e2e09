"""``kvlingua train CONFIG``: pre-train the pool if needed, train Σ on Ray, evaluate, print the table."""
from __future__ import annotations

import argparse
import os
from dataclasses import replace

from kvlingua.config import parse_override


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a shared space Σ over a pool (Ray by default), then evaluate it",
        description="Train the shared KV latent space for a pool described by a run YAML (configs/*.yaml). "
        "Runs on an embedded local Ray unless --address or RAY_ADDRESS names a cluster.",
    )
    add_run_arguments(p)
    p.set_defaults(func=run)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run YAML, e.g. configs/quickstart.yaml")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    add_common_options(p)


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Options every command that runs a RunConfig takes (train, quickstart)."""
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. -o train.steps=100 -o ray.placement=hosted (repeatable)")
    p.add_argument("--in-process", action="store_true",
                   help="skip Ray: train with the frozen models in this process (the reference loop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def execute(cfg, *, address: str | None, in_process: bool, progress: bool) -> dict:
    """Run a validated :class:`~workers.run_config.RunConfig` end to end; returns :func:`kvlingua.run.finish`'s dict."""
    from kvlingua.config import to_dict
    from workers.run_config import resolve_models, run_dir_of, to_job

    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = to_job(cfg, resolve_models(cfg, progress=progress))
    tracker = cfg.tracking.open(run_dir, cfg.name)
    status = "FAILED"
    try:
        tracker.log_params(to_dict(cfg))
        if in_process:
            from kvlingua.run import run_local

            result = run_local(job, tracker=tracker, progress=progress)
        else:
            from workers.driver import train_distributed

            ray_cfg = cfg.ray if address is None else replace(cfg.ray, address=address)
            result = train_distributed(job, ray_cfg, tracker=tracker, progress=progress)
        status = "FINISHED"
    finally:
        tracker.close(status)
    result["tracking_uri"] = (tracker.handle() or {}).get("uri")
    return result


def print_result(result: dict) -> None:
    print(result["markdown"])
    print()
    for name, t in result["timing"].items():
        print(f"{name:>16}: {t['steps']} steps in {t['train_wall_s']:.0f} s")
    for name, path in result["files"].items():
        print(f"{name:>16}: {path}")
    if result.get("tracking_uri"):
        print(f"\nMLflow: mlflow ui --backend-store-uri {result['tracking_uri']}")


def load(args):
    from workers.run_config import load_run_config

    overrides = dict(parse_override(o) for o in args.override)
    return load_run_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    cfg = load(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    result = execute(cfg, address=address, in_process=args.in_process, progress=not args.no_progress)
    print_result(result)
    return 0
