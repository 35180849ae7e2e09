"""Train and evaluate the spaces of one job: the one route every entry point takes.

:func:`train_spaces` builds each shared space of a :class:`~kvlingua.job.TrainJob`,
resumes it from a checkpoint if one is given, and trains it with
:func:`kvlingua.train.fit` against any :class:`~kvlingua.backend.PoolBackend`;
:func:`finish` evaluates every trained space beside the baselines and writes the
run's files. The entry points are thin callers:

* in process — :func:`run_local` (``kvlingua train --in-process``);
* Ray Train — ``workers.train_worker.train_loop`` (a rank's backend, shard, gradient
  all-reduce and checkpoint reports);
* Ray Tune — ``tune_spaces.trial.run_trial`` (a trial reports its curve to Tune).

A checkpoint directory holds one sub-directory per space
(:func:`kvlingua.checkpoint.save_checkpoint`); a space whose checkpoint reached its last
step is not trained again. In process, checkpoints go to ``<out_dir>/checkpoints``
every ``train.checkpoint_every`` steps, with the job they belong to, so an interrupted
run resumes where it stopped when it is started again with the same settings.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch

from kvlingua.backend import LocalBackend, PoolBackend
from kvlingua.config import to_dict
from kvlingua.evaluate import evaluate, make_eval_fn
from kvlingua.job import (TrainJob, all_paths, allowed_paths, at_prefix_len, build_space, calibration_batches,
                          curve_batches, eval_batches, held_out_batches, train_batches, trained_paths)
from kvlingua.models import load_frozen
from kvlingua.pool import save_pool
from kvlingua.pool_members import PoolMember
from kvlingua.rundir import MAIN_SPACE_KEY, space_pool_dir
from kvlingua.report import write_report
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.tracking import NullTracker, Tracker
from kvlingua.checkpoint import load_checkpoint, save_checkpoint
from kvlingua.batch import Batch
from kvlingua.train import fit
from kvlingua.train_config import TrainConfig, TrainState

BatchWrapper = Callable[[SharedSpace, TrainConfig, Iterable[Batch], int], Iterable[Batch]]
"""``(space, cfg, batches, start_step) -> batches``: e.g. a prefetcher of the sources' blocks."""
Saver = Callable[[str, dict[str, SharedSpace], dict[str, TrainState]], None]
"""``save(space in training, spaces, states)``: checkpoints every space trained so far (``states`` has
the one in training too, at its current step)."""


@dataclass(frozen=True)
class SpaceHooks:
    """What a runtime adds around :func:`train_spaces`'s one loop (each optional)."""

    save: Saver | None = None
    """Called every ``train.checkpoint_every`` steps and at each space's end."""
    wrap_batches: BatchWrapper | None = None
    """Wraps each space's batch stream (e.g. prefetching source blocks)."""
    on_eval: Callable[[str, int, dict[str, float]], None] | None = None
    """``on_eval(space, step, metrics)`` after each curve evaluation (rank 0 only)."""


JOB_FILE = "job.json"
"""In a checkpoint directory (in process) or a Ray Train run directory: the training it belongs to
(:func:`training_key`)."""


def training_key(job: TrainJob) -> str:
    """``job`` as JSON without what only its final table reads (``eval.batches``, ``eval_split``): two runs with
    the same key train the same steps on the same batches, so one resumes from the other's checkpoints (lowering
    ``eval.batches`` after a run stopped does not throw its training away)."""
    d = to_dict(job)
    d["eval"] = {k: v for k, v in d["eval"].items() if k != "batches"}
    d.pop("eval_split", None)
    return json.dumps(d, sort_keys=True)


def space_order(job: TrainJob) -> list[str]:
    """The job's spaces in training order: the main space first, then the others as the job lists them."""
    main = job.main_space
    return [main, *(n for n in job.spaces if n != main)]


def save_spaces(root: str | Path, spaces: Mapping[str, SharedSpace], states: Mapping[str, TrainState]) -> Path:
    """Checkpoint every space that has a state into ``root/<space>/``."""
    root = Path(root)
    for name, state in states.items():
        save_checkpoint(root / name, spaces[name], state)
    return root


def load_space(root: str | Path | None, name: str, space: SharedSpace) -> TrainState | None:
    """Resume ``space`` from ``root/<name>/`` (weights loaded into it); None when there is no checkpoint of it."""
    if root is None or not (Path(root) / name).is_dir():
        return None
    return load_checkpoint(Path(root) / name, space)


def train_spaces(
    job: TrainJob,
    backend: PoolBackend,
    runtime: Runtime | None = None,
    *,
    device: torch.device | str = "cpu",
    resume_from: str | Path | None = None,
    hooks: SpaceHooks = SpaceHooks(),
) -> tuple[dict[str, SharedSpace], dict[str, TrainState]]:
    """Train every space of ``job`` (:func:`space_order`) with the same loop and data.

    Args:
        job: the run.
        backend: the frozen pool (in process, behind Ray actors, ...).
        runtime: this rank (tracker, progress, gradient sync); default one in-process rank.
        device: where the adapters live.
        resume_from: a checkpoint directory (:func:`save_spaces`) to resume from.
        hooks: what the caller's runtime adds to the loop (:class:`SpaceHooks`): saving, batch wrapping, eval reports.

    Returns:
        ``(spaces, states)``, both keyed by space name in :func:`space_order`.
    """
    runtime = runtime or Runtime()
    summaries = {m: backend.summary(m) for m in job.models}
    curve = curve_batches(job) if runtime.is_main else []  # validation: curves never see the test split
    fingerprints = {m: backend.fingerprint(m) for m in job.models} if job.start_from else None
    spaces: dict[str, SharedSpace] = {}
    states: dict[str, TrainState] = {}
    for name in space_order(job):
        space = build_space(job, name, summaries, fingerprints).to(device)
        spaces[name] = space
        cfg = job.train_for(name)
        state = load_space(resume_from, name, space)
        if state is not None and state.step >= cfg.steps:
            states[name] = state
            continue
        start = state.step if state is not None else 0
        batches: Iterable[Batch] = islice(train_batches(job, rank=runtime.rank, world_size=runtime.world_size),
                                          start, None)
        if hooks.wrap_batches is not None:
            batches = hooks.wrap_batches(space, cfg, batches, start)
        eval_fn = None
        if runtime.is_main and cfg.eval_every:
            curve_fn = make_eval_fn(backend, curve, all_paths(job), space, first_tokens=job.eval.first_tokens)

            def eval_fn(step: int, curve_fn=curve_fn, name=name) -> dict[str, float]:
                metrics = curve_fn(step)
                if hooks.on_eval is not None:
                    hooks.on_eval(name, step, metrics)
                return metrics

        checkpoint_fn = None
        if hooks.save is not None:
            def checkpoint_fn(s: TrainState, name=name, save=hooks.save) -> None:
                states[name] = s
                save(name, spaces, states)

        calibration = calibration_batches(job, space.cfg, rank=runtime.rank, world_size=runtime.world_size)
        states[name] = fit(space, backend, batches, cfg, runtime=runtime.for_space(name, job.main_space),
                           state=state, eval_fn=eval_fn, checkpoint_fn=checkpoint_fn, calibration=calibration)
    return spaces, states


def pool_members(job: TrainJob, backend: PoolBackend) -> list[PoolMember]:
    """Pool members with the architecture summaries and weight fingerprints the backend already has."""
    return [PoolMember(name, str(Path(path).resolve()), backend.summary(name), backend.fingerprint(name))
            for name, path in job.models.items()]


def finish(job: TrainJob, spaces: dict[str, SharedSpace], backend: PoolBackend,
           states: dict[str, TrainState], tracker: Tracker | None = None) -> dict:
    """Evaluate every space beside the baselines on all N² paths of ``job.eval_split`` (the paths that
    neither this run nor the pool it extends trained marked zero-shot); write the report (table, JSON,
    plot), pool(s) (recording ``trained_paths``), histories and ``timing.json`` (each space's steps and
    training seconds, for equal-wall-time comparisons).

    Returns a dict with ``markdown`` (the evaluation table), ``timing``, ``eval`` (the
    :class:`~kvlingua.eval_result.EvalResult`) and ``files`` (the paths written).
    """
    tracker = tracker or NullTracker()
    out = Path(job.out_dir)
    trained = trained_paths(job)
    result = evaluate(backend, eval_batches(job), all_paths(job), spaces, first_tokens=job.eval.first_tokens,
                      trained=trained, content_min_se=job.eval.content_min_se)
    histories = {name: state.history for name, state in states.items()}
    job_dict = to_dict(job)
    report = write_report(out, result, histories, title=f"kvlingua run {job.name}", config=job_dict)
    files = {"eval_json": report["json"], "eval_md": report["markdown"]}
    if "plot" in report:  # train.eval_every > 0
        files["plot"] = report["plot"]
    main = job.main_space
    members = pool_members(job, backend)
    for name, space in spaces.items():
        pool_dir = space_pool_dir(out, name, main)
        extra = {"run": job.name, "space_name": name, MAIN_SPACE_KEY: main, "job": job_dict,
                 "trained_prefix_len": list(job.trained_prefix_len), "trained_paths": [list(p) for p in trained]}
        if space.cfg.keys == "unrotated":  # how each member's keys were un-rotated (RoPE, or none)
            extra["key_rotation"] = {m: backend.rotation(m).describe() for m in job.models}
        save_pool(pool_dir, space, members, tokenizer_dir=job.tokenizer, extra=extra, tokenizers=job.tokenizers)
        files[f"pool_{name}"] = pool_dir
    (out / "histories.json").write_text(json.dumps(histories, indent=1))
    timing = {name: {"steps": state.step, "train_wall_s": round(state.train_s, 1)} for name, state in states.items()}
    files["timing"] = out / "timing.json"
    files["timing"].write_text(json.dumps(timing, indent=1))
    for f in files.values():
        tracker.log_artifact(f)
    return {"markdown": result.to_markdown(), "timing": timing, "files": {k: str(v) for k, v in files.items()},
            "eval": result}


def local_checkpoints(job: TrainJob) -> tuple[Path | None, Saver]:
    """The in-process checkpoint directory ``<out_dir>/checkpoints``: where to resume from (None when it
    holds another job's checkpoints, or none) and the saver that writes there."""
    root = Path(job.out_dir) / "checkpoints"
    job_json = training_key(job)
    resume = root if (root / JOB_FILE).is_file() and (root / JOB_FILE).read_text() == job_json else None

    def save(_: str, spaces: dict[str, SharedSpace], states: dict[str, TrainState]) -> None:
        save_spaces(root, spaces, states)
        (root / JOB_FILE).write_text(job_json)

    return resume, save


def run_local(job: TrainJob, tracker: Tracker | None = None, progress: bool = True,
              backend: PoolBackend | None = None) -> dict:
    """Train every space of ``job`` in this process (a :class:`LocalBackend` unless given), then :func:`finish`.

    Resumes from ``<out_dir>/checkpoints`` when an earlier run of the same job left checkpoints there.
    """
    tracker = tracker or NullTracker()
    if backend is None:
        backend = LocalBackend({name: load_frozen(path) for name, path in job.models.items()})
    resume, save = local_checkpoints(job)
    runtime = Runtime(tracker=tracker, progress=progress)
    spaces, states = train_spaces(job, backend, runtime, resume_from=resume,
                                  hooks=SpaceHooks(save=save if job.train.checkpoint_every else None))
    return finish(job, spaces, backend, states, tracker)


def pool_job(pool_dir: str | Path, *, split: str | None = None, batches: int | None = None,
             prefix_len: int | None = None, models_root: str | Path | None = None, data=None):
    """A trained pool (or the run directory holding its pools) loaded with its models, and the run's job
    rebuilt from ``pool.json`` (models and tokenizer from the pool, so a moved pool still works) with
    ``split`` / ``batches`` / ``prefix_len`` / ``data`` replaced where given.

    Returns ``(loaded main pool, job)``; raises :class:`~kvlingua.config.ConfigError` for a pool
    ``kvlingua train`` did not write.
    """
    from dataclasses import replace

    from kvlingua.config import ConfigError, from_dict
    from kvlingua.pool import POOL_FILE, TOKENIZER_DIR, load_pool
    from kvlingua.rundir import main_space, read_run_pools

    pools = read_run_pools(pool_dir)  # space name -> pool directory
    loaded = load_pool(pools[main_space(pools)], models_root=models_root)
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
    if loaded.mixed_tokenizers:  # and each member's own, where they differ
        job = replace(job, tokenizers={e["name"]: str(loaded.root / e["tokenizer"]) for e in loaded.meta["members"]})
    if data is not None:
        job = replace(job, data=data)
    if split:
        job = replace(job, eval_split=split)
    if batches:
        job = replace(job, eval=replace(job.eval, batches=batches))
    if prefix_len is not None:
        if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 1:
            raise ConfigError(f"prefix_len must be a positive integer, got {prefix_len!r}")
        job = at_prefix_len(job, prefix_len)
    return loaded, job


REFRESH_TAG = ", refresh "
"""What joins a space's name and a refresh share in a condition name (:func:`refresh_condition`)."""


def refresh_condition(space: str, share: float) -> str:
    """The condition name of ``space`` read with a refresh of ``share``: ``"translator, refresh 5%"``."""
    return f"{space}{REFRESH_TAG}{share:.0%}"


def refreshed_space(condition: str) -> str | None:
    """The space a :func:`refresh_condition` name reads (``"translator"``), or None for any other condition."""
    return condition.split(REFRESH_TAG)[0] if REFRESH_TAG in condition else None


def evaluate_pool_dir(pool_dir: str | Path, *, split: str | None = None, batches: int | None = None,
                      prefix_len: int | None = None, ablate_stack: bool = False,
                      models_root: str | Path | None = None, data=None, fit_batches: bool = False,
                      refresh: tuple[float, ...] = ()):
    """Evaluate a trained pool (or the run directory holding its pools) on held-out batches, in process.

    The job is the run's (:func:`pool_job`), with ``split`` / ``batches`` / ``prefix_len`` replaced where
    given: with ``prefix_len`` every held-out row reads P = ``prefix_len`` tokens before the same-length
    suffix (how content transfer depends on positions). ``ablate_stack`` adds
    ``<space>-no-stack`` for each translator with both a stack and a short path. ``data`` (a
    :class:`~kvlingua.data.views.DataConfig`) scores the pool on other text: the user's own domain.
    ``fit_batches``: score as many of the batches as the split holds at these lengths (long prefixes leave fewer
    rows) instead of refusing. ``refresh``: also the main space read with each of these refresh shares
    (:func:`refresh_condition`; :mod:`kvlingua.refresh`), on the same batches, so each pairs with the space as
    recorded. Returns ``(EvalResult, job)``; raises :class:`~kvlingua.config.ConfigError` for a pool
    ``kvlingua train`` did not write.
    """
    from kvlingua.config import ConfigError
    from kvlingua.pool import load_pool
    from kvlingua.rundir import main_space, read_run_pools

    pools = read_run_pools(pool_dir)  # space name -> pool directory
    main = main_space(pools)
    loaded, job = pool_job(pool_dir, split=split, batches=batches, prefix_len=prefix_len, models_root=models_root,
                           data=data)
    if fit_batches:
        from dataclasses import replace

        job = replace(job, eval=replace(job.eval, batches=max(1, held_out_batches(job))))
    spaces = {name: loaded.space if name == main else load_pool(d, load_models=False, verify=False).space
              for name, d in pools.items()}
    if ablate_stack:
        ablatable = {n: s for n, s in spaces.items() if s.stack_removable}
        if not ablatable:
            raise ConfigError("--ablate-stack: no space here is a translator with both a stack and a short path")
        spaces |= {f"{n}-no-stack": s.without_stack() for n, s in ablatable.items()}
    spaces |= {refresh_condition(main, r): loaded.space.with_refresh(r) for r in refresh}
    # Every path, each marked trained or zero-shot as the pool recorded (older pools: the job's own paths).
    trained = [tuple(p) for p in loaded.meta.get("trained_paths", allowed_paths(job))]
    result = evaluate(LocalBackend(loaded.models), eval_batches(job), all_paths(job), spaces,
                      first_tokens=job.eval.first_tokens, trained=trained, content_min_se=job.eval.content_min_se)
    return result, job
