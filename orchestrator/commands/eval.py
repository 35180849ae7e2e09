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
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="score the pool on other text: any data.source a run config takes (a .txt/.json/.jsonl/"
                   ".parquet file, directory or glob, hub:<name>, or bible); held-out splits the source lacks are "
                   "carved from its train split (the report says so). Files are then named eval-<split>-<name>")
    p.add_argument("--view", default=None,
                   help="with --data: the view (default: 'text'; for bible the run's view, or 'en' after 'parallel')")
    p.add_argument("--text-field", default="text", help="with --data: the column holding the text (default: text)")
    p.add_argument("--out", default=None, help="directory for eval.json / eval.md (default: the pool's run dir)")
    p.set_defaults(func=run)


def data_config(source: str, view: str | None, text_field: str):
    """The ``DataConfig`` of ``--data`` (a one-line ConfigError when it is not one)."""
    from kvlingua.config import ConfigError
    from kvlingua.data.views import DataConfig

    try:
        return DataConfig(source=source, view=view or ("en" if source == "bible" else "text"), text_field=text_field)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--data: {e}") from e


def _slug(source: str) -> str:
    name = Path(source.rstrip("/")).name or source
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name.replace(".", "-"))[:40]


def run(args: argparse.Namespace) -> int:
    from kvlingua.data.views import carve_note
    from kvlingua.rundir import read_run_pools, main_space
    from kvlingua.run import evaluate_pool_dir

    data = data_config(args.data, args.view, args.text_field) if args.data else None
    result, job = evaluate_pool_dir(args.pool_dir, split=args.split, batches=args.batches, prefix_len=args.prefix_len,
                                    ablate_stack=args.ablate_stack, models_root=args.models_root, data=data)
    pools = read_run_pools(args.pool_dir)
    out = Path(args.out) if args.out else Path(pools[main_space(pools)]).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"eval-{job.eval_split}" + (f"-{_slug(args.data)}" if args.data else "")
            + (f"-P{args.prefix_len}" if args.prefix_len else ""))
    result.to_json(out / f"{stem}.json")
    header = ""
    if data is not None:
        note = carve_note(data)
        header = (f"Evaluated on `{data.source}` (view {data.view}, split {job.eval_split}; the pool was trained on "
                  f"its run's data).{' ' + note[0].upper() + note[1:] + '.' if note else ''}\n\n")
    markdown = header + result.to_markdown()
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"\nwritten: {out / f'{stem}.json'}")
    return 0
