"""Hand-off benchmark: translating a prefix cache through Σ vs the target re-reading the prefix.

The command line over :mod:`experiments.realmodel.handoff` (what it measures, and how, is said there):

    python bench/bench_handoff.py [--pool DIR] [--latency-pool DIR] [--text FILE] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.realmodel.handoff import HandoffConfig, handoff_lines, measure_handoff  # noqa: E402


def parse_args(argv=None) -> HandoffConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=Path, default=None, help="trained pool (default adapter)")
    p.add_argument("--latency-pool", type=Path, default=None, help="trained pool with SpaceConfig(num_layers < L)")
    p.add_argument("--source", default=None)
    p.add_argument("--target", default=None)
    p.add_argument("--text", type=Path, default=None, help="text file for prefix + suffix (default: random ids)")
    p.add_argument("--size", default="3.8m-l4-d256", help="size rung of the self-built random models")
    p.add_argument("--prefix", type=int, default=512)
    p.add_argument("--suffix", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--no-variants", action="store_true",
                   help="time only re-prefill and the pool's own space (no random latency/1-layer spaces: "
                   "pools whose shapes the default SpaceConfig does not fit, e.g. 30-layer models)")
    p.add_argument("--refresh", type=float, nargs="+", default=[], metavar="SHARE",
                   help="also the default space with the target re-reading this share of the positions after the "
                   "translation (kvlingua.refresh), timed with it, e.g. 0.05 0.1; 0: the translation alone")
    args = vars(p.parse_args(argv))
    return HandoffConfig(**{**args, "refresh": tuple(args["refresh"])})


def main(argv=None) -> int:
    try:
        measured = measure_handoff(parse_args(argv))
    except ValueError as e:  # a pool that needs --text, or too little text for --batch
        raise SystemExit(str(e)) from None
    print("\n".join(handoff_lines(measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
