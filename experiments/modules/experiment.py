"""The module-portability experiment (paper §6, Figure 5 / Table 4): every condition, meta-training, the report.

:func:`run_experiment` scores, for both directions of every pair of models of the config's pool, on the
meta-test tasks, each condition of :mod:`kvlingua.modules.conditions` (no prompt, random, direct, ported
before and after meta-training from each start, and each ported one against another task's module), with
the meta-training curve; :func:`summarize` turns the per-task numbers into statistics, the share of the
gap recovered and paired differences; :func:`experiments.modules.report.write_report` writes the Markdown,
a JSON of every number and the Figure-5 plot.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from experiments.modules.report import write_report
from experiments.toolkit.provenance import provenance_line
from experiments.toolkit.stats import paired_difference
from kvlingua.config import to_dict
from kvlingua.modules.conditions import (ModulesConfig, Setup, condition_nll, copy_space, directions, gap_recovered,
                                         ported_nll, prepare, save_meta_pool, start_space)
from kvlingua.modules.meta import meta_train
from kvlingua.runtime import Runtime
from kvlingua.tracking import NullTracker, PrefixedTracker, Tracker


def _stats(x: Tensor) -> dict:
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75]))
    return {"mean": float(x.mean()), "std": float(x.std()) if len(x) > 1 else 0.0, "q25": float(q[0]),
            "median": float(q[1]), "q75": float(q[2])}


def run_experiment(cfg: ModulesConfig, tracker: Tracker | None = None, log: Callable[[str], None] = print,
                   progress: bool = True, command: str = "kvlingua modules experiment") -> dict:
    """Every condition on the meta-test tasks for both directions, meta-training from each start; writes the report."""
    tracker = tracker or NullTracker()
    torch.set_num_threads(cfg.threads)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    setup = prepare(cfg, log)
    timing["modules_s"] = time.perf_counter() - t0
    names, chunk = setup.pool.space.names, cfg.eval_batch
    paths = directions(names)
    per_task: dict[str, dict[str, list[float]]] = {f"{i}->{j}": {} for i, j in paths}
    for i, j in paths:  # each target scored on its own tokens of the held-out verses
        row, held = per_task[f"{i}->{j}"], setup.tasks["meta-test"][j]
        row["none"] = condition_nll(setup.backend, j, None, held, chunk).tolist()
        row["random"] = condition_nll(setup.backend, j, setup.random_blocks[j], held, chunk).tolist()
        row["direct"] = condition_nll(setup.backend, j, setup.test_blocks[j], held, chunk).tolist()
    curves: dict[str, dict[str, list[dict]]] = {}
    t1 = time.perf_counter()
    tasks_per_step = cfg.meta.batch_size
    for start in cfg.starts:
        space = copy_space(start_space(start, cfg, setup.pool))
        space.eval()
        with torch.no_grad():
            for i, j in paths:
                per_task[f"{i}->{j}"][f"ported/{start}"] = ported_nll(space, setup, i, j, chunk).tolist()
                per_task[f"{i}->{j}"][f"other/ported/{start}"] = ported_nll(space, setup, i, j, chunk, 1).tolist()
        curve: dict[str, list[dict]] = {f"{i}->{j}": [] for i, j in paths}

        def eval_fn(step: int, space=space, curve=curve) -> dict[str, float]:
            metrics = {}
            for i, j in paths:
                nll = ported_nll(space, setup, i, j, chunk)
                curve[f"{i}->{j}"].append({"tasks_seen": step * tasks_per_step, **_stats(nll)})
                metrics[f"meta_test/ported/{i}->{j}"] = float(nll.mean())
            return metrics

        state = meta_train(space, setup.backend, setup.train_blocks, setup.tasks["meta-train"], cfg.meta,
                           runtime=Runtime(tracker=PrefixedTracker(tracker, start), progress=progress), eval_fn=eval_fn)
        space.eval()
        with torch.no_grad():
            for i, j in paths:
                per_task[f"{i}->{j}"][f"meta/{start}"] = ported_nll(space, setup, i, j, chunk).tolist()
                per_task[f"{i}->{j}"][f"other/meta/{start}"] = ported_nll(space, setup, i, j, chunk, 1).tolist()
        curves[start] = curve
        if start == cfg.starts[0]:
            save_meta_pool(Path(cfg.out_dir) / "pool-meta", space, setup.pool, cfg, start, state.step * tasks_per_step)
    timing["meta_s"] = time.perf_counter() - t1
    timing["total_s"] = time.perf_counter() - t0
    result = summarize(per_task, curves, cfg, setup, timing)
    result["provenance"] = provenance_line(command)
    files = write_report(result, cfg)
    for f in files.values():
        tracker.log_artifact(f)
    result["files"] = {k: str(v) for k, v in files.items()}
    return result


def paired(a: Sequence[float], b: Sequence[float]) -> dict:
    """Mean of ``a − b`` over the meta-test tasks and its standard error (:func:`paired_difference`)."""
    diff, se = paired_difference(a, b)
    return {"diff": diff, "se": se}


def summarize(per_task: dict, curves: dict, cfg: ModulesConfig, setup: Setup, timing: dict) -> dict:
    """Statistics per direction and condition, the gap recovered, paired differences, and the curves.

    Each condition's ``vs_direct`` is its paired difference to the direct prompt (± SE over tasks); a ported
    condition's ``vs_other`` is its difference to the same Σ reading another task's module (negative: the
    module's own content helps beyond what any ported module does).
    """
    table = {}
    for path, conds in per_task.items():
        stats = {c: _stats(torch.tensor(v)) for c, v in conds.items()}
        rnd, direct = stats["random"]["mean"], stats["direct"]["mean"]
        for c, s in stats.items():
            s["gap_recovered"] = gap_recovered(s["mean"], rnd, direct)
            s["vs_direct"] = paired(conds[c], conds["direct"])
            if f"other/{c}" in conds:
                s["vs_other"] = paired(conds[c], conds[f"other/{c}"])
        for curve_start, curve in curves.items():
            for point in curve[path]:
                point["gap_recovered"] = gap_recovered(point["mean"], rnd, direct)
        table[path] = stats
    test_names = setup.task_names("meta-test")
    return {"table": table, "curves": curves, "per_task": per_task, "timing": {k: round(v, 1) for k, v in timing.items()},
            "tasks": {"meta_train": len(setup.task_names("meta-train")), "meta_test": len(test_names),
                      "test_names": test_names},
            "config": to_dict(cfg), "pool": str(setup.pool.root), "modules": setup.modules}


def tracked_experiment(cfg: ModulesConfig, command: str, progress: bool = True,
                       log: Callable[[str], None] = print) -> dict:
    """``kvlingua modules experiment``: :func:`run_experiment` in its own MLflow run (``<out_dir>/mlflow.db``)."""
    from kvlingua.tracking import open_tracker, tracked

    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    with tracked(open_tracker(cfg.tracking, None, "kvlingua-modules", cfg.out_dir, "experiment")) as tracker:
        tracker.log_params({"modules": to_dict(cfg)})
        return run_experiment(cfg, tracker=tracker, log=log, progress=progress, command=command)


def tracked_meta_training(cfg: ModulesConfig, *, in_process: bool, workers: int, progress: bool = True,
                          log: Callable[[str], None] = print) -> dict:
    """``kvlingua modules meta-train``: every model's meta-train modules learned (or reused), then Σ meta-trained
    in this process or on Ray Train (``workers`` ranks), in its own MLflow run; returns the run's summary."""
    from kvlingua.modules.conditions import run_meta_training
    from kvlingua.tracking import open_tracker, tracked

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare(cfg, log, roles=("meta-train",))  # learn (or reuse) every model's meta-train modules first
    with tracked(open_tracker(cfg.tracking, None, "kvlingua-modules", out, f"meta-{cfg.meta.init}")) as tracker:
        tracker.log_params({"modules": to_dict(cfg)})
        if in_process:
            return run_meta_training(cfg, tracker=tracker, progress=progress, log=log)
        from workers.meta_worker import meta_train_distributed

        return meta_train_distributed(cfg, num_workers=workers, tracker=tracker, progress=progress)
