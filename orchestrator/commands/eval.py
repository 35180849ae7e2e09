"""``kvlingua eval POOL_DIR``: evaluate a trained pool on held-out data (in process)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained pool: suffix NLL per path under every condition",
        description="Loads a pool directory written by `kvlingua train` (fingerprints and shapes verified), "
        "rebuilds its held-out batches and reports base, control, no-prefix, identity, linear (when the run "
        "trained one) and translator NLL per path, with content transferred.",
    )
    p.add_argument("pool_dir", metavar="POOL_DIR",
                   help="a trained pool directory (contains pool.json) or the run directory holding its pools")
    p.add_argument("--split", default=None, choices=["validation", "test"], help="held-out split (default: the run's)")
    p.add_argument("--batches", type=int, default=None, help="number of held-out batches (default: the run's)")
    p.add_argument("--ablate-stack", action="store_true",
                   help="also evaluate each translator with its cross-attention stack switched off (short path "
                   "only, same trained weights) as the condition '<space>-no-stack'")
    p.add_argument("--models-root", default=None, metavar="DIR",
                   help="where the pool's models are now, if they moved since training: each model is looked for "
                   "as DIR/<its checkpoint directory name> or DIR/<its pool name> (fingerprints still checked)")
    p.add_argument("--prefix-len", type=int, default=None, metavar="P",
                   help="read P prefix tokens before the run's suffix (default: the run's prefix_len); files are "
                   "then named eval-<split>-P<P>.json")
    p.add_argument("--out", default=None, help="directory for eval.json / eval.md (default: the pool's run dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.rundir import read_run_pools, main_space
    from kvlingua.run import evaluate_pool_dir

    result, job = evaluate_pool_dir(args.pool_dir, split=args.split, batches=args.batches, prefix_len=args.prefix_len,
                                    ablate_stack=args.ablate_stack, models_root=args.models_root)
    pools = read_run_pools(args.pool_dir)
    out = Path(args.out) if args.out else Path(pools[main_space(pools)]).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{job.eval_split}" + (f"-P{args.prefix_len}" if args.prefix_len else "")
    result.to_json(out / f"{stem}.json")
    markdown = result.to_markdown()
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"\nwritten: {out / f'{stem}.json'}")
    return 0
