"""Fitting the token prior (:mod:`kvlingua.prior`) in the closed-form calibration pass: per-token statistics of each
target's own cache and of what Σ decodes there, the replace-or-correct choice per token and layer, and the gate that
keeps a target's prior only where it lowers its calibration suffix NLL. Apart from :mod:`kvlingua.prior` because it
reads the space, which holds the prior."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kvlingua.align import read_along
from kvlingua.cache import KVBlock
from kvlingua.outinit import rank_mean
from kvlingua.space import space_device
from kvlingua.view import CacheView

if TYPE_CHECKING:
    from kvlingua.backend import PoolBackend
    from kvlingua.runtime import Runtime
    from kvlingua.space import SharedSpace

PRIOR_SHRINK = 10.0
"""Pseudo-count a token's mean residual is shrunk by (``n / (n + c)``): 10 beat 2 on the real pair's validation rows."""


def _token_stats(slot_of: Tensor, ids: Tensor, own: KVBlock, decoded: KVBlock, n_slots: int) -> list[Tensor]:
    """Per slot sums over the positions whose token has one: ``[count [N], then per kind: Σown [N, L, D],
    Σ|own|² [N, L], Σres [N, L, D], Σ|res|² [N, L]]`` (fp64), ``res = own − decoded``."""
    slots = slot_of[ids.reshape(-1)]  # [B*S] (-1: no slot)
    keep = slots >= 0
    slots = slots[keep]
    stats = [torch.zeros(n_slots, dtype=torch.float64).index_add_(0, slots, torch.ones_like(slots, dtype=torch.float64))]
    for kind in ("keys", "values"):
        x = getattr(own, kind).reshape(-1, own.num_layers, own.width)[keep].double()  # [n, L, D]
        r = x - getattr(decoded, kind).reshape(-1, own.num_layers, own.width)[keep].double()  # [n, L, D]
        for t in (x, r):
            stats.append(torch.zeros(n_slots, *t.shape[1:], dtype=torch.float64).index_add_(0, slots, t))
            stats.append(torch.zeros(n_slots, t.shape[1], dtype=torch.float64).index_add_(0, slots, t.pow(2).sum(-1)))
    return stats


def _fit_slots(stats: list[Tensor], shrink: float) -> dict[str, Tensor]:
    """Scales ``[N, L]`` and shifts ``[N, L, D]`` per kind from summed :func:`_token_stats` (:mod:`kvlingua.prior`)."""
    count = stats[0].clamp_min(1)[:, None]  # [N, 1]
    usable = (stats[0] >= 2)[:, None]  # [N, 1]: a mean of one entry says nothing about its spread
    w = count / (count + shrink)  # [N, 1]
    fitted = {}
    for i, kind in enumerate(("keys", "values")):
        s_x, q_x, s_r, q_r = stats[1 + 4 * i: 5 + 4 * i]
        mean_x, mean_r = s_x / count[..., None], s_r / count[..., None]  # [N, L, D]
        var_x = (q_x / count - mean_x.pow(2).sum(-1)) * (1 + 1 / count)  # [N, L] error of replacing, out of sample
        err_r = q_r / count - mean_r.pow(2).sum(-1) + (1 - w).pow(2) * mean_r.pow(2).sum(-1)  # [N, L] of correcting
        replace = (var_x < err_r) & usable  # [N, L]
        correct = ~replace & usable
        fitted[f"scale_{kind}"] = torch.where(replace, 0.0, 1.0).float()
        fitted[f"shift_{kind}"] = torch.where(replace[..., None], mean_x,
                                              torch.where(correct[..., None], w[..., None] * mean_r, 0.0)).float()
    return fitted


@torch.no_grad()
def fit_token_prior(space: SharedSpace, backend: PoolBackend, batches: Sequence, trainable: Sequence[str],
                    runtime: Runtime | None = None, view: CacheView | None = None, gate: bool = True) -> dict[str, float]:
    """Fit the token prior of every ``trainable`` member (as a target) on the calibration ``batches`` and keep it
    where it lowers that member's calibration suffix NLL (:mod:`kvlingua.prior`; ``gate=False`` keeps every fitted prior,
    for tests and studies). Call after the short paths are set.

    Returns ``{"init/prior/<target>/kept": 0|1, "init/prior/<target>/nll_delta": mean NLL with − without,
    "init/prior/<target>/replaced": share of (token, layer) entries replaced}`` for the record.
    """
    view, targets, rotations, device = fit_context(space, backend, trainable, "prior", view)
    if not targets:
        return {}
    names = list(space.names)
    k = view.sink_tokens
    n = space.cfg.token_prior
    # 1. each target's N most frequent calibration tokens (after its sink), counted over every rank alike
    counts = {}
    for j in targets:
        vocab = space.members[j].vocab_size
        c = torch.zeros(vocab, dtype=torch.float64)
        for batch in batches:
            body = batch.prefix(j)[:, k:].reshape(-1)  # [B*(P-k)]
            c.index_add_(0, body, torch.ones_like(body, dtype=torch.float64))
        counts[j] = rank_mean([c], runtime)[0]  # [V]
    chosen = {}
    for j, c in counts.items():
        top = torch.argsort(-c, stable=True)[:n]  # ties: the lower id
        top = top[c[top] > 0].sort().values  # [<= N] increasing
        slot_of = torch.full((c.numel(),), -1, dtype=torch.long)
        slot_of[top] = torch.arange(top.numel())
        chosen[j] = (top, slot_of)
    # 2. per-token statistics of the target's own cache and of what Σ decodes from every source
    sums: dict[str, list[Tensor]] = {}
    for batch in batches:
        view.check_prefix(batch.prefix_len)
        blocks, latents = read_batch(space, backend, batch, view, rotations, device)
        for j in targets:
            own = view.to_space(blocks[j], rotations.get(j))  # [B, P-k, L_j, D_j]
            body = batch.prefix(j)[:, k:]  # [B, P-k]
            for i in names:
                # what the prior will correct: Σ's decode with the target's tokens (a readout reads them), no prior
                out = space.decode(read_along(latents[i], batch.align(i, j, k)), j, body, prior=False).map(
                    lambda t: t.float().cpu())  # [B, P-k, L, D]
                got = _token_stats(chosen[j][1], body, own, out, chosen[j][0].numel())
                sums[j] = got if j not in sums else [a + g for a, g in zip(sums[j], got)]
    record: dict[str, float] = {}
    for j in targets:  # every prior set before the gate: one target's prior changes only what is decoded into it
        top = chosen[j][0]
        fitted = _fit_slots(rank_mean(sums[j], runtime), PRIOR_SHRINK)
        prior = space.adapters(j)["prior"]
        pad = n - top.numel()  # unused slots first: ids stay increasing
        prior.ids.copy_(torch.cat([torch.full((pad,), -1, dtype=torch.long), top]))
        for name, t in fitted.items():
            fill = torch.ones if name.startswith("scale") else torch.zeros
            getattr(prior, name).copy_(torch.cat([fill(pad, *t.shape[1:]), t]))
        record[f"init/prior/{j}/replaced"] = float(torch.cat([1 - fitted["scale_keys"], 1 - fitted["scale_values"]]).mean())
    # 3. the gate: each target's calibration suffix NLL with its prior against without, over every source
    deltas = _nll_deltas(space, backend, batches, targets, view, rotations, device)
    for j in targets:
        prior = space.adapters(j)["prior"]
        delta = rank_mean([deltas[j]], runtime)[0]
        kept = bool(delta < 0) or not gate
        if not kept:
            prior.ids.fill_(-1)
        record[f"init/prior/{j}/nll_delta"] = float(delta)
        record[f"init/prior/{j}/kept"] = float(kept)
    return record


def fit_context(space: SharedSpace, backend: PoolBackend, trainable: Sequence[str], part: str,
                view: CacheView | None) -> tuple[CacheView, list[str], dict, torch.device]:
    """What a calibration-pass fit of a target-side ``part`` (``"prior"``, ``"readout"``) needs: the view (default
    the space's), the members of ``trainable`` whose adapters hold that part, in pool order, every member's rotation
    (where keys travel un-rotated and there is a target) and the space's device."""
    view = view or CacheView.of(space.cfg)
    targets = [m for m in space.names if m in set(trainable) and part in space.adapters(m)]
    rotations = {m: backend.rotation(m) for m in space.names} if view.unrotate and targets else {}
    return view, targets, rotations, space_device(space)


def read_batch(space: SharedSpace, backend: PoolBackend, batch, view: CacheView, rotations: dict,
          device: torch.device) -> tuple[dict[str, KVBlock], dict]:
    """Every member's own block of ``batch``'s prefix ``[B, P, L_m, D_m]`` and its encoding in Σ ``[B, P-k, Q]``."""
    blocks = {m: backend.prefix_block(m, batch.prefix(m)) for m in space.names}
    latents = {m: space.encode(view.to_space(blocks[m], rotations.get(m)).to(device), m) for m in space.names}
    return blocks, latents


def _nll_deltas(space: SharedSpace, backend: PoolBackend, batches: Sequence, targets: Sequence[str], view: CacheView,
                rotations: dict, device: torch.device) -> dict[str, Tensor]:
    """Per target, the mean suffix NLL on ``batches`` with its prior minus without, over every source (a scalar);
    one pass: each batch's blocks and latents are computed once for every target."""
    totals = {j: torch.zeros((), dtype=torch.float64) for j in targets}
    k = view.sink_tokens
    for batch in batches:
        blocks, latents = read_batch(space, backend, batch, view, rotations, device)
        for j in targets:
            own = blocks[j]
            sink = KVBlock(own.keys[:, :k], own.values[:, :k], own.n_kv_heads) if k else None
            body = batch.prefix(j)[:, k:]  # [B, P-k]
            for i in space.names:
                z = read_along(latents[i], batch.align(i, j, k))  # [B, P-k, Q] at the target's positions
                nll = []
                plain = space.decode(z, j, body, prior=False)  # [B, P-k, L, D] (a token readout reads in both)
                for out in (plain, space.adapters(j)["prior"](plain, body)):  # without the prior, then with it
                    cache = view.to_cache(out.map(lambda t: t.float().cpu()), rotations.get(j), sink)  # [B, P, L, D]
                    nll.append(backend.suffix_nll(j, cache, batch.suffix(j)).double().mean())
                totals[j] += nll[1] - nll[0]
    rows = max(len(batches) * len(space.names), 1)
    return {j: t / rows for j, t in totals.items()}
