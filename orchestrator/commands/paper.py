"""``kvlingua paper [--only 4.4] [--smoke]``: the paper's experiments from one command, into one generated report.

For each experiment of ``configs/paper/<section>.yaml`` (in section order): skip it when
``<results>/<section>/result.json`` exists (resumable), else write its run config beside its
results, pre-train or reuse its pool, train it (Ray Train for §4/§5/§7.1; a Ray Tune sweep for
§7.2/§7.3; ``--in-process`` trains without Ray), every run nested under one MLflow parent run
(``<results>/mlflow.db``; a later invocation on the same results reopens it), and record its
wall time, evaluations and curves. Then
:func:`kvlingua.paper.report.write_paper_report` generates the report (default
``docs/results/paper.md``; with ``--smoke``, ``<results>/paper.md``).
"""
from __future__ import annotations

import argparse
import json
import time
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


def _run_dict(exp, configs: Path, results: Path, smoke: bool, parent_uri: str | None) -> dict:
    """The experiment's run config as written beside its results (paths absolute, smoke overrides applied)."""
    import copy

    from kvlingua.config import ConfigError, apply_override

    data = copy.deepcopy(exp.run)
    for key, value in (exp.smoke if smoke else {}).items():
        apply_override(data, key, value)
    if data.get("pool"):
        data["pool"] = str((configs / data["pool"]).resolve())
    start = data.get("start_from")
    if isinstance(start, str) and start.startswith("@"):
        pool = results / start[1:] / "run" / "pool"
        if not (pool / "pool.json").is_file():
            raise ConfigError(f"§{exp.section} extends the pool of §{start[1:]}, which has not run yet: run "
                              f"`kvlingua paper --only {start[1:]}` first")
        data["start_from"] = str(pool)
    data["name"] = f"paper-{exp.section}" + ("-smoke" if smoke else "")
    data["run_dir"] = str(results / exp.section / "run")
    data["tracking"] = {"enabled": True, "uri": parent_uri}
    return data


def _window(job) -> dict:
    from kvlingua.paper.experiments import window_hidden

    out = {}
    for name, path in job.models.items():
        window = json.loads((Path(path) / "config.json").read_text()).get("sliding_window")
        out[name] = {"window": window, "hidden": window_hidden(job.prefix_len, job.suffix_len, window)}
    return out


def _train(exp, data: dict, out: Path, parent, in_process: bool, progress: bool) -> dict:
    import yaml

    from kvlingua.config import to_dict
    from workers.run_config import load_run_config, resolve_models, to_job

    (out / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    cfg = load_run_config(out / "run.yaml")
    job = to_job(cfg, resolve_models(cfg, progress=progress))
    tracker = cfg.tracking.open(out / "run", cfg.name, parent=parent, tags={"kvlingua.paper": exp.section})
    status = "FAILED"
    try:
        tracker.log_params(to_dict(cfg))
        if in_process:
            from kvlingua.run import run_local

            run_local(job, tracker=tracker, progress=progress)
        else:
            from workers.driver import train_distributed

            train_distributed(job, cfg.ray, tracker=tracker, progress=progress)
        status = "FINISHED"
    finally:
        tracker.close(status)
    return {"evals": {"run": "run/eval.json"}, "histories": {"run": "run/histories.json"},
            "main_space": job.main_space, "window": _window(job)}


def _sweep(exp, data: dict, out: Path, parent, smoke: bool, progress: bool) -> dict:
    import yaml

    from kvlingua.config import from_dict
    from tune_spaces.sweep import EXPERIMENT, run_sweep
    from tune_spaces.sweep_config import SweepConfig
    from workers.run_config import load_run_config, resolve_models, to_job

    (out / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    sweep = {**exp.sweep, **(exp.smoke_sweep if smoke else {})}
    sweep.update(name=data["name"], base=str(out / "run.yaml"), sweep_dir=str(out / "sweep"))
    cfg = from_dict(SweepConfig, sweep, where=f"§{exp.section} sweep")
    from ray import tune

    resume = tune.Tuner.can_restore(str(out / "sweep" / EXPERIMENT))
    run_sweep(cfg, resume=resume, progress=progress, parent=parent)
    base = load_run_config(out / "run.yaml")
    job = to_job(base, resolve_models(base, progress=False))
    groups, val = select_groups(out / "sweep" / "trials", exp.group_by, job.main_space)
    labels = list(groups)
    best = min(labels[:-1], key=lambda g: val[g]) if len(labels) > 1 else labels[0]
    return {"evals": {g: f"sweep/trials/{t}/eval.json" for g, t in groups.items()},
            "histories": {}, "groups": groups, "validation": val, "best": best,
            "main_space": job.main_space, "window": _window(job)}


def select_groups(trials: Path, group_by: str, main: str) -> tuple[dict[str, str], dict[str, float]]:
    """Per value of ``group_by``: the finished trial with the lowest validation NLL (mean over its trained paths
    at the last curve point), as the paper takes the best of a sweep; labels ``<key>=<value>`` in value order."""
    best: dict[float, tuple[float, str]] = {}
    key = group_by.split(".")[-1]
    for d in sorted(p for p in trials.iterdir() if (p / "eval.json").is_file() and (p / "params.json").is_file()):
        params = json.loads((d / "params.json").read_text())
        trained = json.loads((d / "eval.json").read_text())["trained"]
        hist = json.loads((d / "histories.json").read_text())[main]
        last = max((r for r in hist if r.get("kind") == "eval"), key=lambda r: r["step"])
        nll = sum(last[f"eval/nll/{s}->{t}"] for s, t in trained) / len(trained)
        value = params[group_by]
        if value not in best or nll < best[value][0]:
            best[value] = (nll, d.name)
    order = sorted(best, key=float)
    return ({f"{key}={v:g}": best[v][1] for v in order}, {f"{key}={v:g}": best[v][0] for v in order})


SUITE_RUN = "suite_run.json"


def _suite_tracker(results: Path, smoke: bool):
    """The suite's MLflow parent run: the one an earlier invocation on ``results`` opened (recorded in
    ``<results>/suite_run.json``), so an interrupted or ``--only`` suite stays under one parent; else a new one."""
    from kvlingua.tracking import open_tracker, reopen_tracker

    record = results / SUITE_RUN
    if record.is_file():
        parent = reopen_tracker(json.loads(record.read_text()))
        if parent is not None:
            return parent
    parent = open_tracker(True, None, "kvlingua", results, "paper" + ("-smoke" if smoke else ""),
                          tags={"kvlingua.paper": "suite"})
    record.write_text(json.dumps(parent.handle()) + "\n")
    return parent


def run(args: argparse.Namespace) -> int:
    from kvlingua.config import ConfigError
    from kvlingua.data.corpus import prepare_corpus
    from kvlingua.paper.experiments import load_experiments
    from kvlingua.paper.report import RESULT_FILE, write_paper_report
    configs = Path(args.configs).resolve()
    experiments = load_experiments(configs)
    unknown = sorted(set(args.only) - set(experiments))
    if unknown:
        raise ConfigError(f"--only: unknown section(s) {unknown}; known: {list(experiments)}")
    results = Path(args.results or ("runs/paper-smoke" if args.smoke else "runs/paper")).resolve()
    results.mkdir(parents=True, exist_ok=True)
    report = Path(args.report).resolve() if args.report else (results / "paper.md" if args.smoke else DOCS)
    progress = not args.no_progress
    prepare_corpus()
    parent = _suite_tracker(results, args.smoke)
    uri = (parent.handle() or {}).get("uri")
    status = "FAILED"
    try:
        for sec, exp in experiments.items():
            if args.only and sec not in args.only:
                continue
            out = results / sec
            if (out / RESULT_FILE).is_file():
                print(f"§{sec}: results exist, skipped ({out / RESULT_FILE})")
                continue
            out.mkdir(parents=True, exist_ok=True)
            print(f"§{sec}: {exp.title} (estimated {exp.estimate_min:.0f} min)")
            start = time.perf_counter()
            data = _run_dict(exp, configs, results, args.smoke, uri)
            if exp.kind == "sweep":
                res = _sweep(exp, data, out, parent.handle(), args.smoke, progress)
            else:
                res = _train(exp, data, out, parent.handle(), args.in_process, progress)
            res.update(section=sec, kind=exp.kind, smoke=args.smoke, wall_s=time.perf_counter() - start)
            (out / RESULT_FILE).write_text(json.dumps(res, indent=1) + "\n")  # last: marks the experiment done
            print(f"§{sec}: done in {res['wall_s'] / 60:.1f} min")
        status = "FINISHED"
    finally:
        path = write_paper_report(experiments, results, report,
                                  command="kvlingua paper" + (" --smoke" if args.smoke else ""))
        parent.log_artifact(path)
        parent.close(status)
    print(f"report: {path}")
    return 0
