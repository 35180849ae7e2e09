"""``init: match``: start every adapter's output on the right statistics, measured on one batch.

A real model's cache is far from zero-mean unit-scale, so a randomly initialised OUT_j hands its target a cache
that costs more than no prefix at all (SmolLM2: 14.9 nats of suffix NLL against 4.5 with no prefix, measured for
``configs/real.yaml``). :func:`match_init` rescales the last affine maps of the adapters
(:meth:`~kvlingua.translator.LayerwiseTranslator.rescale_output`) so that Σ starts standardized and each OUT_j
starts at its target's own per-channel moments. :func:`kvlingua.train.fit` calls it on the first batch when a space
asks for it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from kvlingua.backend import PoolBackend
from kvlingua.runtime import Runtime
from kvlingua.space import LatentBlock, SharedSpace, space_device
from kvlingua.view import CacheView

if TYPE_CHECKING:
    from kvlingua.batch import Batch


def rank_mean(moments: list[Tensor], runtime: Runtime | None) -> list[Tensor]:
    """The mean of each tensor over ranks (``runtime.grad_sync`` on gradient holders); as is on one rank."""
    if runtime is None or runtime.grad_sync is None:
        return moments
    holders = [nn.Parameter(torch.zeros_like(m)) for m in moments]
    for h, m in zip(holders, moments):
        h.grad = m.clone()
    runtime.grad_sync(holders)  # in place
    return [h.grad for h in holders]


def _affine_to(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor] | None, runtime: Runtime | None,
               eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(scale_k, shift_k, scale_v, shift_v)`` per flat channel that move the first and second moments of the
    blocks ``got = (K, V)`` (each ``[B, S, L, D]``) onto those of ``want`` (mean 0, std 1 when None)."""
    moments = []
    for t in (*got, *(want or ())):
        flat = t.float().reshape(-1, t.shape[2] * t.shape[3])  # [rows, L*D]
        moments += [flat.mean(0), flat.pow(2).mean(0)]
    moments = rank_mean(moments, runtime)
    means = moments[::2]
    stds = [(sq - m.pow(2)).clamp_min(0).sqrt() for m, sq in zip(moments[::2], moments[1::2])]
    if want is None:
        means += [torch.zeros_like(means[0])] * 2
        stds += [torch.ones_like(stds[0])] * 2
    scale_k, scale_v = stds[2] / (stds[0] + eps), stds[3] / (stds[1] + eps)
    return scale_k, means[2] - scale_k * means[0], scale_v, means[3] - scale_v * means[1]


@torch.no_grad()
def match_init(space: SharedSpace, backend: PoolBackend, batch: Batch, trainable: Iterable[str],
               targets: Iterable[str], runtime: Runtime | None = None, eps: float = 1e-6,
               view: CacheView | None = None) -> dict[str, float]:
    """``init: match``: rescale adapters on ``batch`` so translated caches start with the right statistics.

    1. IN_i of every trainable model i: Σ of i's prefixes gets mean 0 and standard deviation 1 per channel
       (keys and values apart), so every source writes Σ on one scale (frozen members' IN stay as they are);
    2. OUT_j of every target j: every member's Σ of the same prefixes goes through OUT_j (what OUT_j reads
       over training) and, per flat output channel ``c`` of ``[L_j * D_j]``, with ``m_c, s_c`` that output's
       mean and standard deviation and ``mu_c, sigma_c`` those of j's own cache, OUT_j is made to output
       ``sigma_c / s_c * (out_c - m_c) + mu_c``.
    Each change is exact (:meth:`rescale_output`: an adapter's last maps are affine). On several ranks the
    moments are averaged over ranks first, so every rank makes the same change.

    Returns ``{"init/out_shift/<j>": ...}``: the mean absolute key shift given to each target, for the record.
    """
    device, dtype = space_device(space), space._dtype()
    view = view or CacheView.of(space.cfg)  # what Σ reads and OUT writes: after the sink, keys as the view keeps them
    own = {m: view.to_space(backend.prefix_block(m, batch.prefix(m)), backend.rotation(m) if view.unrotate else None)
           .to(device) for m in space.names}  # [B, P-k, L, D]

    def rescale(adapter: nn.Module, affine: tuple[Tensor, ...]) -> None:
        adapter.rescale_output(*(a.to(dtype) for a in affine))

    for i in trainable:
        z = space.encode(own[i], i)  # [B, P, Q]
        rescale(space.adapters(i)["in"], _affine_to((z.keys[:, :, None], z.values[:, :, None]), None, runtime, eps))
    latents = [space.encode(own[m], m) for m in space.names]  # each [B, P, Q]
    z = LatentBlock(torch.cat([l.keys for l in latents]), torch.cat([l.values for l in latents]))  # [M*B, P, Q]
    record = {}
    for j in targets:
        out = space.decode(z, j)  # [M*B, P, L_j, D_j]
        mine = own[j].keys.repeat(len(latents), 1, 1, 1), own[j].values.repeat(len(latents), 1, 1, 1)
        affine = _affine_to((out.keys, out.values), mine, runtime, eps)
        rescale(space.adapters(j)["out"], affine)
        record[f"init/out_shift/{j}"] = float(affine[1].abs().mean())
    return record
