"""The paper's suite run: each experiment of ``configs/paper/`` trained (or swept), its results recorded, then the report.

For each experiment (in section order): skip it when ``<results>/<section>/result.json`` exists (resumable),
else write its run config beside its results, train it through :func:`experiments.training.train_run` (Ray
Train, or in process) or sweep it (Ray Tune), every run nested under one MLflow parent run
(``<results>/mlflow.db``; a later invocation on the same results reopens it), and record its wall time,
evaluations and curves. :meth:`PaperSuite.run` then writes the report
(:func:`experiments.paper.report.write_paper_report`), also when an experiment failed.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from experiments.paper.report import RESULT_FILE, write_paper_report
from experiments.paper.suite import PaperExperiment, load_experiments, window_hidden
from experiments.training import Placement, train_run
from kvlingua.config import ConfigError, apply_override
from kvlingua.metric_names import NllKey
from kvlingua.tracking import tracked

SUITE_RUN = "suite_run.json"


@dataclass(frozen=True)
class PaperSuite:
    """``kvlingua paper``: configs → runs → results directory → report."""

    configs: Path
    """The experiment directory (``configs/paper``)."""
    results: Path
    """The results directory (one folder per section)."""
    report_path: Path
    """Where the report goes."""
    only: tuple[str, ...] = ()
    """Run only these sections (all when empty)."""
    smoke: bool = False
    """Tiny sizes, same code paths."""
    in_process: bool = False
    """Train without Ray (sweeps still need Ray)."""
    progress: bool = True

    @property
    def command(self) -> str:
        return "kvlingua paper" + (" --smoke" if self.smoke else "")

    def experiments(self) -> dict[str, PaperExperiment]:
        experiments = load_experiments(self.configs)
        unknown = sorted(set(self.only) - set(experiments))
        if unknown:
            raise ConfigError(f"--only: unknown section(s) {unknown}; known: {list(experiments)}")
        return experiments

    def run(self) -> Path:
        """Every selected experiment not done yet, under the suite's parent run; the report in any case."""
        from kvlingua.data.corpus import prepare_corpus

        experiments = self.experiments()
        self.results.mkdir(parents=True, exist_ok=True)
        prepare_corpus()
        with tracked(_suite_tracker(self.results, self.smoke)) as parent:
            try:
                for sec, exp in experiments.items():
                    if not self.only or sec in self.only:
                        self._run_one(exp, parent.handle())
            finally:
                path = self.write_report(experiments)
                parent.log_artifact(path)
        return path

    def write_report(self, experiments: dict[str, PaperExperiment] | None = None) -> Path:
        """The report from the results directory only."""
        return write_paper_report(experiments or self.experiments(), self.results, self.report_path,
                                  command=self.command)

    def _run_one(self, exp: PaperExperiment, parent) -> None:
        out = self.results / exp.section
        if (out / RESULT_FILE).is_file():
            print(f"§{exp.section}: results exist, skipped ({out / RESULT_FILE})")
            return
        out.mkdir(parents=True, exist_ok=True)
        print(f"§{exp.section}: {exp.title} (estimated {exp.estimate_min:.0f} min)")
        start = time.perf_counter()
        data = run_dict(exp, self.configs, self.results, self.smoke, (parent or {}).get("uri"))
        (out / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        if exp.kind == "sweep":
            res = _sweep(exp, out, parent, self.smoke, self.progress)
        else:
            res = _train(exp, out, parent, Placement(in_process=self.in_process, progress=self.progress))
        res.update(section=exp.section, kind=exp.kind, smoke=self.smoke, wall_s=time.perf_counter() - start)
        (out / RESULT_FILE).write_text(json.dumps(res, indent=1) + "\n")  # last: marks the experiment done
        print(f"§{exp.section}: done in {res['wall_s'] / 60:.1f} min")


def run_dict(exp: PaperExperiment, configs: Path, results: Path, smoke: bool, parent_uri: str | None) -> dict:
    """The experiment's run config as written beside its results (paths absolute, smoke overrides applied)."""
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


def _window(models: dict, prefix_len: int, suffix_len: int) -> dict:
    """Per model: its sliding window and the share of (suffix, prefix) token pairs the window hides."""
    out = {}
    for name, path in models.items():
        window = json.loads((Path(path) / "config.json").read_text()).get("sliding_window")
        out[name] = {"window": window, "hidden": window_hidden(prefix_len, suffix_len, window)}
    return out


def _train(exp: PaperExperiment, out: Path, parent, placement: Placement) -> dict:
    from workers.run_config import load_run_config

    cfg = load_run_config(out / "run.yaml")
    result = train_run(cfg, placement, run_dir=out / "run", parent=parent, tags={"kvlingua.paper": exp.section})
    return {"evals": {"run": "run/eval.json"}, "histories": {"run": "run/histories.json"},
            "main_space": result["main_space"],
            "window": _window(result["models"], result["prefix_len"], result["suffix_len"])}


def _sweep(exp: PaperExperiment, out: Path, parent, smoke: bool, progress: bool) -> dict:
    from ray import tune

    from kvlingua.config import from_dict
    from tune_spaces.sweep import EXPERIMENT, run_sweep
    from tune_spaces.sweep_config import SweepConfig
    from workers.run_config import load_run_config, resolve_models, to_job

    data = yaml.safe_load((out / "run.yaml").read_text())
    sweep = {**exp.sweep, **(exp.smoke_sweep if smoke else {})}
    sweep.update(name=data["name"], base=str(out / "run.yaml"), sweep_dir=str(out / "sweep"))
    cfg = from_dict(SweepConfig, sweep, where=f"§{exp.section} sweep")
    resume = tune.Tuner.can_restore(str(out / "sweep" / EXPERIMENT))
    run_sweep(cfg, resume=resume, progress=progress, parent=parent)
    base = load_run_config(out / "run.yaml")
    job = to_job(base, resolve_models(base, progress=False))
    groups, val = select_groups(out / "sweep" / "trials", exp.group_by, job.main_space)
    labels = list(groups)
    best = min(labels[:-1], key=lambda g: val[g]) if len(labels) > 1 else labels[0]
    return {"evals": {g: f"sweep/trials/{t}/eval.json" for g, t in groups.items()},
            "histories": {}, "groups": groups, "validation": val, "best": best,
            "main_space": job.main_space, "window": _window(job.models, job.prefix_len, job.suffix_len)}


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
        nll = sum(last[NllKey(s, t).curve()] for s, t in trained) / len(trained)
        value = params[group_by]
        if value not in best or nll < best[value][0]:
            best[value] = (nll, d.name)
    order = sorted(best, key=float)
    return ({f"{key}={v:g}": best[v][1] for v in order}, {f"{key}={v:g}": best[v][0] for v in order})


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
