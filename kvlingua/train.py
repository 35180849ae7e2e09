"""The one training loop of Σ, used in-process and by the Ray Train workers.

Every step samples paths i->j (:class:`~kvlingua.paths.PathSampler`) and, for each:

1. ``src = backend.prefix_block(i, ids[i][:, :P])`` — the frozen source cache (no grad), read
   through the space's :class:`~kvlingua.view.CacheView`: the positions after the sink, keys
   un-rotated (``[B, P-k, L_i, D_i]``);
2. ``z = space.encode(src, i)`` once per source of the step, then per path
   ``out = space.decode(z, j)`` — ``OUT_j(IN_i(src))`` with autograd;
3. ``cache = view.to_cache(out, ...)`` — keys rotated at the target's positions after the target's
   own sink block (``[B, P, L_j, D_j]``); ``(loss, g) = backend.suffix_loss_and_grad(j, cache, ids[j][:, P:])``
   — the frozen target reads it as its cache; the backend returns d loss / d cache (``objective: kl``:
   ``backend.suffix_kl_and_grad(j, cache, ids[j][:, P:], ids[j][:, :P])``, the target after its own cache
   as the teacher);
4. ``backward([cache.keys, cache.values], [g.keys * w, g.values * w])`` with ``w = 1/#paths``
   through the rotation into ``OUT_j`` and a detached copy of ``z``; once every path is done, the summed
   d loss / d z goes back through ``IN_i`` in one pass,

so the loss is the mean over sampled paths and gradients reach only the adapters. Encoding
each source once instead of once per path is the same gradient at a fraction of the cost
(with N models and all N² paths, N encoder passes instead of N²).
Then ``runtime.grad_sync`` (on a multi-rank Ray Train run: the gradients averaged over the ranks with one flat
``torch.distributed`` all-reduce, :func:`workers.train_worker.allreduce_mean`), gradient clipping, AdamW with
linear warm-up and cosine decay to 0 (:mod:`kvlingua.train_config`). The frozen models are reached only through a
:class:`~kvlingua.backend.PoolBackend`, so the same loop runs with models in this
process (:class:`~kvlingua.backend.LocalBackend`) or behind Ray actors.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from kvlingua.align import read_along
from kvlingua.backend import PoolBackend
from kvlingua.batch import Batch
from kvlingua.cache import KVBlock
from kvlingua.losses import reconstruction_loss, suffix_kl_loss, suffix_lm_loss
from kvlingua.closedform import attention_weighted_out, closed_form_init
from kvlingua.metric_names import NllKey
from kvlingua.outinit import match_init
from kvlingua.prior_fit import fit_token_prior
from kvlingua.readout_fit import fit_token_readout
from kvlingua.paths import PathSampler, PathT, path_name
from kvlingua.space import LatentBlock, SharedSpace, space_device
from kvlingua.view import CacheView
from kvlingua.runtime import Runtime
from kvlingua.train_config import TrainConfig, TrainState, make_optimizer, trainable_names

def train_step(space: SharedSpace, backend: PoolBackend, batch: Batch, paths: list[PathT],
               cfg: TrainConfig, view: CacheView | None = None) -> dict[str, float]:
    """Losses of one batch over ``paths``; accumulates gradients into the adapters (no optimiser step).

    ``view`` (default the space's, :meth:`CacheView.of`) says what Σ carries of a cache: the positions after
    the target's own sink, keys un-rotated.

    Returns metrics: ``loss`` (mean over paths), and per path ``loss/i->j``, ``suffix/i->j`` (``kl/i->j`` with
    ``objective: kl``) and, with ``recon_weight > 0``, ``recon/i->j``.
    """
    if not paths:
        raise ValueError("train_step needs at least one path")
    device = space_device(space)

    def autocast():  # a fresh context per use: one autocast object must not be entered twice
        return (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if cfg.precision == "bf16"
                else nullcontext())
    w = 1.0 / len(paths)
    view = view or CacheView.of(space.cfg)
    view.check_prefix(batch.prefix_len)
    k = view.sink_tokens
    own: dict[str, KVBlock] = {}  # model -> its block of its own prefix, computed once per batch

    def own_block(model: str) -> KVBlock:
        if model not in own:
            own[model] = backend.prefix_block(model, batch.prefix(model)).to(device)  # [B, P, L, D]
        return own[model]

    def rotation(model: str):
        return backend.rotation(model) if view.unrotate else None

    sources = {i for i, _ in paths}

    def sink(model: str) -> KVBlock | None:  # the target's own cache of its first k tokens [B, k, L, D]
        if k == 0:
            return None
        if model in own or model in sources:  # a slice of the block it reads (or will read) as a source
            block = own_block(model)
            return KVBlock(block.keys[:, :k], block.values[:, :k], block.n_kv_heads)
        return backend.prefix_block(model, batch.prefix(model)[:, :k]).to(device)

    encoded: dict[str, tuple[LatentBlock, LatentBlock]] = {}  # source -> (latent with IN's graph, detached leaf)

    def latent(model: str) -> LatentBlock:
        if model not in encoded:
            with autocast():
                z = space.encode(view.to_space(own_block(model), rotation(model)), model)  # [B, P-k, Q]
            leaf = z.detach().map(lambda t: t.requires_grad_(z.keys.requires_grad))
            encoded[model] = (z, leaf)
        return encoded[model][1]

    metrics: dict[str, float] = {}
    total = 0.0
    for src_name, tgt_name in paths:
        name = path_name((src_name, tgt_name))
        with autocast():  # Σ read at the target's positions where the two tokenize differently
            out = space.decode(read_along(latent(src_name), batch.align(src_name, tgt_name, k)), tgt_name,
                               batch.prefix(tgt_name)[:, k:])  # [B, P-k, L_j, D_j]
        if not out.keys.requires_grad:
            raise ValueError(f"path {name} produced a block without gradient: are both of its adapters frozen?")
        cache = view.to_cache(out, rotation(tgt_name), sink(tgt_name))  # [B, P, L_j, D_j]: sink + rotated keys
        if cfg.objective == "kl":  # the teacher: the target after its own cache of its own prefix
            loss, g = suffix_kl_loss(backend, cache, tgt_name, batch.suffix(tgt_name), batch.prefix(tgt_name))
        else:
            loss, g = suffix_lm_loss(backend, cache, tgt_name, batch.suffix(tgt_name))
        tensors, grads = [cache.keys, cache.values], [g.keys * w, g.values * w]
        path_loss = float(loss)
        metrics[f"{cfg.objective}/{name}"] = path_loss  # suffix/i->j (cross-entropy) or kl/i->j
        if cfg.recon_weight > 0:  # in Σ's view of the target's cache: after its sink, keys position-free
            recon = reconstruction_loss(out, view.to_space(own_block(tgt_name), rotation(tgt_name)))
            tensors.append(recon * (cfg.recon_weight * w))
            grads.append(None)
            metrics[f"recon/{name}"] = float(recon.detach())
            path_loss += cfg.recon_weight * float(recon.detach())
        torch.autograd.backward(tensors, grads)
        metrics[f"loss/{name}"] = path_loss
        total += w * path_loss
    for z, leaf in encoded.values():  # the paths' summed d loss / d z through IN, once per source
        if leaf.keys.grad is not None:
            torch.autograd.backward([z.keys, z.values], [leaf.keys.grad, leaf.values.grad])
    metrics["loss"] = total
    return metrics


def start_adapters(space: SharedSpace, backend: PoolBackend, batches: Iterable[Batch], ins: list[str], outs: list[str],
                   runtime: Runtime | None = None, view: CacheView | None = None,
                   calibration: Iterable[Batch] | None = None) -> tuple[dict, Iterable[Batch]]:
    """Start a fresh space as ``space.cfg.init`` says, before its first step: ``closed_form`` on the first
    ``init_batches`` batches (every member in ``ins``/``outs`` fitted), ``match`` on the first batch (IN of ``ins``,
    OUT of ``outs``), ``random`` as built. The closed form reads ``calibration`` instead where given
    (:func:`kvlingua.job.calibration_batches`). Returns the init's record and the batches, none of them consumed."""
    batch_iter = iter(batches)
    space.bind_tokens(backend, replace=False)  # a token readout reads each target's own embeddings
    n = {"closed_form": space.cfg.init_batches, "match": 1}.get(space.cfg.init, 0)
    own = calibration is not None and space.cfg.init == "closed_form"
    first = list(itertools.islice(iter(calibration) if own else batch_iter, n))
    if len(first) < min(n, 1):
        raise ValueError("batches ran out at step 0")
    record = {}
    if space.cfg.init == "closed_form":
        fitted = sorted(set(ins) | set(outs), key=space.names.index)
        record = closed_form_init(space, backend, first, fitted, runtime, view)
        if space.cfg.out_weights == "attention":
            record |= attention_weighted_out(space, backend, first, fitted, runtime, view)
        if space.cfg.token_readout:  # OUT refitted jointly with each target's own tokens
            record |= fit_token_readout(space, backend, first, outs, runtime, view)
        if space.cfg.token_prior:  # after the short paths: the prior corrects what they decode
            record |= fit_token_prior(space, backend, first, outs, runtime, view)
    elif space.cfg.init == "match":
        record = match_init(space, backend, first[0], ins, outs, runtime, view=view)
    return record, batch_iter if own else itertools.chain(first, batch_iter)


def _sync_state(state: TrainState, opt: torch.optim.Optimizer, sched: Any) -> None:
    state.optimizer_state = opt.state_dict()
    state.scheduler_state = sched.state_dict()
    state.rng_state = torch.get_rng_state()


def fit(
    space: nn.Module,
    backend: PoolBackend,
    batches: Iterable[Batch],
    cfg: TrainConfig,
    *,
    runtime: Runtime | None = None,
    state: TrainState | None = None,
    eval_fn: Callable[[int], dict] | None = None,
    checkpoint_fn: Callable[[TrainState], None] | None = None,
    view: CacheView | None = None,
    fresh: bool = True,
    budget_s: float | None = None,
    calibration: Iterable[Batch] | None = None,
) -> TrainState:
    """Train the space's adapters until ``cfg.steps`` optimiser steps are done.

    Leaves ``requires_grad`` on for the trainable models' adapters and off for the rest.
    An adapter that no path of a step used gets no gradient on that step, so AdamW leaves
    it exactly as it was (no momentum, no weight decay): with sampled paths, or while a new
    member joins a trained pool, what a step did not train does not move.

    Args:
        space: the SharedSpace (its ``names`` are the models paths are drawn from).
        backend: the frozen pool.
        batches: yields one :class:`Batch` per step, starting at step ``state.step``
            (a resumed run must be given the batches from that step on).
        cfg: hyper-parameters.
        runtime: rank, world size, gradient sync, and the rank-aware tracker and progress bar
            (:class:`~kvlingua.runtime.Runtime`); default: one in-process rank, no tracking.
        state: resume from this state (``load_checkpoint``); None starts at step 0.
        eval_fn: ``eval_fn(step) -> metrics``, called at the start of a fresh run, every
            ``eval_every`` steps and at the end (under ``no_grad``, space in eval mode); its
            metrics go to ``state.history`` with ``kind="eval"`` and to the tracker.
        checkpoint_fn: called with the synced state every ``checkpoint_every`` steps and at the end.
        view: what Σ carries of a cache (default the space's own; soft-prompt modules have no sink).
        fresh: start the adapters as ``space.cfg.init`` says at step 0 (``closed_form`` or ``match``); False for
            a space that is already trained (meta-training a pool's Σ).
        budget_s: end early, after the step during which this many wall seconds of training (``state.train_s``
            of this call, evaluations included) ran out, as if it were the last step (evaluation, selection,
            checkpoint); the schedule still spans ``cfg.steps``. For comparisons at equal wall time.
        calibration: the ``closed_form`` start's batches (:func:`kvlingua.job.calibration_batches`); None: the
            first ``init_batches`` of ``batches``, which training then reads too.

    Returns:
        The final :class:`TrainState` with optimiser, scheduler and RNG state.
    """
    runtime = runtime or Runtime()
    tracker = runtime.tracker
    state = state if state is not None else TrainState()
    missing = [m for m in space.names if m not in backend.names()]
    if missing:
        raise ValueError(f"space members {missing} are not in the backend's pool {backend.names()}")
    space.bind_tokens(backend, replace=False)  # a token readout reads each target's own embeddings
    sampler = PathSampler(space.names, cfg.paths_per_step, cfg.seed, cfg.paths, cfg.trainable)
    opt, sched = make_optimizer(space, cfg)
    # (model, "in"|"out") -> that adapter's parameters, for the trainable models
    adapter_params = {(m, side): list(space.adapters(m)[side].parameters())
                      for m in trainable_names(space, cfg) for side in ("in", "out")}
    params = [p for g in opt.param_groups for p in g["params"]]  # the trainable models' adapters
    space.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if state.optimizer_state is not None:
        opt.load_state_dict(state.optimizer_state)
    if state.scheduler_state is not None:
        sched.load_state_dict(state.scheduler_state)
    if state.rng_state is not None:
        torch.set_rng_state(state.rng_state)

    best: dict[str, Any] = {}  # the best curve evaluation so far: step, score, trainable adapter weights

    def run_eval() -> None:
        was_training = space.training
        space.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in eval_fn(state.step).items()}
        space.train(was_training)
        state.history.append({"step": state.step, "kind": "eval", **metrics})
        if metrics:
            tracker.log_metrics(metrics, state.step)
        score = selection_score(metrics)
        if cfg.keep_best and score is not None and score < best.get("score", float("inf")):
            best.update(step=state.step, score=score,
                        weights={id(p): p.detach().clone() for p in params})

    batch_iter = iter(batches)
    if fresh and state.step == 0 and space.cfg.init in ("closed_form", "match"):
        trainable = trainable_names(space, cfg)
        ins = [m for m in trainable if any(i == m for i, _ in sampler.allowed)]
        outs = [m for m in trainable if any(j == m for _, j in sampler.allowed)]
        init, batch_iter = start_adapters(space, backend, batch_iter, ins, outs, runtime, view, calibration)
        state.history.append({"step": 0, "kind": "init", **init})
    if eval_fn is not None and cfg.eval_every and state.step == 0:
        run_eval()
    began, spent_before = time.perf_counter(), state.train_s
    bar = tqdm(total=cfg.steps, initial=state.step, disable=not runtime.progress, desc="train Σ", unit="step")
    space.train()
    while state.step < cfg.steps:
        try:
            batch = next(batch_iter)
        except StopIteration:
            raise ValueError(f"batches ran out at step {state.step} of {cfg.steps}") from None
        opt.zero_grad(set_to_none=True)
        paths = sampler.sample(state.step)
        metrics = train_step(space, backend, batch, paths, cfg, view)
        if runtime.grad_sync is not None:  # every rank reduces the same tensors: zeros where a rank has none
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            runtime.grad_sync(params)
        # path i->j runs IN_i and OUT_j; the paths, and so this set, are the same on every rank
        used = {(i, "in") for i, _ in paths} | {(j, "out") for _, j in paths}
        for key, ps in adapter_params.items():
            if key not in used:
                for p in ps:
                    p.grad = None  # AdamW skips a parameter without a gradient: it does not move
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip)
        metrics["lr"] = opt.param_groups[0]["lr"]
        metrics["grad_norm"] = float(grad_norm)
        opt.step()
        sched.step()
        state.step += 1
        last = state.step == cfg.steps or (budget_s is not None and time.perf_counter() - began >= budget_s)
        per_path = {k.split("/", 1)[1]: f"{v:.3f}" for k, v in metrics.items() if k.startswith(f"{cfg.objective}/")}
        bar.set_postfix({**per_path, "loss": f"{metrics['loss']:.3f}"}, refresh=False)
        bar.update(1)  # one redraw per step, with this step's losses
        if last or (cfg.log_every and state.step % cfg.log_every == 0):
            state.history.append({"step": state.step, "kind": "train", **metrics})
            tracker.log_metrics(metrics, state.step)
        if eval_fn is not None and cfg.eval_every and (last or state.step % cfg.eval_every == 0):
            run_eval()
        state.train_s = spent_before + time.perf_counter() - began
        if checkpoint_fn is not None and cfg.checkpoint_every and (last or state.step % cfg.checkpoint_every == 0):
            _sync_state(state, opt, sched)
            checkpoint_fn(state)
        if last:  # cfg.steps reached, or the wall-time budget spent
            break
    bar.close()
    if best and best["step"] != state.step:  # the last evaluation was not the best: end at the best one
        with torch.no_grad():
            for p in params:
                p.copy_(best["weights"][id(p)])
        state.history.append({"step": state.step, "kind": "select", "best_step": best["step"],
                              "best_score": best["score"]})
        tracker.log_metrics({"select/best_step": best["step"], "select/best_score": best["score"]}, state.step)
    _sync_state(state, opt, sched)
    return state


def selection_score(metrics: dict[str, float]) -> float | None:
    """The number a run keeps its best adapters by: the mean over paths of ``eval/nll/<path>`` (None if absent)."""
    nll = [v for k, v in metrics.items() if (key := NllKey.parse(k)) is not None and k == key.curve()]
    return sum(nll) / len(nll) if nll else None
