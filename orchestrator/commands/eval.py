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
    p.add_argument("--out", default=None, help="directory for eval.json / eval.md (default: the pool's run dir)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvlingua.backend import LocalBackend
    from kvlingua.config import ConfigError, from_dict
    from kvlingua.evaluate import evaluate
    from kvlingua.job import TrainJob, allowed_paths, eval_batches
    from kvlingua.pool import POOL_FILE, TOKENIZER_DIR, load_pool
    from kvlingua.rundir import main_space, read_run_pools

    pools = read_run_pools(args.pool_dir)  # space name -> pool directory
    main = main_space(pools)
    loaded = load_pool(pools[main], models_root=args.models_root)
    meta_file = loaded.root / POOL_FILE
    if "job" not in loaded.meta:
        raise ConfigError(f"{meta_file}: no training job recorded; it was not written by `kvlingua train`")
    try:
        job = from_dict(TrainJob, loaded.meta["job"], "job")
    except ConfigError as e:
        raise ConfigError(f"{meta_file}: {e}") from e
    job = replace(job, models={m.name: m.path for m in loaded.members})
    if loaded.tokenizer is not None:  # the pool's copy of the run's tokenizer travels with the pool
        job = replace(job, tokenizer=str(loaded.root / TOKENIZER_DIR))
    if args.split:
        job = replace(job, eval_split=args.split)
    if args.batches:
        job = replace(job, eval=replace(job.eval, batches=args.batches))
    spaces = {name: loaded.space if name == main else load_pool(d, load_models=False, verify=False).space
              for name, d in pools.items()}
    if args.ablate_stack:
        ablatable = {n: s for n, s in spaces.items() if s.stack_removable}
        if not ablatable:
            raise ConfigError("--ablate-stack: no space here is a translator with both a stack and a short path")
        spaces |= {f"{n}-no-stack": s.without_stack() for n, s in ablatable.items()}
    backend = LocalBackend(loaded.models)
    result = evaluate(backend, eval_batches(job), allowed_paths(job), spaces, first_tokens=job.eval.first_tokens)
    out = Path(args.out) if args.out else loaded.root.parent
    out.mkdir(parents=True, exist_ok=True)
    result.to_json(out / f"eval-{job.eval_split}.json")
    markdown = result.to_markdown()
    (out / f"eval-{job.eval_split}.md").write_text(markdown)
    print(markdown)
    print(f"\nwritten: {out / f'eval-{job.eval_split}.json'}")
    return 0
