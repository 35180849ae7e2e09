"""``kvlingua paper [--only 4.4] [--smoke]``: the paper's experiments from one command, into one generated report.

Parses the arguments into :class:`experiments.paper.runner.PaperSuite` and runs it: every experiment of
``configs/paper/`` not done yet (resumable), then the report (default ``docs/results/paper.md``; with
``--smoke``, ``<results>/paper.md``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "paper"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "results" / "paper.md"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "paper",
        help="reproduce the paper's experiments (§4, §5, §7) and generate docs/results/paper.md",
        description="Runs every experiment of configs/paper/ (measured: about 2 hours on 2 CPU cores, pool "
        "pre-training included; each one is skipped when its results exist), then generates the report. --smoke "
        "runs every code path at tiny sizes.",
    )
    p.add_argument("--only", action="append", default=[], metavar="SECTION",
                   help="run only this section (repeatable), e.g. --only 4.4")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths (used by the test suite)")
    p.add_argument("--results", default=None, help="results directory (default: runs/paper, or runs/paper-smoke)")
    p.add_argument("--report", default=None, help="report path (default: docs/results/paper.md; smoke: <results>/paper.md)")
    p.add_argument("--configs", default=str(CONFIGS), help="experiment directory (default: configs/paper)")
    p.add_argument("--in-process", action="store_true", help="train without Ray (sweeps still need Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.paper.runner import PaperSuite

    results = Path(args.results or ("runs/paper-smoke" if args.smoke else "runs/paper")).resolve()
    report = Path(args.report).resolve() if args.report else (results / "paper.md" if args.smoke else DOCS)
    suite = PaperSuite(configs=Path(args.configs).resolve(), results=results, report_path=report,
                       only=tuple(args.only), smoke=args.smoke, in_process=args.in_process,
                       progress=not args.no_progress)
    path = suite.run()
    print(f"report: {path}")
    return 0
