"""``kvlingua train CONFIG``: pre-train the pool if needed, train Σ on Ray, evaluate, print the table."""
from __future__ import annotations

import argparse
import os

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


def print_result(result: dict) -> None:
    from experiments.training import result_lines

    print("\n".join(result_lines(result)))


def load(args):
    from workers.run_config import load_run_config

    overrides = dict(parse_override(o) for o in args.override)
    return load_run_config(args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from experiments.training import Placement, train_run

    cfg = load(args)
    address = args.address or os.environ.get("RAY_ADDRESS")
    result = train_run(cfg, Placement(address=address, in_process=args.in_process, progress=not args.no_progress))
    print_result(result)
    return 0
