"""Fitting the token readout (:mod:`kvlingua.readout`) jointly with OUT's short path, in the closed-form calibration
pass: one ridge regression per target and kind, from what OUT reads (every source's Σ at the target's positions,
pooled) and the target's own tokens (its input embeddings of the token at each position and of the one before it)
to the target's own cache (after its sink, keys un-rotated). Apart from
:mod:`kvlingua.readout` because it reads the space, which holds the readout."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvlingua.align import read_along
from kvlingua.closedform import KINDS, _ridge_solve, short_maps
from kvlingua.outinit import rank_mean
from kvlingua.prior_fit import fit_context, read_batch
from kvlingua.readout import READ_TOKENS
from kvlingua.view import CacheView

if TYPE_CHECKING:
    from kvlingua.backend import PoolBackend
    from kvlingua.runtime import Runtime
    from kvlingua.space import SharedSpace

def _features(z: Tensor, emb: Tensor) -> Tensor:
    """Rows of one (source, target) pair: ``z`` ``[B, P-k, Q]`` (Σ at the target's decoded positions) and ``emb``
    ``[B, P-k+1, H]`` (the target's embeddings from the position before the first decoded one) ->
    ``[B·(P-k-1), Q + 2H]``: ``[z_t, e_t, e_{t-1}]`` at every decoded position but the first (whose previous token
    the readout reads as zero, so it is left out of the fit)."""
    x = torch.cat([z[:, 1:], emb[:, 2:], emb[:, 1:-1]], dim=-1)  # [B, P-k-1, Q+2H]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def fit_token_readout(space: SharedSpace, backend: PoolBackend, batches: Sequence, trainable: Sequence[str],
                      runtime: Runtime | None = None, view: CacheView | None = None) -> dict[str, float]:
    """Refit OUT's short path of every ``trainable`` member with a token readout, jointly with the readout, on the
    calibration ``batches`` (module docstring). Call after :func:`~kvlingua.closedform.closed_form_init` (it reads
    the IN adapters that pass set) and before the token prior (which corrects what this decodes).

    Returns ``{"init/readout/<target>/<kind>/error_ratio": the joint fit's calibration squared error over Σ's
    alone, ...}`` for the record.
    """
    view, targets, rotations, device = fit_context(space, backend, trainable, "readout", view)
    if not targets:
        return {}
    names = list(space.names)
    k = view.sink_tokens
    q = space.cfg.q_dim
    sums: dict[tuple[str, str], list[Tensor]] = {}  # (target, kind) -> [n, Σx, Σy, Σy², Σxxᵀ, Σyxᵀ] about shift
    shifts: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for batch in batches:
        view.check_prefix(batch.prefix_len)
        if batch.prefix_len - k < 2:
            continue  # no decoded position has a decoded one before it
        blocks, latents = read_batch(space, backend, batch, view, rotations, device)
        for j in targets:
            own = view.to_space(blocks[j], rotations.get(j))  # [B, P-k, L_j, D_j]
            emb = backend.token_embeddings(j, batch.prefix(j))[:, max(k - 1, 0):]  # [B, P-k+1, H] (k = 0: padded)
            if k == 0:
                emb = torch.cat([torch.zeros_like(emb[:, :1]), emb], dim=1)
            for i in names:
                z = read_along(latents[i], batch.align(i, j, k))  # [B, P-k, Q] at the target's positions
                for kind in KINDS:
                    x = _features(getattr(z, kind).float().cpu(), emb)  # [N, Q+2H]
                    y = getattr(own, kind)[:, 1:].reshape(x.shape[0], -1).float()  # [N, L_j·D_j]
                    key = (j, kind)
                    if key not in shifts:  # moments about the first rows' mean: fp32 products lose nothing
                        shifts[key] = (x.mean(0), y.mean(0))
                    x, y = x - shifts[key][0], y - shifts[key][1]
                    got = [torch.tensor(float(x.shape[0]), dtype=torch.float64), x.sum(0).double(), y.sum(0).double(),
                           y.pow(2).sum(0).double(), (x.T @ x).double(), (y.T @ x).double()]
                    sums[key] = got if key not in sums else [a + g for a, g in zip(sums[key], got)]
    record: dict[str, float] = {}
    for j in targets:
        if (j, "keys") not in sums:
            raise ValueError(f"token readout of {j!r}: the calibration batches have no prefix of 2 positions after "
                             f"the sink to fit it on")
        readout = space.adapters(j)["readout"]
        for kind_i, kind in enumerate(KINDS):
            n, sx, sy, syy, sxx, syx = rank_mean(sums[(j, kind)], runtime)
            mx, my = sx / n, sy / n  # [F], [d] about the shift
            cxx = sxx / n - torch.outer(mx, mx)  # [F, F] F = Q + 2H
            cyx = syx / n - torch.outer(my, mx)  # [d, F]
            x_mean, y_mean = mx + shifts[(j, kind)][0].double(), my + shifts[(j, kind)][1].double()  # unshifted
            h = (cxx.shape[0] - q) // READ_TOKENS
            e_mean = x_mean[q:q + h]  # [H] the embeddings' calibration mean
            # the tokens at Σ's variance per channel, so one ridge penalises both alike (undone on the weights)
            scale = (float(torch.diagonal(cxx[:q, :q]).mean())
                     / float(torch.diagonal(cxx)[q:].mean().clamp_min(1e-12))) ** 0.5
            s_vec = torch.cat([torch.ones(q, dtype=cxx.dtype), torch.full((cxx.shape[0] - q,), scale, dtype=cxx.dtype)])
            w = _ridge_solve(cxx * torch.outer(s_vec, s_vec), cyx * s_vec, space.cfg.ridge) * s_vec  # [d, F]
            centred = torch.cat([x_mean[:q], x_mean[q:q + h] - e_mean, x_mean[q + h:] - e_mean])  # [F]
            lin = short_maps(space.adapters(j)["out"])[kind_i]
            lin.weight.copy_(w[:, :q].to(lin.weight.dtype))
            lin.bias.copy_((y_mean - w @ centred).to(lin.bias.dtype))
            getattr(readout, kind).weight.copy_(w[:, q:].to(readout.keys.weight.dtype))
            if kind_i == 0:
                readout.center.copy_(e_mean.to(readout.center.dtype))
            alone = _ridge_solve(cxx[:q, :q], cyx[:, :q], space.cfg.ridge)  # [d, Q]: Σ's fit, for the record
            total = float((syy / n - my.pow(2)).sum())  # tr Cov(y)
            record[f"init/readout/{j}/{kind}/error_ratio"] = (
                _residual(total, w, cyx, cxx) / max(_residual(total, alone, cyx[:, :q], cxx[:q, :q]), 1e-12))
    return record


def _residual(total: float, weights: Tensor, cyx: Tensor, cxx: Tensor) -> float:
    """Squared error per row of the linear fit ``weights`` ``[d, F]``: ``tr Cov(y) − 2 tr(W Cxy) + tr(W Cxx Wᵀ)``."""
    return total - 2 * float((weights * cyx).sum()) + float(((weights @ cxx) * weights).sum())
