"""The sweep driver: validate every trial, share the pool, run Ray Tune, write the results.

:func:`run_sweep` reads top to bottom:

1. **Validate** (before anything starts): the base run config (strict), the named
   space with its overrides, and every trial's run config and job. A bad space name,
   key or value is a :class:`~kvlingua.config.ConfigError` naming the trial.
2. **Share the pool**: one ``ModelHost`` actor per frozen model for the whole sweep,
   with a block store (``block_dir``). The driver extracts every source block the
   trials will read once (training batches of the first ``train.steps`` steps, and the
   held-out batches with their control prefixes), so extractions = pool size × distinct
   batches, whatever the number of trials; trials are then served from the store.
3. **Tune**: a ``tune.Tuner`` over :func:`tune_spaces.trial.run_trial` with declared
   trial resources, optional ASHA on the eval metric (time = training step), trials as
   MLflow runs nested under one sweep run. ``resume=True`` restores an interrupted
   sweep (``Tuner.restore``): finished trials are kept, unfinished ones run.
4. **Results**: ``results.csv`` / ``results.md`` (per trial: values, NLL per path,
   content transferred), ``best.yaml`` (a run config for ``kvlingua train``) and
   ``sweep.json`` (state, extraction count, files).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, replace
from itertools import islice
from pathlib import Path
from typing import Any

import workers  # noqa: F401  (Ray environment before ``import ray``)
import ray
from ray import tune

from kvlingua.blockstore import BlockStore, ids_digest
from kvlingua.config import ConfigError, from_dict, to_dict
from kvlingua.job import TrainJob, calibration_batches, check_held_out, curve_batches, eval_batches, train_batches
from kvlingua.metric_names import TUNE_MEAN, NllKey
from kvlingua.tracking import TrackerHandle, attach, end_if_running
from tune_spaces.results import best_row, to_markdown, trial_row, write_best_config, write_csv
from tune_spaces.spaces import apply_params, resolve_space, validate_trials
from tune_spaces.sweep_config import SweepConfig
from tune_spaces.trial import TrialContext, run_trial
from workers.driver import NAMESPACE, check_resources, connect
from workers.host import spawn_hosts
from workers.wire import tensor_to_wire
from workers.run_config import RunConfig, load_run_config, resolve_models, to_job

EXPERIMENT = "tune"
"""Tune experiment directory name inside the sweep directory."""
STATE_FILE = "sweep.json"


def plan(cfg: SweepConfig, progress: bool = False) -> dict[str, Any]:
    """Step 1: every trial validated. Returns base config, models, grid, TuneConfig defaults and jobs.

    Raises:
        ConfigError: unknown space, unknown key, invalid value (naming the trial).
    """
    base = load_run_config(cfg.base, cfg.base_overrides)
    known = base.models or (dict.fromkeys(base.pool_members) if base.pool_members else None)
    models = dict(base.models) if base.models else None
    if known is None:  # a whole pool YAML: its members are known once it exists (reused if pre-trained)
        models = resolve_models(base, progress=progress)
        known = models
    grid, kwargs = resolve_space(cfg.space, len(known), cfg.space_overrides)
    base_dict = to_dict(base)
    configs = validate_trials(RunConfig, base_dict, grid)
    if models is None:
        models = resolve_models(base, progress=progress)
    if cfg.asha is not None and any(c.train.eval_every < 1 for c in configs):
        raise ConfigError("asha needs train.eval_every > 0: trials report the eval metric every eval_every steps")
    if cfg.asha is not None and any(c.train.steps < cfg.asha.grace_period for c in configs):
        raise ConfigError(f"asha.grace_period={cfg.asha.grace_period} exceeds train.steps of some trials")
    metric = cfg.metric or kwargs.get("metric", TUNE_MEAN)
    if metric != TUNE_MEAN:
        names = {NllKey(i, j).tune() for c in configs for i, j in
                 (c.train.paths or [(a, b) for a in known for b in known])}
        if metric not in names:
            raise ConfigError(f"metric {metric!r} names no trained path; choose eval_nll or one of {sorted(names)}")
    jobs = []
    for config in configs:
        try:
            jobs.append(to_job(config, models))
            check_held_out(jobs[-1])  # every trial's held-out rows, before any trial runs
        except (ValueError, TypeError) as e:
            raise ConfigError(f"trial {config} is invalid: {e}") from None
    return {"base": base, "base_dict": base_dict, "models": models, "grid": grid, "tune_kwargs": kwargs,
            "jobs": jobs}


def _warm_blocks(hosts: dict, jobs: list[TrainJob]) -> int:
    """Step 2: extract every source block the trials will read, once. Returns the number of distinct blocks."""
    requests: dict[tuple[str, str], Any] = {}

    def want(model: str, ids) -> None:
        key = (model, ids_digest(ids))
        if key not in requests:
            requests[key] = ids.contiguous()

    seen_data: set[str] = set()
    for job in jobs:
        data_key = json.dumps([to_dict(job.data), job.langs, job.prefix_len, job.suffix_len, job.batch_size,
                               job.train.seed, job.max_steps, asdict(job.eval), job.eval_split,
                               [(c.init, c.init_batches, c.init_prefix_len) for c in job.spaces.values()]],
                              sort_keys=True)
        if data_key in seen_data:
            continue
        seen_data.add(data_key)
        batches = train_batches(job)
        calibration = max((c.init_batches for c in job.spaces.values()
                           if c.init == "closed_form" and c.init_prefix_len is None), default=0)
        for _ in range(max(job.max_steps, calibration)):  # training, and the closed-form start's first batches
            b = next(batches)
            for m in job.models:
                want(m, b.prefix(m))  # [B, P]
        for c in job.spaces.values():  # a closed form calibrated on its own prefix length reads its own batches
            own = calibration_batches(job, c)
            for b in islice(own, c.init_batches) if own is not None else ():
                for m in job.models:
                    want(m, b.prefix(m))  # [B, init_prefix_len]
        sink = next(iter(job.spaces.values())).sink_tokens  # one per job (JobSpec)
        for b in [*eval_batches(job), *curve_batches(job)]:  # the final table (test) and the curves (validation)
            for m in job.models:
                want(m, b.prefix(m))
                want(m, b.control_prefix(m, sink))  # evaluate()'s control prefix
    refs = [hosts[m].prefix_block.remote(tensor_to_wire(ids)) for (m, _), ids in requests.items()]
    ray.get(refs)
    return len(requests)


def _parent_run(cfg: SweepConfig, base: RunConfig, sweep_dir: Path, state: dict,
                above: TrackerHandle | None = None) -> TrackerHandle | None:
    """The sweep's tracked run (created once, reused on resume; nested under ``above``); None when tracking is off."""
    if state.get("parent") or not base.tracking.enabled:
        return state.get("parent")
    parent = base.tracking.open(sweep_dir, cfg.name, parent=above, tags={"kvlingua.sweep": cfg.name})
    parent.log_params({"sweep": to_dict(cfg)})
    return parent.handle()


def _tuner(cfg: SweepConfig, trainable, grid: dict, kwargs: dict, sweep_dir: Path, resume: bool,
           callbacks: list, progress: bool) -> tune.Tuner:
    exp_dir = sweep_dir / EXPERIMENT
    if resume:
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    metric = cfg.metric or kwargs.get("metric", TUNE_MEAN)
    mode = kwargs.get("mode", "min")
    scheduler = None
    if cfg.asha is not None:
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last step: ASHA stops a trial at max_t, and the final report comes at the last step
        scheduler = ASHAScheduler(time_attr="step", max_t=kwargs["max_steps"] + 1,
                                  grace_period=cfg.asha.grace_period, reduction_factor=cfg.asha.reduction_factor)
    tune_config = tune.TuneConfig(metric=metric, mode=mode, num_samples=cfg.num_samples or kwargs.get("num_samples", 1),
                                  max_concurrent_trials=cfg.max_concurrent_trials, scheduler=scheduler,
                                  reuse_actors=True)  # a trial process imports torch/transformers/mlflow once
    run_config = tune.RunConfig(name=EXPERIMENT, storage_path=str(sweep_dir), callbacks=list(callbacks),
                                verbose=1 if progress else 0)
    return tune.Tuner(trainable, param_space={k: tune.grid_search(v) for k, v in grid.items()},
                      tune_config=tune_config, run_config=run_config)


def run_sweep(cfg: SweepConfig, *, resume: bool = False, progress: bool = True, callbacks: list | None = None,
              parent: TrackerHandle | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns the summary also written to ``<sweep_dir>/sweep.json``.

    Args:
        cfg: the sweep.
        resume: restore the interrupted Tune experiment of ``cfg``'s sweep directory.
        progress: Tune's progress table.
        callbacks: extra ``tune.Callback`` objects (kept with the experiment on resume).
        parent: a tracked run to nest the sweep's run under (e.g. ``kvlingua paper``'s).

    Returns:
        ``{"complete", "trials", "extractions", "blocks", "files", "best", ...}``; ``complete`` is
        False when the sweep was interrupted (resume it with ``resume=True``).
    """
    t0 = time.perf_counter()
    p = plan(cfg, progress=progress)
    t_plan = time.perf_counter() - t0
    base, models, jobs = p["base"], p["models"], p["jobs"]
    sweep_dir = cfg.resolved_dir()
    exp_dir = sweep_dir / EXPERIMENT
    if resume and not tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(f"nothing to resume: no Tune experiment at {exp_dir}")
    if not resume and tune.Tuner.can_restore(str(exp_dir)):
        raise ConfigError(f"{exp_dir} already holds a sweep; resume it with --resume or choose another sweep_dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    state_file = sweep_dir / STATE_FILE
    state = json.loads(state_file.read_text()) if resume and state_file.is_file() else {}
    block_dir = Path(cfg.block_dir).resolve() if cfg.block_dir else sweep_dir / "blocks"
    connect(cfg.address)
    host_opts = replace(base.ray.host, block_dir=str(block_dir))
    check_resources([("model host", len(models), host_opts.ray_resources()),
                     ("trial", 1, {"CPU": cfg.trial_cpus, "GPU": cfg.trial_gpus})],
                    f"sweep {cfg.name!r} ({len(models)} model hosts beside one trial; lower trial_cpus/trial_gpus "
                    "or ray.host in the base config)")
    parent = _parent_run(cfg, base, sweep_dir, state, parent)
    state.update(parent=parent, extractions=int(state.get("extractions", 0)))
    state_file.write_text(json.dumps(state, indent=1, default=str) + "\n")  # a hard kill can still be resumed
    host_prefix = f"tune-{cfg.name}-{uuid.uuid4().hex[:8]}-"
    t_hosts = time.perf_counter()
    hosts = spawn_hosts(models, host_opts, name_prefix=host_prefix, namespace=NAMESPACE)
    t_hosts = time.perf_counter() - t_hosts
    try:
        t_warm = time.perf_counter()
        distinct = _warm_blocks(hosts, jobs)
        t_warm = time.perf_counter() - t_warm
        ctx = TrialContext(sweep=cfg.name, sweep_dir=str(sweep_dir), base=p["base_dict"], models=models,
                           host_prefix=host_prefix, namespace=NAMESPACE, torch_threads=cfg.torch_threads,
                           parent=parent, experiment=base.tracking.experiment)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                        {"cpu": cfg.trial_cpus, "gpu": cfg.trial_gpus})
        kwargs = dict(p["tune_kwargs"], max_steps=max(j.train.steps for j in jobs))
        tuner = _tuner(cfg, trainable, p["grid"], kwargs, sweep_dir, resume, callbacks or [], progress)
        t_fit = time.perf_counter()
        grid_result = tuner.fit()
        t_fit = time.perf_counter() - t_fit
        stats = ray.get([h.stats.remote() for h in hosts.values()])
    finally:
        for h in hosts.values():
            ray.kill(h, no_restart=True)
    extractions = int(state.get("extractions", 0)) + sum(s.get("extractions", 0) for s in stats)
    metric = cfg.metric or p["tune_kwargs"].get("metric", TUNE_MEAN)
    rows, run_ids = _rows(grid_result, list(p["grid"]), metric, sweep_dir, asha=cfg.asha is not None)
    expected = len(jobs) * (cfg.num_samples or p["tune_kwargs"].get("num_samples", 1))
    complete = len(rows) == expected and all(r["status"] != "unfinished" for r in rows)
    summary = {
        "name": cfg.name, "space": cfg.space, "main_space": base.main_space, "grid": p["grid"], "metric": metric,
        "complete": complete,
        "trials": len(rows), "expected_trials": expected, "pool_size": len(models),
        "distinct_blocks": distinct, "extractions": extractions, "blocks": len(BlockStore(block_dir)),
        "parent": parent, "seconds": {
            "total": time.perf_counter() - t0, "plan": t_plan, "start_hosts": t_hosts, "warm_blocks": t_warm,
            "tune_fit": t_fit},
    }
    summary["files"] = _write_outputs(cfg, p, rows, metric, summary, sweep_dir)
    summary["best"] = summary["files"].pop("best_params", None)
    state_file.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _close_tracking(parent, run_ids, complete, summary["files"])
    return summary


def _rows(grid_result, params: list[str], metric: str, sweep_dir: Path, asha: bool) -> tuple[list[dict], dict]:
    rows, run_ids = [], {}
    for result in grid_result:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        if metrics.get("final"):
            status = "finished"
        elif result.error is not None:
            status = "error"
        elif asha and metrics:
            status = "stopped"
        else:
            status = "unfinished"
        if metrics.get("mlflow_run_id"):
            run_ids[metrics["mlflow_run_id"]] = status
        config = {k: result.config.get(k) for k in params}
        rows.append(trial_row(trial_id, status, config, metric, metrics.get(metric), sweep_dir / "trials" / trial_id))
    return rows, run_ids


def _write_outputs(cfg: SweepConfig, p: dict, rows: list[dict], metric: str, summary: dict,
                   sweep_dir: Path) -> dict[str, Any]:
    params = list(p["grid"])
    main = p["base"].main_space
    header = (f"## Sweep `{cfg.name}`: space `{cfg.space}`, {summary['trials']} trials "
              f"({'complete' if summary['complete'] else 'INTERRUPTED: resume with --resume'})\n\n"
              f"Source KV blocks extracted: {summary['extractions']} (pool of {summary['pool_size']} × "
              f"{summary['distinct_blocks'] // max(1, summary['pool_size'])} distinct batches, "
              f"independent of the number of trials); blocks in the store: {summary['blocks']}.\n")
    files = {"csv": str(write_csv(rows, sweep_dir / "results.csv"))}
    md = sweep_dir / "results.md"
    md.write_text(to_markdown(rows, params, metric, main, header))
    files["markdown"] = str(md)
    best = best_row(rows, metric)
    if best is not None:
        run = apply_params(p["base_dict"], {k: best[k] for k in params})
        run["name"] = f"{cfg.name}-best"
        run["run_dir"] = None
        from_dict(RunConfig, run)  # the written file is a valid run config
        files["best_yaml"] = str(write_best_config(run, sweep_dir / "best.yaml"))
        files["best_params"] = {"trial_id": best["trial_id"], metric: best[metric], **{k: best[k] for k in params}}
    return files


def _close_tracking(parent: TrackerHandle | None, run_ids: dict[str, str], complete: bool, files: dict) -> None:
    """Attach the tables to the sweep run; end it, and end trial runs cut off by ASHA."""
    if parent is None:
        return
    tracker = attach(parent)
    for key in ("csv", "markdown", "best_yaml"):
        if key in files:
            tracker.log_artifact(files[key])
    for run_id, status in run_ids.items():
        if status in ("stopped", "unfinished"):
            end_if_running({**parent, "run_id": run_id}, "KILLED")
    end_if_running(parent, "FINISHED" if complete else "KILLED")
