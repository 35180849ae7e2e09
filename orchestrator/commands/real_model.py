"""``kvlingua real-model``: a pool with a real pretrained model, end to end, into one generated report.

Parses the flags into :class:`experiments.realmodel.runner.RealModelConfig` and runs
:class:`~experiments.realmodel.runner.RealModel` (train, positions, levers, arms, continuations, hand-off
bench; each stage skipped when its files exist), then writes the report (``--report``, default
``docs/results/real-model.md``) from the run's files.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "real.yaml"
DEFAULT_REPORT = REPO / "docs" / "results" / "real-model.md"


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
    p.add_argument("--arm-seconds", type=float, default=0.0, metavar="S",
                   help="train the main space afresh for S wall seconds per training arm and score each on the "
                   "levers' rows, with its hand-off time (default 0: skip this stage)")
    p.add_argument("--arms", nargs="+", default=None, metavar="NAME",
                   help="the training arms, the first the default the others pair against (default the objectives "
                   "'suffix' 'kl' 'recon'; also 'stack: 6 layers (merge)', 'stack: 3 layers (merge)', 'short path only': "
                   "experiments.realmodel.arms.ARMS)")
    p.add_argument("--levers", nargs="+", default=None, metavar="NAME",
                   help="the levers to score at the start (default all of experiments.realmodel.levers.DEFAULT_LEVERS, e.g. "
                   "'start (closed form)' 'sink_tokens: 0'); each costs a calibration pass and a scoring")
    p.add_argument("--lever-positions", type=int, nargs="+", default=[], metavar="P",
                   help="score the levers again on held-out prefixes of P tokens (the same starts, calibrated on the "
                   "run's training batches), e.g. 512: which lever carries a prefix past training")
    p.add_argument("--sinks", type=int, nargs="+", default=[], metavar="P",
                   help="the sink study at held-out prefixes of P tokens, e.g. 512: which positions each target's suffix "
                   "attends to, and what its own keys, values or most-attended positions restore of a translated cache")
    p.add_argument("--refresh", type=float, nargs="+", default=[], metavar="SHARE",
                   help="score the trained pool at every prefix length again with the target re-reading this share "
                   "of the translated positions (kvlingua.refresh), and time its hand-off, e.g. 0.05 0.1; 0: without the pool's "
                   "own refresh (what it buys)")
    p.add_argument("--in-process", action="store_true", help="train without Ray (the reference loop)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from experiments.realmodel.runner import RealModel, RealModelConfig
    from experiments.training import Placement

    placement = Placement(address=os.environ.get("RAY_ADDRESS"), in_process=args.in_process,
                          progress=not args.no_progress)
    experiment = RealModel(RealModelConfig(
        config=Path(args.config), overrides=tuple(args.override), positions=tuple(args.positions),
        bench_prefix=args.bench_prefix, bench_repeats=args.bench_repeats, arm_seconds=args.arm_seconds,
        arms=None if args.arms is None else tuple(args.arms),
        levers=None if args.levers is None else tuple(args.levers), lever_positions=tuple(args.lever_positions),
        sinks=tuple(args.sinks), refresh=tuple(args.refresh), placement=placement))
    experiment.run()
    report = experiment.write_report(Path(args.report) if args.report else DEFAULT_REPORT)
    print(f"report: {report}")
    return 0
