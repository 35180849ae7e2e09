"""What each lever of Σ buys, measured at the closed-form start (no training, so every variant costs the same).

A *lever* is one setting of the space config changed against a trained pool's own: how many sink
positions the target keeps (``sink_tokens``), whether keys travel un-rotated (``keys``), Σ's width
(``q_dim``) and how the adapters start (``init``). :func:`lever_starts` rebuilds the pool's space once
per variant, starts it (``closed_form``: one calibration pass over the run's first training batches,
exactly as :func:`kvlingua.train.fit` does; ``random``/``match`` as they start training) and scores it
on held-out batches with :func:`kvlingua.evaluate.evaluate`. The trained space is scored on the same
batches, so every variant compares with it, and with the default start, *paired*.

The *objective* lever needs training: :func:`objective_runs` starts the pool's space afresh once per
training objective (:data:`OBJECTIVES`), trains it in this process for the same wall-time budget (not the
same steps), keeps its best validation evaluation as :func:`kvlingua.train.fit` does, and scores it on the
same held-out batches, so the objectives compare with each other and with the default *paired*.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path

import torch

from kvlingua.backend import LocalBackend
from kvlingua.evaluate import EvalResult, evaluate, make_eval_fn
from kvlingua.job import all_paths, curve_batches, eval_batches, train_batches
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.train import fit, start_adapters

DEFAULT_LEVERS: dict[str, dict] = {
    "start (closed form)": {},
    "sink_tokens: 0": {"sink_tokens": 0},
    "sink_tokens: 4": {"sink_tokens": 4},
    "keys: rotated": {"keys": "rotated"},
    "q_dim: 240": {"q_dim": 240},
    "init: match": {"init": "match"},
    "init_batches: 16": {"init_batches": 16},
}
"""Variant name -> the space-config fields it changes (the first is the run's own start)."""


def start_space(members: dict, cfg, backend: LocalBackend, job, seed: int) -> SharedSpace:
    """A fresh space of ``cfg`` over ``members``, started as training would start it, before any step."""
    torch.manual_seed(seed)
    space = SharedSpace(members, cfg)
    names = list(members)
    start_adapters(space, backend, islice(train_batches(job), cfg.init_batches), names, names)
    return space.eval()


def lever_starts(run_dir: str | Path, levers: dict[str, dict] | None = None, *, split: str = "test",
                 batches: int | None = None) -> dict[str, EvalResult]:
    """Score each lever's start and the trained space on the same held-out batches.

    Args:
        run_dir: a trained run (its ``pool/``), as :func:`kvlingua.run.evaluate_pool_dir` reads it.
        levers: variant name -> space-config overrides (default :data:`DEFAULT_LEVERS`).
        split, batches: the held-out batches.

    Returns:
        ``{"trained": EvalResult, <variant>: EvalResult, ...}``; each result holds the references (base,
        control, no-prefix) at its own sink and one condition named ``space``.
    """
    from kvlingua.run import pool_job

    loaded, job = pool_job(run_dir, split=split, batches=batches)
    backend = LocalBackend(loaded.models)
    members = {m.name: m.summary for m in loaded.members}
    held = eval_batches(job)
    paths = all_paths(job)
    base = loaded.space.cfg
    out = {"trained": evaluate(backend, held, paths, {"space": loaded.space}, identity=False,
                               first_tokens=job.eval.first_tokens)}
    for name, change in (levers or DEFAULT_LEVERS).items():
        cfg = replace(base, **change)
        if cfg.sink_tokens >= job.trained_prefix_len[0]:  # the calibration's shortest prefixes leave Σ nothing
            continue
        space = start_space(members, cfg, backend, job, job.train.seed)
        out[name] = evaluate(backend, held, paths, {"space": space}, identity=False,
                             first_tokens=job.eval.first_tokens)
    return out


OBJECTIVES: dict[str, dict] = {
    "suffix": {"objective": "suffix", "recon_weight": 0.0},
    "kl": {"objective": "kl", "recon_weight": 0.0},
    "recon": {"objective": "suffix", "recon_weight": 1.0},
}
"""Objective name -> the ``TrainConfig`` fields it sets: the paper's suffix cross-entropy (the default, the first,
which the others pair against), the suffix KL to the target's own-cache distribution, and the suffix cross-entropy
plus the reconstruction loss (Σ's view of the target's cache) at weight 1."""


@dataclass(frozen=True)
class ObjectiveRun:
    """One objective trained for the wall-time budget and scored on the held-out batches."""

    result: EvalResult
    """The held-out table: the references and one condition named ``space``."""
    steps: int
    """Optimiser steps reached in the budget."""
    schedule_steps: int
    """Steps the warm-up + cosine schedule spans: planned from the measured step cost to end at the budget."""
    train_s: float
    """Wall seconds of training (evaluations included), as :attr:`kvlingua.train.TrainState.train_s`."""
    best_step: int
    """The step of the validation evaluation the run kept (``keep_best``)."""


PLAN_MARGIN = 1.2
"""The schedule of an objective run spans this many times the steps its measured cost predicts for the budget, so
the budget, not the schedule, ends every run (each then stops at the same share of its budget's schedule)."""


def _plan_steps(space: SharedSpace, models: dict, job, cfg, curve, paths, seconds: float, evals: int,
                probe_steps: int) -> int:
    """Steps that fill ``seconds`` of training with ``evals`` validation evaluations, times :data:`PLAN_MARGIN`:
    ``probe_steps`` steps and one evaluation timed on a copy of the started space (with a backend of its own, so
    no cache carries over)."""
    probe, backend = copy.deepcopy(space), LocalBackend(models)
    state = fit(probe, backend, train_batches(job), replace(cfg, steps=probe_steps, eval_every=0, keep_best=False),
                runtime=Runtime(progress=False), fresh=False)
    step_s = state.train_s / probe_steps
    began = time.perf_counter()
    evaluate(backend, curve, paths, {"space": probe}, identity=False, references=False,
             first_tokens=job.eval.first_tokens)
    eval_s = time.perf_counter() - began
    return max(1, round(PLAN_MARGIN * (seconds - evals * eval_s) / step_s))


def objective_runs(run_dir: str | Path, objectives: tuple[str, ...] = tuple(OBJECTIVES), *, seconds: float,
                   split: str = "test", batches: int | None = None, evals: int = 4, probe_steps: int = 2,
                   progress: bool = False) -> dict[str, ObjectiveRun]:
    """Train the run's main space afresh once per objective for ``seconds`` of wall time each, and score each.

    Each run starts from the pool's own start (its ``init``, on the run's first training batches, as
    :func:`lever_starts` and training do), trains in this process on the run's training batches with the run's
    loop settings and the objective's fields (:data:`OBJECTIVES`) until ``seconds`` of training are spent
    (:func:`kvlingua.train.fit`'s ``budget_s``; the schedule is planned from the measured cost of a step and of an
    evaluation to end a little past it, :data:`PLAN_MARGIN`), evaluates on the validation curve batches ``evals``
    times and keeps the best, then is scored on the same held-out batches as :func:`lever_starts`.

    Args:
        run_dir: a trained run (its ``pool/``), as :func:`kvlingua.run.evaluate_pool_dir` reads it.
        objectives: names of :data:`OBJECTIVES`, the first the default the report pairs the others against.
        seconds: the wall-time budget of each objective.
        split, batches: the held-out batches.
        evals: validation evaluations in the budget (selection as ``keep_best``).
        probe_steps: steps timed to plan the schedule.
        progress: show the training bars.

    Returns:
        objective name -> :class:`ObjectiveRun`, in the order given.
    """
    from kvlingua.run import pool_job

    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives:
        raise ValueError(f"objectives must name some of {list(OBJECTIVES)}, got {list(objectives)}")
    if not seconds > 0 or evals < 1 or probe_steps < 1:
        raise ValueError(f"seconds must be > 0 and evals, probe_steps >= 1; got {seconds}, {evals}, {probe_steps}")
    loaded, job = pool_job(run_dir, split=split, batches=batches)
    members = {m.name: m.summary for m in loaded.members}
    held, curve, paths = eval_batches(job), curve_batches(job), all_paths(job)
    out = {}
    for name in objectives:
        backend = LocalBackend(loaded.models)  # a fresh teacher cache for each objective
        cfg = replace(job.train_for(job.main_space), **OBJECTIVES[name], checkpoint_every=0, keep_best=True)
        space = start_space(members, loaded.space.cfg, backend, job, cfg.seed)
        steps = _plan_steps(space, loaded.models, job, cfg, curve, paths, seconds, evals, probe_steps)
        cfg = replace(cfg, steps=steps, eval_every=max(1, steps // evals))
        state = fit(space, backend, train_batches(job), cfg, runtime=Runtime(progress=progress),
                    eval_fn=make_eval_fn(backend, curve, paths, space, first_tokens=job.eval.first_tokens),
                    fresh=False, budget_s=seconds)
        select = [r["best_step"] for r in state.history if r["kind"] == "select"]
        result = evaluate(backend, held, paths, {"space": space}, identity=False, first_tokens=job.eval.first_tokens)
        out[name] = ObjectiveRun(result, state.step, steps, state.train_s, select[-1] if select else state.step)
    return out
