"""``kvlingua pretrain CONFIG``: pre-train a pool YAML (configs/pools/*.yaml)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain", help="pre-train a pool of tiny Gemma-2 models from a pool YAML",
        description="Pre-train every member of a pool YAML (configs/pools/*.yaml) into "
                    "data_home()/pools/<name>/<member>/; finished members are reused, an interrupted "
                    "member resumes from its last checkpoint.")
    parser.add_argument("config", type=Path, help="pool YAML, e.g. configs/pools/quickstart.yaml")
    parser.add_argument("--force", action="store_true", help="delete the pool directory and pre-train from scratch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import MANIFEST, PoolConfig, pool_dir, pretrain_pool

    cfg = load_config(PoolConfig, args.config)
    dirs = pretrain_pool(cfg, progress=not args.quiet, force=args.force)
    import json

    manifest = json.loads((pool_dir(cfg) / MANIFEST).read_text())
    print(f"pool {cfg.name}: {pool_dir(cfg)}")
    print(f"{'member':<14}{'held-out':>9}{'tok/s':>8}{'wall s':>8}{'own':>7}{'other':>7}{'gap %':>7}  dir")
    for entry in manifest["members"]:
        m, ctx = entry["metrics"], entry["metrics"]["context_use"]
        tok_s = f"{m['tokens_per_s']:.0f}" if "tokens_per_s" in m else "-"
        wall = f"{m['train_wall_s']:.0f}" if "train_wall_s" in m else "-"
        print(f"{entry['name']:<14}{m['held_out_loss']:>9.3f}{tok_s:>8}{wall:>8}{ctx['nll_own']:>7.3f}"
              f"{ctx['nll_other']:>7.3f}{100 * ctx['relative_gap']:>7.2f}  {dirs[entry['name']]}")
    return 0
