"""What each lever of Σ buys, measured at the closed-form start (no training, so every variant costs the same).

A *lever* is one setting of the space config changed against a trained pool's own: how many sink
positions the target keeps (``sink_tokens``), whether keys travel un-rotated (``keys``), Σ's width
(``q_dim``) and how the adapters start (``init``). :func:`lever_starts` rebuilds the pool's space once
per variant, starts it (``closed_form``: one calibration pass over the run's first training batches,
exactly as :func:`kvlingua.train.fit` does; ``random``/``match`` as they start training) and scores it
on held-out batches with :func:`kvlingua.evaluate.evaluate`. The trained space is scored on the same
batches, so every variant compares with it, and with the default start, *paired*.

Levers that need training (the objective, the stack's depth) are :mod:`experiments.realmodel.arms`.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import islice
from pathlib import Path

import torch

from kvlingua.backend import LocalBackend
from kvlingua.evaluate import EvalResult, evaluate
from kvlingua.job import all_paths, at_prefix_len, calibration_batches, eval_batches, train_batches
from kvlingua.space import SharedSpace
from kvlingua.train import start_adapters

DEFAULT_LEVERS: dict[str, dict] = {
    "start (closed form)": {},
    "sink_tokens: 0": {"sink_tokens": 0},
    "sink_tokens: 4": {"sink_tokens": 4},
    "keys: rotated": {"keys": "rotated"},
    "q_dim: 240": {"q_dim": 240},
    "init: match": {"init": "match", "token_prior": 0, "token_readout": False},
    "init_batches: 16": {"init_batches": 16},
    "out_weights: attention": {"init": "closed_form", "out_weights": "attention", "token_readout": False},
    "refresh: 0": {"refresh": 0},
    "token_prior: 0": {"token_prior": 0},
    "token_readout: false": {"token_readout": False},
    "512-token calibration": {"init": "closed_form", "init_prefix_len": 512, "init_batches": 8},
    "out_weights: attention, 512-token calibration": {"init": "closed_form", "out_weights": "attention",
                                                      "init_prefix_len": 512, "init_batches": 8, "token_readout": False},
}
"""Variant name -> the space-config fields it changes (the first is the run's own start). The 512-token levers
calibrate on 8 batches of 512-token prefixes (the held-out length past training where content falls; passages of
512 + suffix tokens); ``out_weights: attention`` refits OUT weighted by the target's attention
(:func:`kvlingua.closedform.attention_weighted_out`); ``refresh: 0`` reads the start's translation as is (no
positions recomputed by the target, :mod:`kvlingua.refresh`); ``token_prior: 0`` decodes without the targets' token
priors (:mod:`kvlingua.prior`; the same as the start in a space without them, so a run skips it there);
``token_readout: false`` decodes from Σ alone, OUT fitted without the targets' tokens (:mod:`kvlingua.readout`; skipped
likewise)."""


def start_space(members: dict, cfg, backend: LocalBackend, job, seed: int) -> SharedSpace:
    """A fresh space of ``cfg`` over ``members``, started as training would start it, before any step."""
    torch.manual_seed(seed)
    space = SharedSpace(members, cfg)
    names = list(members)
    start_adapters(space, backend, islice(train_batches(job), cfg.init_batches), names, names,
                   calibration=calibration_batches(job, cfg))
    return space.eval()


def lever_starts(run_dir: str | Path, levers: dict[str, dict] | None = None, *, split: str = "test",
                 batches: int | None = None, prefix_len: int | None = None,
                 trained: bool = True) -> dict[str, EvalResult]:
    """Score each lever's start and the trained space on the same held-out batches.

    Args:
        run_dir: a trained run (its ``pool/``), as :func:`kvlingua.run.evaluate_pool_dir` reads it.
        levers: variant name -> space-config overrides (default :data:`DEFAULT_LEVERS`).
        split, batches: the held-out batches.
        prefix_len: the held-out prefix length (default the run's); every start is still calibrated on the run's
            own training batches, so a length past training asks what each lever carries there.
        trained: also score the trained space (a resumed stage that has it already passes False).

    Returns:
        ``{"trained": EvalResult, <variant>: EvalResult, ...}``; each result holds the references (base,
        control, no-prefix) at its own sink and one condition named ``space``.
    """
    from kvlingua.run import pool_job

    loaded, job = pool_job(run_dir, split=split, batches=batches)
    backend = LocalBackend(loaded.models)
    members = {m.name: m.summary for m in loaded.members}
    held = eval_batches(job if prefix_len is None else at_prefix_len(job, prefix_len))
    paths = all_paths(job)
    base = loaded.space.cfg
    out = {"trained": evaluate(backend, held, paths, {"space": loaded.space}, identity=False,
                               first_tokens=job.eval.first_tokens)} if trained else {}
    for name, change in (levers or DEFAULT_LEVERS).items():
        cfg = replace(base, **change)
        if (change == {"token_prior": 0} and not base.token_prior) or \
                (change == {"token_readout": False} and not base.token_readout):
            continue  # nothing to drop: the start itself again
        if cfg.sink_tokens >= job.trained_prefix_len[0]:  # the calibration's shortest prefixes leave Σ nothing
            continue
        space = start_space(members, cfg, backend, job, job.train.seed)
        out[name] = evaluate(backend, held, paths, {"space": space}, identity=False,
                             first_tokens=job.eval.first_tokens)
    return out
