"""``kvlingua eval POOL_DIR``: evaluate a trained pool on held-out data (in process)."""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained pool: suffix NLL per path under every condition",
        description="Loads a pool directory written by `kvlingua train` (fingerprints and shapes verified), "
        "rebuilds its held-out batches and reports base, control, no-prefix, identity, linear (when the run "
        "trained one) and translator NLL per path, with content transferred.",
    )
    p.add_argument("pool_dir", help="a trained pool directory (contains pool.json)")
    p.add_argument("--split", default=None, choices=["validation", "test"], help="held-out split (default: the run's)")
    p.add_argument("--batches", type=int, default=None, help="number of held-out batches (default: the run's)")
    p.add_argument("--ablate-stack", action="store_true",
                   help="also evaluate each translator with its cross-attention stack switched off (short path "
                   "only, same trained weights) as the condition '<space>-no-stack'")
    p.add_argument("--out", default=None, help="directory for eval.json / eval.md (default: the pool's run dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from kvlingua.backend import LocalBackend
    from kvlingua.config import ConfigError, from_dict
    from kvlingua.evaluate import evaluate
    from kvlingua.job import TrainJob, allowed_paths, eval_batches
    from kvlingua.pool import load_pool

    pool_dir = Path(args.pool_dir)
    meta_file = pool_dir / "pool.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{pool_dir}: not a trained pool directory (no pool.json)")
    meta = json.loads(meta_file.read_text())
    if "job" not in meta:
        raise ConfigError(f"{meta_file}: no training job recorded; it was not written by `kvlingua train`")
    loaded = load_pool(pool_dir)
    job = from_dict(TrainJob, meta["job"])
    job = replace(job, models={m.name: m.path for m in loaded.members})
    if args.split:
        job = replace(job, eval_split=args.split)
    if args.batches:
        job = replace(job, eval=replace(job.eval, batches=args.batches))
    spaces = {meta.get("space_name", "translator"): loaded.space}
    for sibling in sorted(pool_dir.parent.glob("pool-*")):
        if sibling != pool_dir and (sibling / "pool.json").is_file():
            spaces[sibling.name.removeprefix("pool-")] = load_pool(sibling, load_models=False).space
    if args.ablate_stack:
        ablatable = {n: s for n, s in spaces.items() if s.stack_removable}
        if not ablatable:
            raise ConfigError("--ablate-stack: no space here is a translator with both a stack and a short path")
        spaces |= {f"{n}-no-stack": s.without_stack() for n, s in ablatable.items()}
    backend = LocalBackend(loaded.models)
    result = evaluate(backend, eval_batches(job), allowed_paths(job), spaces, first_tokens=job.eval.first_tokens)
    out = Path(args.out) if args.out else pool_dir.parent
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / f"eval-{job.eval_split}.json")
    markdown = result.to_markdown()
    (out / f"eval-{job.eval_split}.md").write_text(markdown)
    print(markdown)
    print(f"\nwritten: {out / f'eval-{job.eval_split}.json'}")
    return 0
