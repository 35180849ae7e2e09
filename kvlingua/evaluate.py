"""Held-out evaluation of shared spaces: suffix NLL per path under every condition.

For a path i->j, target model j continues the suffix ``ids[j][:, P:]`` after a prefix cache built in one of
these ways (all NLLs are per suffix token, via ``backend.suffix_nll``; j's own tokens where the two tokenize
differently, and Σ is then read along :meth:`Batch.align <kvlingua.batch.Batch.align>`):

* ``base``: j's own cache of its prefix ``ids[j][:, :P]`` (the ceiling to match);
* ``control``: j's own cache of *another* sequence's prefix (``Batch.control_prefix``:
  the batch rolled by one): right positions, wrong content — the honest floor for content;
* ``no-prefix``: no cache at all (a looser floor);
* ``identity``: i's cache handed over unchanged (only when the cache layouts and the tokens match);
* one condition per named space: ``space.translate(i's cache, i, j)`` through the space's
  :class:`~kvlingua.view.CacheView`. With ``sink_tokens = k > 0`` every condition but no-prefix keeps j's
  *own* first ``k`` positions (its sink; control and identity too): content counts only what Σ carries.
  A space with ``refresh > 0`` has the target recompute that share of the translated positions after its sink,
  chosen by its first suffix token's attention (read, never scored: :mod:`kvlingua.refresh`), as it would serve.

Each NLL is averaged per batch, then reported as mean ± std over the held-out batches, over the whole
suffix and over its first ``first_tokens`` tokens. The headline number is *content transferred* =
(NLL_control − NLL) / (NLL_control − NLL_base): 0 is no better than a wrong-content cache, 1 is as good as
the target's own cache. It is reported only where there is content to transfer: where base beats control by
more than ``content_min_se`` standard errors of their paired per-batch difference; elsewhere the ratio
divides noise by noise and the table says "n/a" with the gap.

Every condition and path of one evaluation is scored on the same held-out batches, so two conditions
compare *paired*: :func:`kvlingua.eval_result.paired_difference` gives the mean per-batch difference and its standard error, the
unit every verdict of the paper report uses. Which rows are held out does not depend on the training batch
size (:class:`EvalConfig` ``batch_size``; :func:`kvlingua.job.eval_batches`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kvlingua.align import read_along
from kvlingua.backend import PoolBackend
from kvlingua.cache import KVBlock
from kvlingua.eval_result import SPANS, TARGET_ONLY, EvalResult
from kvlingua.metric_names import NllKey
from kvlingua.paths import PathT, path_name
from kvlingua.space import LatentBlock, SharedSpace, identity_translate, space_device
from kvlingua.batch import Batch
from kvlingua.view import CacheView

@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation settings (the ``eval`` section of a run config)."""

    batches: int = 8
    """Held-out batches to evaluate (each of the training batch size; at least 2 sequences each)."""
    first_tokens: int = 16
    """Length of the early-suffix span, where the prefix matters most."""
    curve_batches: int = 2
    """Batches of the ``curve_split`` evaluated every ``train.eval_every`` steps for the training
    curves (and trial selection); the final table uses ``batches`` batches of the run's ``eval_split``."""
    batch_size: int | None = None
    """Held-out sequences per batch; None: the run's training ``batch_size``. Held-out rows are the first
    ``batches × batch_size`` of a fixed permutation of the split, so runs that share this number are scored
    on the same text whatever their training batch size: set it in every run of a comparison that varies
    ``batch_size`` (the paper configs always do)."""
    curve_split: str = "validation"
    """Split of the training curves, early stopping and trial selection (never ``test``)."""
    content_min_se: float = 3.0
    """Content transferred is reported only where control − base exceeds this many standard errors of
    their paired per-batch difference; elsewhere it is NaN ("n/a" with the gap in tables)."""

    def __post_init__(self) -> None:
        for name in ("batches", "first_tokens", "curve_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 2):
            raise ValueError(f"batch_size must be an integer >= 2 (the content control rolls the batch) or null, "
                             f"got {self.batch_size!r}")
        if self.curve_split not in ("train", "validation"):
            raise ValueError(f"curve_split must be train or validation (curves and selection never see the test "
                             f"split), got {self.curve_split!r}")
        if not self.content_min_se >= 0:
            raise ValueError(f"content_min_se must be >= 0, got {self.content_min_se}")


def batch_means(nll: Tensor, first_tokens: int) -> tuple[float, float]:
    """Per-token NLL ``[B, S-1]`` -> (mean over all, mean over the first ``first_tokens`` positions)."""
    return float(nll.mean()), float(nll[:, :first_tokens].mean())


def evaluate(
    backend: PoolBackend,
    batches: Sequence[Batch],
    paths: Sequence[PathT],
    spaces: Mapping[str, SharedSpace],
    *,
    first_tokens: int = 16,
    identity: bool = True,
    references: bool = True,
    trained: Sequence[PathT] | None = None,
    content_min_se: float = 3.0,
    sink_tokens: int | None = None,
) -> EvalResult:
    """Suffix NLL of every path under every condition on held-out ``batches``.

    Args:
        backend: the frozen pool.
        batches: held-out batches (each with at least 2 sequences, for the control).
        paths: (source, target) paths to evaluate.
        spaces: condition name -> SharedSpace (e.g. ``{"translator": s, "linear": l}``);
            each is run in eval mode under ``no_grad`` and its mode restored after. A source's
            block is encoded once per batch and decoded for every target.
        first_tokens: length of the early-suffix span.
        identity: also measure the identity map where source and target layouts match.
        references: measure base/control/no-prefix (needed for content transferred;
            only :func:`make_eval_fn` turns it off to reuse earlier references).
        trained: the paths the spaces were trained on (the others are marked zero-shot); None: all.
        content_min_se: see :class:`EvalConfig`.
        sink_tokens: the target's own sink positions every condition but no-prefix keeps (the spaces'
            ``sink_tokens``, which must agree; 0 without spaces). *control* is then the target's own cache of
            its first ``k`` tokens followed by another sequence's positions ``k .. P-1`` (right sink, wrong
            content), so content transferred counts only what Σ carries beyond the sink.

    Returns:
        :class:`EvalResult`.
    """
    if not batches:
        raise ValueError("evaluate needs at least one held-out batch")
    if not paths:
        raise ValueError("evaluate needs at least one path")
    if first_tokens < 1:
        raise ValueError(f"first_tokens must be >= 1, got {first_tokens}")
    reserved = [n for n in spaces if n in (*TARGET_ONLY, "identity")]
    if reserved:
        raise ValueError(f"space names {reserved} clash with built-in conditions {[*TARGET_ONLY, 'identity']}")
    paths = [tuple(p) for p in paths]
    sinks = {sp.cfg.sink_tokens for sp in spaces.values()}
    if sink_tokens is not None:
        sinks.add(sink_tokens)
    if len(sinks) > 1:
        raise ValueError(f"spaces evaluated together must keep the same sink positions; got sink_tokens {sorted(sinks)}")
    k = sinks.pop() if sinks else 0
    views = {name: CacheView.of(sp.cfg) for name, sp in spaces.items()}
    rotations: dict[str, object] = {}

    def rotation(model: str, view: CacheView):
        if not view.unrotate:
            return None
        if model not in rotations:
            rotations[model] = backend.rotation(model)
        return rotations[model]

    pool = backend.names()
    unknown = sorted({m for p in paths for m in p if m not in pool})
    if unknown:
        raise ValueError(f"paths name model(s) {unknown} that are not in the pool {pool}")
    for sp in spaces.values():
        sp.bind_tokens(backend, replace=False)  # a token readout reads each target's own embeddings
    per_batch: dict[str, dict[str, dict[str, list[float]]]] = {
        s: {path_name(p): {} for p in paths} for s in SPANS}

    def record(path: PathT, cond: str, nll: Tensor) -> None:
        for span, value in zip(SPANS, batch_means(nll, first_tokens)):
            per_batch[span][path_name(path)].setdefault(cond, []).append(value)

    modes = {name: sp.training for name, sp in spaces.items()}
    for sp in spaces.values():
        sp.eval()
    try:
        with torch.no_grad():
            for b in batches:
                if next(iter(b.ids.values())).shape[0] < 2:
                    raise ValueError(f"batch {b.key or '(unnamed)'} has 1 sequence; the control condition "
                                     "needs at least 2 (it pairs each suffix with another sequence's prefix)")
                CacheView(k).check_prefix(b.prefix_len)
                own: dict[str, KVBlock] = {}
                refs: dict[str, dict[str, Tensor]] = {}
                latents: dict[tuple[str, str], LatentBlock] = {}  # (space, source) -> IN_source(block), once
                for src, tgt in paths:
                    if src not in own:
                        own[src] = backend.prefix_block(src, b.prefix(src))  # [B, P, L_i, D_i]
                    if references and tgt not in refs:
                        suffix = b.suffix(tgt)
                        if tgt not in own:
                            own[tgt] = backend.prefix_block(tgt, b.prefix(tgt))
                        wrong = backend.prefix_block(tgt, b.control_prefix(tgt, k))  # own sink, another's content
                        refs[tgt] = {"base": backend.suffix_nll(tgt, own[tgt], suffix),
                                     "control": backend.suffix_nll(tgt, wrong, suffix),
                                     "no-prefix": backend.suffix_nll(tgt, None, suffix)}
                    for cond, nll in refs.get(tgt, {}).items():
                        record((src, tgt), cond, nll)
                    src_sum, tgt_sum = backend.summary(src), backend.summary(tgt)
                    if tgt not in own and (k or identity and src_sum.layout == tgt_sum.layout):
                        own[tgt] = backend.prefix_block(tgt, b.prefix(tgt))
                    sink = KVBlock(own[tgt].keys[:, :k], own[tgt].values[:, :k], own[tgt].n_kv_heads) if k else None
                    index = b.align(src, tgt, k)  # [B, P-k] source position each target position reads; None: same tokens
                    if identity and src_sum.layout == tgt_sum.layout and index is None:
                        plain = CacheView(k)  # the source's cache as is, after the target's own sink
                        block = plain.to_cache(plain.to_space(identity_translate(own[src], src_sum, tgt_sum), None),
                                               None, sink)
                        record((src, tgt), "identity", backend.suffix_nll(tgt, block, b.suffix(tgt)))
                    for name, sp in spaces.items():
                        view = views[name]
                        if (name, src) not in latents:
                            body = view.to_space(own[src], rotation(src, view))  # [B, P-k, L_i, D_i]
                            latents[(name, src)] = sp.encode(body.to(space_device(sp)), src)  # [B, P-k, Q]
                        z = read_along(latents[(name, src)], index)  # [B, P-k, Q] at the target's positions
                        out = sp.decode(z, tgt, b.prefix(tgt)[:, k:]).map(lambda t: t.float().cpu())  # [B, P-k, L_j, D_j]
                        out = view.to_cache(out, rotation(tgt, view), sink)  # [B, P, L_j, D_j]
                        if view.refresh:  # the target re-reads the positions its first suffix token leans on most
                            out = backend.refresh(tgt, out, b.prefix(tgt), b.suffix(tgt)[:, :1], view.refresh, k)
                        record((src, tgt), name, backend.suffix_nll(tgt, out, b.suffix(tgt)))
    finally:
        for name, sp in spaces.items():
            sp.train(modes[name])
    present = {c for row in per_batch["all"].values() for c in row}
    order = [*(TARGET_ONLY if references else ()), "identity", *spaces]
    return EvalResult(paths, [c for c in order if c in present], first_tokens, per_batch,
                      None if trained is None else [tuple(p) for p in trained], content_min_se)


def make_eval_fn(
    backend: PoolBackend,
    batches: Sequence[Batch],
    paths: Sequence[PathT],
    space: SharedSpace,
    *,
    first_tokens: int = 16,
) -> Callable[[int], dict[str, float]]:
    """An ``eval_fn`` for :func:`kvlingua.train.fit` that tracks ``space`` on held-out batches.

    Returns metrics ``eval/nll/i->j`` (the space), ``eval/nll_first/i->j``,
    ``eval/content/i->j`` and the fixed references ``eval/nll/i->j/base|control|no-prefix``
    (measured once, on the first call: the pool is frozen), which
    :func:`kvlingua.report.plot_history` draws as dashed lines.
    """
    cache: dict[str, EvalResult] = {}

    def eval_fn(step: int) -> dict[str, float]:
        if "refs" not in cache:
            cache["refs"] = evaluate(backend, batches, paths, {}, first_tokens=first_tokens, identity=False,
                                     sink_tokens=space.cfg.sink_tokens)
        refs = cache["refs"]
        res = evaluate(backend, batches, paths, {"space": space}, first_tokens=first_tokens,
                       identity=False, references=False)
        for span in SPANS:
            for name, row in res.per_batch[span].items():
                row.update(refs.per_batch[span][name])
        res.conditions = [*TARGET_ONLY, "space"]
        out = {}
        for path in res.paths:
            name = path_name(path)
            s = res.summary_for(path, "space")
            out[NllKey(*path).curve()] = s.nll_mean
            out[f"eval/nll_first/{name}"] = s.first_mean
            out[f"eval/content/{name}"] = s.content
            for ref in TARGET_ONLY:
                out[NllKey(*path, ref).curve()] = res.summary_for(path, ref).nll_mean
        return out

    return eval_fn
