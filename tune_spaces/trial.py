"""One Tune trial: the Σ training loop against the sweep's shared model hosts.

:func:`run_trial` is the Tune function trainable. The sweep driver hands it a
:class:`TrialContext` (``tune.with_parameters``); the trial's ``config`` holds only the
searched values (dotted RunConfig keys). The trial rebuilds its run config
(:func:`~tune_spaces.spaces.apply_params` + strict ``from_dict``), finds the named
``ModelHost`` actors the driver started (one per frozen model, shared by every trial;
their block store serves the source blocks the driver extracted once), and trains each
space of the job with :func:`kvlingua.train.fit` over a :class:`~workers.backend.RayBackend`.

Reports (``tune.report``): every ``train.eval_every`` steps while the main space trains
(``step``, ``eval_nll`` = mean held-out NLL over paths, ``eval_nll/<i>-><j>``; ASHA
decides on these), except the last step, which is reported once, after the full
evaluation, with ``final=True``. The
trial writes ``eval.json``, ``eval.md`` and ``histories.json`` into its directory and
logs to an MLflow run nested under the sweep's run (``mlflow.parentRunId``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import torch
from ray import tune

from kvlingua.config import from_dict, to_dict
from kvlingua.evaluate import evaluate, make_eval_fn
from kvlingua.job import allowed_paths, main_space, build_space, eval_batches, train_batches
from kvlingua.paths import path_name
from kvlingua.report import write_report
from kvlingua.tracking import MlflowTracker, NullTracker, Tracker, space_tracker
from kvlingua.train import fit
from orchestrator.run_config import RunConfig, to_job
from tune_spaces.spaces import apply_params
from workers.backend import RayBackend


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (sent once through the object store)."""

    sweep: str
    """Sweep name (prefix of trial run names)."""
    sweep_dir: str
    """Sweep directory; trial ``t`` writes into ``<sweep_dir>/trials/<t>``."""
    base: dict
    """The validated base run config as a dict (``to_dict``), base overrides applied."""
    models: dict[str, str]
    """Pool model name -> checkpoint directory, pool order."""
    host_prefix: str
    """The hosts are named ``f"{host_prefix}{model}"``."""
    namespace: str
    """Ray namespace of the host actors."""
    torch_threads: int = 1
    """Intra-op torch threads in the trial process."""
    tracking_uri: str | None = None
    """MLflow store; None: no tracking."""
    experiment: str = "kvlingua"
    """MLflow experiment."""
    parent_run_id: str | None = None
    """The sweep's MLflow run; each trial's run is nested under it."""


def path_metrics(nll_by_path: Mapping[str, float]) -> dict[str, float]:
    """``{"a->b": nll}`` -> ``{"eval_nll": mean, "eval_nll/a->b": nll, ...}``."""
    out = {"eval_nll": float(sum(nll_by_path.values()) / len(nll_by_path))}
    out.update({f"eval_nll/{p}": float(v) for p, v in nll_by_path.items()})
    return out


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Train and evaluate one trial's config (a Tune function trainable)."""
    torch.set_num_threads(ctx.torch_threads)
    cfg = from_dict(RunConfig, apply_params(ctx.base, config))
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    job = replace(to_job(cfg, ctx.models), name=f"{ctx.sweep}-{trial_id}", out_dir=str(out_dir))
    hosts = {m: ray.get_actor(f"{ctx.host_prefix}{m}", namespace=ctx.namespace) for m in job.models}
    backend = RayBackend(hosts)
    tracker: Tracker = NullTracker()
    if ctx.tracking_uri is not None:
        tracker = MlflowTracker(ctx.tracking_uri, ctx.experiment, run_name=job.name, parent_run_id=ctx.parent_run_id,
                                tags={"kvlingua.sweep": ctx.sweep, "kvlingua.trial_id": trial_id})
    run_id = getattr(tracker, "run_id", "")
    status = "FAILED"
    try:
        tracker.log_params({"trial": config, "run": to_dict(cfg)})
        paths = allowed_paths(job)
        summaries = {m: backend.summary(m) for m in job.models}
        held_out = eval_batches(job)[: max(1, job.eval.batches // 4)]
        main = main_space(job.spaces)
        spaces, histories = {}, {}
        for name in [main, *(n for n in job.spaces if n != main)]:
            space = build_space(job, name, summaries)
            eval_fn = None
            if name == main:
                inner = make_eval_fn(backend, held_out, paths, space, first_tokens=job.eval.first_tokens)

                def eval_fn(step: int, inner=inner) -> dict[str, float]:
                    metrics = inner(step)
                    nll = {path_name(p): metrics[f"eval/nll/{path_name(p)}"] for p in paths}
                    if step < job.train_for(main).steps:  # the last step is reported once, with the full evaluation
                        tune.report({"step": step, "final": False, "mlflow_run_id": run_id, **path_metrics(nll)})
                    return metrics

            state = fit(space, backend, train_batches(job), job.train_for(name),
                        tracker=space_tracker(tracker, name, main), eval_fn=eval_fn, progress=False)
            spaces[name], histories[name] = space, state.history
        result = evaluate(backend, eval_batches(job), paths, spaces,
                          first_tokens=job.eval.first_tokens)
        report = write_report(out_dir, result, title=f"trial {trial_id}", config=config)
        (out_dir / "histories.json").write_text(json.dumps(histories, indent=1))
        (out_dir / "params.json").write_text(json.dumps(config, indent=1))
        last = job.train_for(main).steps
        tracker.log_metrics(result.metrics("final"), last)
        for f in (report["json"], report["markdown"]):
            tracker.log_artifact(f)
        nll = {path_name(p): result.summary_for(p, main).nll_mean for p in paths}
        status = "FINISHED"
        tune.report({"step": last, "final": True, "mlflow_run_id": run_id, **path_metrics(nll)})
    finally:
        tracker.close(status) if isinstance(tracker, MlflowTracker) else tracker.close()
