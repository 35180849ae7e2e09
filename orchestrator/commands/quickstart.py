"""``kvlingua quickstart``: the main job end to end on an embedded local Ray.

data -> tokenizer -> pre-train a two-model seeds pool -> train Σ (translator and the
linear baseline) -> evaluate every path under every condition -> print the table.
Reruns reuse what exists (corpus, tokenizer, pre-trained models).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def register(sub: argparse._SubParsersAction) -> None:
    from orchestrator.commands.train import add_common_options

    p = sub.add_parser(
        "quickstart",
        help="the main job: pre-train a tiny pool, train Σ on local Ray, print the evaluation table",
        description="Runs configs/quickstart.yaml end to end (about 15 minutes on 2 CPU cores). "
        "--smoke runs the same code path at tiny sizes in under a minute.",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, same code path (used by the test suite)")
    p.add_argument("--config", default=None, help="a different run YAML (default: configs/quickstart.yaml)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import ConfigError, parse_override
    from kvlingua.data.corpus import prepare_corpus
    from orchestrator.commands.train import execute, print_result
    from workers.run_config import load_run_config

    config = Path(args.config) if args.config else CONFIGS / ("quickstart-smoke.yaml" if args.smoke else "quickstart.yaml")
    if not config.is_file():
        raise ConfigError(f"quickstart config not found: {config} (run from a source checkout, or pass --config)")
    cfg = load_run_config(config, dict(parse_override(o) for o in args.override))
    start = time.perf_counter()
    if cfg.data.source == "bible":
        info = prepare_corpus()
        print(f"corpus: {info.root}")
    result = execute(cfg, address=None, in_process=args.in_process, progress=not args.no_progress)
    print_result(result)
    print(f"\nquickstart finished in {time.perf_counter() - start:.0f} s")
    return 0
