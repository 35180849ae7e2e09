"""Training arms: the main space trained afresh with one change, each for the same wall time, scored paired.

Some levers only show after training: the objective (the paper's suffix cross-entropy, a KL to the target's own
distribution, reconstruction) and the shape of the adapters (a shallower stack, no stack at all), which also sets
how fast a hand-off is. An *arm* (:data:`ARMS`) is one such change: fields of the run's training config
(``train``) and of its main space's config (``space``). :class:`ArmTrainer` starts the run's main space afresh
with the arm's change (its ``init`` on the run's first training batches, as :func:`kvlingua.train.fit` does),
trains it in this process for a wall-time budget (not a number of steps), keeps its best validation evaluation
and scores it on held-out batches, so every arm compares with the first (the default) on the same rows.
"""
from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kvlingua.backend import LocalBackend
from kvlingua.evaluate import EvalResult, evaluate, make_eval_fn
from kvlingua.job import all_paths, curve_batches, eval_batches, train_batches
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.train import fit

from experiments.realmodel.levers import start_space

ARMS: dict[str, dict[str, dict]] = {
    "suffix": {"train": {"objective": "suffix", "recon_weight": 0.0}},
    "kl": {"train": {"objective": "kl", "recon_weight": 0.0}},
    "recon": {"train": {"objective": "suffix", "recon_weight": 1.0}},
    "stack: 6 layers (merge)": {"space": {"num_layers": 6, "group_mode": "merge"}},
    "stack: 3 layers (merge)": {"space": {"num_layers": 3, "group_mode": "merge"}},
    "short path only": {"space": {"stack": False}},
}
"""Arm name -> ``{"train": TrainConfig fields, "space": SpaceConfig fields}`` it sets. ``suffix`` is the method's
default (the paper's suffix cross-entropy); ``kl``: the suffix KL to the target's own-cache distribution; ``recon``:
suffix cross-entropy plus the reconstruction loss at weight 1; ``stack: 6 layers (merge)``, ``stack: 3 layers (merge)``: six (three)
stack layers, each reading one merged group of slices (the input transform contracts a group into one slice); ``short path only``: no
stack, the closed form's linear maps trained alone."""

DEFAULT_ARMS = ("suffix", "kl", "recon")
"""The arms ``kvlingua real-model --arm-seconds`` trains when ``--arms`` is not given: the objectives."""

PLAN_MARGIN = 1.2
"""The schedule of an arm spans this many times the steps its measured cost predicts for the budget, so the
budget, not the schedule, ends every run (each then stops at the same share of its budget's schedule)."""


def arm_file(name: str) -> str:
    """The results file of arm ``name``: its name with every run of characters other than letters, digits and
    ``.``/``_`` replaced by ``-`` (``suffix`` -> ``suffix.json``, ``stack: 6 layers (merge)`` ->
    ``stack-6-layers-merge.json``)."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") + ".json"


def check_arms(names: tuple[str, ...]) -> None:
    """Refuse unknown or repeated arm names, in one line."""
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"arms must name some of {list(ARMS)}, each once; got {list(names)}")


@dataclass(frozen=True)
class ArmRun:
    """One arm trained for the wall-time budget and scored on the held-out batches."""

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
    space: SharedSpace
    """The trained space (in eval mode), e.g. for timing its hand-off."""


class ArmTrainer:
    """A trained run's pool and batches, loaded once, to train and score one arm at a time.

    Args:
        run_dir: a trained run (its ``pool/``), as :func:`kvlingua.run.evaluate_pool_dir` reads it.
        split, batches: the held-out batches every arm is scored on.
        evals: validation evaluations in each budget (selection as ``keep_best``).
        probe_steps: steps timed to plan each arm's schedule.
        progress: show the training bars.
    """

    def __init__(self, run_dir: str | Path, *, split: str = "test", batches: int | None = None, evals: int = 4,
                 probe_steps: int = 2, progress: bool = False):
        from kvlingua.run import pool_job

        if evals < 1 or probe_steps < 1:
            raise ValueError(f"evals and probe_steps must be >= 1; got {evals}, {probe_steps}")
        self.loaded, self.job = pool_job(run_dir, split=split, batches=batches)
        self.members = {m.name: m.summary for m in self.loaded.members}
        self.held, self.curve, self.paths = eval_batches(self.job), curve_batches(self.job), all_paths(self.job)
        self.evals, self.probe_steps, self.progress = evals, probe_steps, progress

    @property
    def models(self) -> dict:
        return self.loaded.models

    def run(self, name: str, seconds: float) -> ArmRun:
        """Train arm ``name`` of :data:`ARMS` afresh for ``seconds`` of wall time and score it.

        The schedule is planned from the measured cost of a step and of an evaluation to end a little past the
        budget (:data:`PLAN_MARGIN`), so the budget ends the run (:func:`kvlingua.train.fit`'s ``budget_s``)."""
        check_arms((name,))
        if not seconds > 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        job, arm = self.job, ARMS[name]
        backend = LocalBackend(self.models)  # a fresh teacher cache for each arm
        cfg = replace(job.train_for(job.main_space), **arm.get("train", {}), checkpoint_every=0, keep_best=True)
        space = start_space(self.members, replace(self.loaded.space.cfg, **arm.get("space", {})), backend, job,
                            cfg.seed)
        steps = self._plan_steps(space, cfg, seconds)
        cfg = replace(cfg, steps=steps, eval_every=max(1, steps // self.evals))
        state = fit(space, backend, train_batches(job), cfg, runtime=Runtime(progress=self.progress),
                    eval_fn=make_eval_fn(backend, self.curve, self.paths, space, first_tokens=job.eval.first_tokens),
                    fresh=False, budget_s=seconds)
        select = [r["best_step"] for r in state.history if r["kind"] == "select"]
        space.eval()
        result = evaluate(backend, self.held, self.paths, {"space": space}, identity=False,
                          first_tokens=job.eval.first_tokens)
        return ArmRun(result, state.step, steps, state.train_s, select[-1] if select else state.step, space)

    def _plan_steps(self, space: SharedSpace, cfg, seconds: float) -> int:
        """Steps that fill ``seconds`` of training with the evaluations, times :data:`PLAN_MARGIN`: a few steps and
        one evaluation timed on a copy of the started space (with a backend of its own, so no cache carries over)."""
        job, probe, backend = self.job, copy.deepcopy(space), LocalBackend(self.models)
        state = fit(probe, backend, train_batches(job), replace(cfg, steps=self.probe_steps, eval_every=0,
                                                                keep_best=False),
                    runtime=Runtime(progress=False), fresh=False)
        step_s = state.train_s / self.probe_steps
        began = time.perf_counter()
        evaluate(backend, self.curve, self.paths, {"space": probe}, identity=False, references=False,
                 first_tokens=job.eval.first_tokens)
        eval_s = time.perf_counter() - began
        return max(1, round(PLAN_MARGIN * (seconds - self.evals * eval_s) / step_s))
