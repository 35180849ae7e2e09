"""One Tune trial: the job's spaces trained against the sweep's shared model hosts.

:func:`run_trial` is the Tune function trainable. The sweep driver hands it a
:class:`TrialContext` (``tune.with_parameters``); the trial's ``config`` holds only the
searched values (dotted RunConfig keys). The trial rebuilds its run config
(:func:`~tune_spaces.spaces.apply_params` + strict ``from_dict``), finds the named
``ModelHost`` actors the driver started (one per frozen model, shared by every trial;
their block store serves the source blocks the driver extracted once), and runs the
same route as every other entry point: :func:`kvlingua.run.train_spaces` over a
:class:`~workers.backend.RayBackend`, then :func:`kvlingua.run.finish` into the trial's
directory (table, JSON, histories, trained pools).

Reports (``tune.report``): every ``train.eval_every`` steps while the main space trains
(``step``, ``eval_nll`` = mean NLL over paths on the curve split, ``eval_nll/<i>-><j>``; ASHA
decides on these), except the last step, which is reported once, after the final
evaluation, with ``final=True``: ``eval_nll`` again on the curve split (validation: what
the sweep selects on) and the final table's ``test_eval_nll`` beside it. The trial logs to an MLflow run nested under the
sweep's run (``mlflow.parentRunId``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
import torch
from ray import tune

from kvlingua.config import from_dict, to_dict
from kvlingua.evaluate import evaluate
from kvlingua.job import allowed_paths, curve_batches
from kvlingua.metric_names import TUNE_MEAN, NllKey
from kvlingua.paths import path_name
from kvlingua.run import SpaceHooks, finish, train_spaces
from kvlingua.runtime import Runtime
from kvlingua.tracking import TrackerHandle, open_tracker, tracked
from tune_spaces.spaces import apply_params
from workers.backend import RayBackend
from workers.run_config import RunConfig, to_job


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
    parent: TrackerHandle | None = None
    """The sweep's tracked run; each trial's run is nested under it. None: no tracking."""
    experiment: str = "kvlingua"
    """MLflow experiment of the trials' runs."""


def path_metrics(nll_by_path: Mapping[str, float]) -> dict[str, float]:
    """``{"a->b": nll}`` -> ``{"eval_nll": mean, "eval_nll/a->b": nll, ...}``."""
    out = {TUNE_MEAN: float(sum(nll_by_path.values()) / len(nll_by_path))}
    out.update({NllKey.of_path(p).tune(): float(v) for p, v in nll_by_path.items()})
    return out


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Train and evaluate one trial's config (a Tune function trainable)."""
    torch.set_num_threads(ctx.torch_threads)
    cfg = from_dict(RunConfig, apply_params(ctx.base, config))
    trial_id = tune.get_context().get_trial_id()
    out_dir = Path(ctx.sweep_dir) / "trials" / trial_id
    out_dir.mkdir(parents=True, exist_ok=True)
    job = replace(to_job(cfg, ctx.models), name=f"{ctx.sweep}-{trial_id}", out_dir=str(out_dir))
    backend = RayBackend({m: ray.get_actor(f"{ctx.host_prefix}{m}", namespace=ctx.namespace) for m in job.models})
    tracker = open_tracker(ctx.parent is not None, ctx.parent and ctx.parent["uri"], ctx.experiment, out_dir,
                           job.name, parent=ctx.parent, tags={"kvlingua.sweep": ctx.sweep, "kvlingua.trial_id": trial_id})
    run_id = (tracker.handle() or {}).get("run_id", "")
    paths, main, last = allowed_paths(job), job.main_space, job.train_for(job.main_space).steps

    def on_eval(space: str, step: int, metrics: dict[str, float]) -> None:
        if space == main and step < last:  # the last step is reported once, after the final evaluation
            nll = {path_name(p): metrics[NllKey(*p).curve()] for p in paths}
            tune.report({"step": step, "final": False, "mlflow_run_id": run_id, **path_metrics(nll)})

    with tracked(tracker):
        tracker.log_params({"trial": config, "run": to_dict(cfg)})
        spaces, states = train_spaces(job, backend, Runtime(tracker=tracker, progress=False),
                                      hooks=SpaceHooks(on_eval=on_eval))
        result = finish(job, spaces, backend, states, tracker)
        (out_dir / "params.json").write_text(json.dumps(config, indent=1))
        tracker.log_metrics(result["eval"].metrics("final"), last)
        # Tune selects on the curve split (validation), never on the test split of the final table
        held_out = evaluate(backend, curve_batches(job), paths, {main: spaces[main]}, first_tokens=job.eval.first_tokens,
                            identity=False, references=False)
        nll = {path_name(p): held_out.summary_for(p, main).nll_mean for p in paths}
        test = {f"test_{k}": v for k, v in path_metrics(
            {path_name(p): result["eval"].summary_for(p, main).nll_mean for p in paths}).items()}
    # the run is closed FINISHED before the last report, as Tune may end the trial inside it
    tune.report({"step": last, "final": True, "mlflow_run_id": run_id, **path_metrics(nll), **test})
