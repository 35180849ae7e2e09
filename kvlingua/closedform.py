"""``init: closed_form``: every adapter's short path starts at the pool's linear optimum, no gradients.

One calibration pass over a few training batches reads every member's cache the way Σ sees it
(:class:`~kvlingua.view.CacheView`: after the sink, keys un-rotated), flattened per position to
``x_m`` of width ``d_m = L_m·D_m``, keys and values apart. Then, from second moments only:

1. **Σ**: each member's centred cache is scaled to unit total variance (so no member dominates by
   its scale), the members are stacked side by side at aligned positions (members that tokenize
   differently are read at the first member's positions along :func:`kvlingua.align.token_map`), and Σ's ``Q`` directions
   are their joint principal directions ``W`` (``z = g·Wᵀ x̃``, ``g`` so that Σ has unit variance per
   channel on average). With one member this is its own PCA.
2. **IN_i** by ridge regression from ``x_i`` to ``z``: ``A_i = Cov(z, x_i) (C_ii + λ_i I)⁻¹``, bias
   ``−A_i μ_i`` (``λ_i = ridge·tr(C_ii)/d_i``).
3. **OUT_j** by ridge regression from what OUT_j will read, every source's ``ẑ_i = A_i (x_i − μ_i)``
   pooled over sources, to ``x_j``: ``B_j = (Σ_i C_ji A_iᵀ)(Σ_i A_i C_ii A_iᵀ + λ I)⁻¹``, bias ``μ_j``.

With ``out_weights: attention`` a second pass over the same batches refits each OUT_j, one target layer at a
time, by ridge regression *weighted by what the target reads*: a position's weight is the attention mass the
target's suffix puts on it in that layer (:meth:`~kvlingua.backend.PoolBackend.attention_received`, scaled to mean
1 over a row's positions) mixed with a uniform weight (:data:`ATTENTION_MIX`). Past a sliding window, a layer no
longer sees the sink and parks its attention on a few secondary sinks inside the translated positions; an
unweighted fit spends its accuracy on the many positions that layer barely reads (``kvlingua real-model --sinks``).

The short path of a translator (dense, :attr:`~kvlingua.space_config.SpaceConfig.short_layout`) or the
linear adapter's maps take these weights; the stack's last projection already starts at zero, so each
path starts as this linear translator and training adds what the stack learns.

A space that extends a trained pool keeps its trained members' IN as they are: Σ is then what they
write (``z`` = the mean of the frozen members' encodings), and only the new members' IN and OUT are fitted.
On several ranks every moment is averaged over ranks first, so every rank makes the same change.
Measured on SmolLM2-135M and Gemma-3-270M: docs/results/real-pair.md (the closed-form start against training).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kvlingua.align import gather_positions, read_along
from kvlingua.backend import PoolBackend
from kvlingua.outinit import rank_mean
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace, space_device
from kvlingua.translator import LayerwiseTranslator, LinearAdapter
from kvlingua.view import CacheView

KINDS = ("keys", "values")
ATTENTION_MIX = 0.5
"""``out_weights: attention``: the share of a position's weight that is the attention mass it receives (the rest is
uniform, so every position still counts)."""
FLUSH_BATCHES = 8
"""Calibration batches whose fp32 second moments are summed before they join the fp64 total (each batch is
centred on the first batch's mean, so fp32 loses nothing that matters over a few batches)."""


def short_maps(adapter: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two dense linear maps (K, V) of an adapter that :func:`closed_form_init` sets."""
    maps = adapter.short_maps() if isinstance(adapter, (LinearAdapter, LayerwiseTranslator)) else ()
    if len(maps) == 2 and all(isinstance(m, nn.Linear) for m in maps):
        return maps
    raise ValueError("init: closed_form needs the linear adapter or a translator with a dense short path")


def _flat(t: Tensor) -> Tensor:
    B, S, L, D = t.shape
    return t.reshape(B * S, L * D).double()  # [B*S, L*D] one row per position


@torch.no_grad()
def _moments(space: SharedSpace, backend: PoolBackend, batches: Sequence, view: CacheView,
             frozen: Sequence[str], runtime: Runtime | None) -> dict[str, dict[str, Tensor]]:
    """Per kind: the joint mean and second moment of ``[x_1 .. x_N, z_frozen]`` over every calibration position,
    about ``shift`` (the first batch's mean)."""
    names = list(space.names)
    rotations = {m: backend.rotation(m) for m in names} if view.unrotate else {}
    device = space_device(space)
    sums: dict[str, Tensor] = {}
    grams: dict[str, Tensor] = {}
    recent: dict[str, Tensor] = {}  # fp32 products of the last few batches, added to ``grams`` in fp64 in one go
    shifts: dict[str, Tensor] = {}
    rows = 0
    for n, batch in enumerate(batches, 1):
        view.check_prefix(batch.prefix_len)
        blocks = {m: view.to_space(backend.prefix_block(m, batch.prefix(m)), rotations.get(m)) for m in names}
        # members that tokenize differently are read at the first member's positions ([B, P-k]; None: same tokens)
        at_first = {m: batch.align(m, names[0], view.sink_tokens) for m in names}
        latents = [read_along(space.encode(blocks[m].to(device), m), at_first[m]) for m in frozen]  # each [B, P-k, Q]
        blocks = {m: b if at_first[m] is None else b.map(lambda t, i=at_first[m]: gather_positions(t, i))
                  for m, b in blocks.items()}  # each [B, P-k, L_m, D_m]
        for kind in KINDS:
            cols = [_flat(getattr(blocks[m], kind)) for m in names]  # each [N, d_m]
            if latents:  # Σ as the frozen members write it: their mean encoding
                z = torch.stack([getattr(l, kind) for l in latents]).mean(0)  # [B, P-k, Q]
                cols.append(z.reshape(-1, z.shape[-1]).double().cpu())  # [N, Q]
            x = torch.cat(cols, dim=1)  # [N, sum d_m (+ Q)]
            if kind not in shifts:  # moments about the first batch's mean: fp32 products lose nothing to offsets
                shifts[kind] = rank_mean([x.mean(0)], runtime)[0]  # the same on every rank
            x = (x - shifts[kind]).float()
            sums[kind] = sums.get(kind, 0) + x.sum(0).double()
            if kind in recent:
                recent[kind].addmm_(x.T, x)  # [d, d] in place: no new matrix per batch
            else:
                recent[kind] = x.T @ x
            if n % FLUSH_BATCHES == 0:
                grams[kind] = grams.get(kind, 0) + recent.pop(kind).double()
        rows += x.shape[0]
    for kind in list(recent):
        grams[kind] = grams.get(kind, 0) + recent.pop(kind).double()
    return {kind: {"shift": shifts[kind], "mean": sums[kind] / rows, "gram": grams[kind] / rows} for kind in KINDS}


def _top_directions(cov: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """The ``q`` leading eigenvectors ``[d, q]`` and eigenvalues ``[q]`` of a symmetric PSD ``cov`` ``[d, d]``."""
    d = cov.shape[0]
    if q >= d // 2:
        vals, vecs = torch.linalg.eigh(cov)  # ascending
        vals, vecs = vals.flip(0)[:q], vecs.flip(1)[:, :q]
    else:  # a randomized range finder in fp32 (the products dominate): a few products instead of a full eigh
        c = cov.float()
        gen = torch.Generator().manual_seed(0)
        basis = torch.linalg.qr(c @ torch.randn(d, q + 32, generator=gen)).Q  # [d, q+32]
        for _ in range(4):
            basis = torch.linalg.qr(c @ basis).Q
        small, rot = torch.linalg.eigh((basis.T @ c @ basis).double())  # [q+32]
        vals, vecs = small.flip(0)[:q], (basis.double() @ rot.flip(1))[:, :q]
    if vecs.shape[1] < q:  # Σ wider than the caches: the extra channels start silent
        vecs = torch.cat([vecs, vecs.new_zeros(d, q - vecs.shape[1])], dim=1)
        vals = torch.cat([vals, vals.new_zeros(q - vals.shape[0])])
    return vecs, vals.clamp_min(0)


def _ridge_solve(cov: Tensor, cross: Tensor, ridge: float) -> Tensor:
    """``cross @ (cov + λ I)⁻¹`` with ``λ = ridge · tr(cov)/d``: ``[out, d]`` weights of a ridge regression."""
    d = cov.shape[0]
    lam = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    return torch.linalg.solve(cov + lam * torch.eye(d, dtype=cov.dtype), cross.T).T


@torch.no_grad()
def closed_form_init(space: SharedSpace, backend: PoolBackend, batches: Sequence, trainable: Sequence[str],
                     runtime: Runtime | None = None, view: CacheView | None = None) -> dict[str, float]:
    """Set the short paths of ``trainable`` members' IN and OUT to the pool's linear optimum (module docstring).

    Args:
        space: a fresh space (its trainable members' adapters are overwritten; the others are read).
        backend: the frozen pool.
        batches: calibration batches (the first ``space.cfg.init_batches`` of training).
        trainable: members whose adapters are fitted; the rest keep theirs and define Σ.
        runtime: averages the moments over ranks.
        view: what Σ carries of a cache (default the space's).

    Returns:
        ``{"init/energy/<kind>": share of the joint standardized variance Σ holds, ...}`` for the record.
    """
    view = view or CacheView.of(space.cfg)
    names = list(space.names)
    trainable = [m for m in names if m in set(trainable)]
    frozen = [m for m in names if m not in trainable]
    widths = [space.members[m].num_layers * space.members[m].width for m in names]
    offsets = [sum(widths[:i]) for i in range(len(names) + 1)]
    blk = {m: slice(offsets[i], offsets[i + 1]) for i, m in enumerate(names)}
    q = space.cfg.q
    moments = _moments(space, backend, batches, view, frozen, runtime)
    dtype = next(space.parameters()).dtype
    record: dict[str, float] = {}
    for kind_i, kind in enumerate(KINDS):
        shifted, gram = rank_mean([moments[kind]["mean"], moments[kind]["gram"]], runtime)
        cov = gram - torch.outer(shifted, shifted)  # [d, d] joint covariance
        mean = shifted + moments[kind]["shift"]  # [d]
        if frozen:  # Σ is what the trained members write: z = their mean encoding, the last Q columns
            zs = slice(offsets[-1], offsets[-1] + q)
            cov_zx = cov[zs]  # [Q, d] Cov(z, x)
        else:
            scale = torch.cat([torch.full((w,), float(torch.diagonal(cov[blk[m], blk[m]]).sum().clamp_min(1e-12)).__pow__(0.5),
                                          dtype=cov.dtype) for m, w in zip(names, widths)])  # [d] per-member total std
            std_cov = cov / torch.outer(scale, scale)  # [d, d] each member at unit total variance
            vecs, vals = _top_directions(std_cov, q)  # [d, Q], [Q]
            g = (q / vals.sum().clamp_min(1e-12)) ** 0.5  # Σ at unit variance per channel, on average
            cov_zx = g * vecs.T @ std_cov * scale  # [Q, d] Cov(z, x)
            record[f"init/energy/{kind}"] = float(vals.sum() / torch.diagonal(std_cov).sum())
        A = {}
        for m in names:
            if m in trainable:
                A[m] = _ridge_solve(cov[blk[m], blk[m]], cov_zx[:, blk[m]], space.cfg.ridge)  # [Q, d_m]
                lin = short_maps(space.adapters(m)["in"])[kind_i]
                lin.weight.copy_(A[m].to(dtype))
                lin.bias.copy_((-A[m] @ mean[blk[m]]).to(dtype))
        for j in trainable:
            zz = 0
            xz = 0
            for i in names:  # what OUT_j reads: every source's Σ, pooled
                if i in A:
                    zz = zz + A[i] @ cov[blk[i], blk[i]] @ A[i].T  # [Q, Q] Cov(ẑ_i)
                    xz = xz + cov[blk[j], blk[i]] @ A[i].T  # [d_j, Q] Cov(x_j, ẑ_i)
                else:  # a frozen source writes z itself
                    zz = zz + cov[zs, zs]
                    xz = xz + cov_zx[:, blk[j]].T
            B = _ridge_solve(zz, xz, space.cfg.ridge)  # [d_j, Q]
            lin = short_maps(space.adapters(j)["out"])[kind_i]
            lin.weight.copy_(B.to(dtype))
            lin.bias.copy_(mean[blk[j]].to(dtype))
    return record


def _weighted_layer_moments(w: Tensor, z: Tensor, x: Tensor) -> tuple[Tensor, ...]:
    """Per-layer weighted sums of one batch: ``w`` ``[N, L]``, ``z`` ``[N, Q]``, ``x`` ``[N, L, D]`` ->
    ``(Σw [L], Σw·z [L, Q], Σw·x [L, D], Σw·z zᵀ [L, Q, Q], Σw·x zᵀ [L, D, Q])``."""
    zz, xz = [], []
    for layer in range(w.shape[1]):  # one layer at a time: [N, Q] at most, not [L, N, Q]
        wz = z * w[:, layer, None]  # [N, Q]
        zz.append(wz.T @ z)  # [Q, Q]
        xz.append(x[:, layer].T @ wz)  # [D, Q]
    return w.sum(0), w.T @ z, torch.einsum("nl,nld->ld", w, x), torch.stack(zz), torch.stack(xz)


@torch.no_grad()
def attention_weighted_out(space: SharedSpace, backend: PoolBackend, batches: Sequence, trainable: Sequence[str],
                           runtime: Runtime | None = None, view: CacheView | None = None) -> dict[str, float]:
    """Refit the short path of every ``trainable`` member's OUT, per target layer, by ridge regression from what OUT
    reads (every source's Σ along the token map, as :func:`closed_form_init` pools it) to the target's cache, each
    position weighted by the attention the target's suffix pays it in that layer (module docstring).

    IN is read as it is (call after :func:`closed_form_init`). Returns ``{"init/attention/top_share": mean share of
    a layer's suffix-to-prefix mass on its most-attended 1 % of positions}`` for the record.
    """
    view = view or CacheView.of(space.cfg)
    names = list(space.names)
    trainable = [m for m in names if m in set(trainable)]
    k = view.sink_tokens
    rotations = {m: backend.rotation(m) for m in names} if view.unrotate else {}
    device = space_device(space)
    dtype = next(space.parameters()).dtype
    sums: dict[tuple[str, str], list[Tensor]] = {}
    top, rows = 0.0, 0
    for batch in batches:
        view.check_prefix(batch.prefix_len)
        blocks = {m: backend.prefix_block(m, batch.prefix(m)) for m in names}  # each [B, P, L_m, D_m]
        latents = {m: space.encode(view.to_space(blocks[m], rotations.get(m)).to(device), m) for m in names}
        for j in trainable:
            mass = backend.attention_received(j, blocks[j], batch.suffix(j))[:, :, k:].double()  # [B, L_j, P-k]
            share = mass / mass.sum(-1, keepdim=True).clamp_min(1e-12)
            top += float(share.topk(max(1, share.shape[-1] // 100), dim=-1).values.sum(-1).mean())
            rows += 1
            w = (1 - ATTENTION_MIX) + ATTENTION_MIX * share * share.shape[-1]  # [B, L_j, P-k], mean 1 per row and layer
            w = w.permute(0, 2, 1).reshape(-1, w.shape[1])  # [N, L_j] one row per position
            x = view.to_space(blocks[j], rotations.get(j))  # [B, P-k, L_j, D_j]
            for i in names:  # what OUT_j reads: every source's Σ at the target's positions, pooled
                z = read_along(latents[i], batch.align(i, j, k))  # [B, P-k, Q]
                for kind in KINDS:
                    zf = getattr(z, kind).reshape(-1, z.keys.shape[-1]).double().cpu()  # [N, Q]
                    xf = getattr(x, kind).reshape(zf.shape[0], x.num_layers, x.width).double()  # [N, L_j, D_j]
                    got = _weighted_layer_moments(w, zf, xf)
                    acc = sums.get((j, kind))
                    sums[(j, kind)] = list(got) if acc is None else [a + g for a, g in zip(acc, got)]
    if not sums:
        raise ValueError("out_weights: attention read no calibration batch")
    for (j, kind), acc in sums.items():
        sw, swz, swx, szz, sxz = rank_mean(acc, runtime)
        mz, mx = swz / sw[:, None], swx / sw[:, None]  # [L, Q], [L, D] weighted means
        lin = short_maps(space.adapters(j)["out"])[KINDS.index(kind)]
        D = mx.shape[1]
        for layer in range(mz.shape[0]):
            cov = szz[layer] / sw[layer] - torch.outer(mz[layer], mz[layer])  # [Q, Q]
            cross = sxz[layer] / sw[layer] - torch.outer(mx[layer], mz[layer])  # [D, Q]
            B = _ridge_solve(cov, cross, space.cfg.ridge)  # [D, Q]
            rows_l = slice(layer * D, (layer + 1) * D)  # OUT's output is layer-major, [L_j * D_j]
            lin.weight[rows_l] = B.to(dtype)
            lin.bias[rows_l] = (mx[layer] - B @ mz[layer]).to(dtype)
    return {"init/attention/top_share": top / max(rows, 1)}
