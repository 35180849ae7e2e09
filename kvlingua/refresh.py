"""Refresh: after a translation, the target recomputes its own keys and values at the few positions it reads most.

Past a few hundred positions a real model's attention rests on a handful of positions: the sink, and inside the
prefix a few *secondary sinks* (punctuation, mostly) that sliding-window layers fall back on once their window has
moved past position 0. A translated cache gets exactly those wrong, and restoring the target's own keys and values
at the 10 % most-attended positions recovers nearly all that a long prefix loses (docs/results/real-pair.md, *Where
a 512-token prefix's content goes*). A refresh does that without an oracle:

1. :func:`attention_mass`: the target reads one token after the translated cache (the first token it would read
   anyway: a suffix's first token, a prompt's last), and the attention mass each position receives, averaged over
   heads and layers, names the positions it leans on (:func:`most_attended`);
2. :func:`recompute_at`: the target computes its own keys and values at those positions, each reading its own token
   there after the translated positions before it (and the refreshed positions before it), in **one** forward:
   one query row per chosen position, a mask per layer type (a sliding layer sees only its window), the cached
   positions it replaces hidden. The result equals recomputing them one at a time in increasing order.

A refresh of a share ``s`` of ``P`` translated positions costs two target forwards: one of 1 token and one of
``ceil(s·P)`` tokens over the ``P`` cached positions. Measured at P = 512 on 2 CPU cores (SmolLM2, Gemma-3), 10 %
costs ~0.3 of a re-prefill, not 0.1: the probe is ~40 ms and a few dozen rows run matmuls well below prefill's rate.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kvlingua.cache import KVBlock, as_past_key_values, block_from_cache, cache_kwargs, returned_cache


MASS_RESOLUTION = 1e-6
"""Attention masses closer than this are a tie for :func:`most_attended` (fp32 sums differ by ~1e-7 across runs)."""


def refresh_count(share: float, positions: int) -> int:
    """``ceil(share · positions)``, at least 1 when ``share > 0``: positions a refresh of ``share`` recomputes."""
    if share <= 0 or positions <= 0:
        return 0
    return min(positions, max(1, math.ceil(share * positions - 1e-9)))


def most_attended(mass: Tensor, share: float, skip: int = 0) -> Tensor:
    """``[B, n]`` absolute positions, increasing, of the ``n = refresh_count(share, P - skip)`` positions after the
    first ``skip`` that receive the most attention. ``mass`` is ``[B, L, P]`` (:func:`kvlingua.backend.attention_mass`):
    averaged over layers first, so a position one layer leans on hard is chosen even where others ignore it.

    Masses are compared at a resolution of :data:`MASS_RESOLUTION`, ties going to the earlier position: two runs
    whose sums differ in the last float bits (another thread count, another process) pick the same positions."""
    seen = mass[:, :, skip:].double().mean(1)  # [B, P-skip]
    n = refresh_count(share, seen.shape[-1])
    order = torch.sort(-torch.round(seen / MASS_RESOLUTION), dim=-1, stable=True).indices  # [B, P-skip]
    return (order[:, :n] + skip).sort(dim=-1).values  # [B, n]


def attention_mass(model, block: KVBlock, suffix_ids: Tensor) -> Tensor:
    """Mass ``[B, L, P]`` that each of ``block``'s ``P`` positions receives from the suffix's queries in each layer:
    softmax weights averaged over heads and suffix queries (a layer's row sums to the suffix's mass on the prefix;
    the rest falls on the suffix itself). Needs a model that returns attention weights (``attn_implementation=
    "eager"``, as :func:`kvlingua.models.load_frozen` loads every frozen model)."""
    with torch.no_grad():
        cache = as_past_key_values(block)
        out = model(input_ids=suffix_ids, use_cache=True, output_attentions=True, **cache_kwargs(model, cache))
    if not out.attentions or out.attentions[0] is None:
        raise ValueError("the model returned no attention weights; load it with attn_implementation='eager'")
    P = block.seq_len
    return torch.stack([a[..., :P].float().mean(dim=(1, 2)) for a in out.attentions], dim=1)  # [B, L, P]


def refresh_cache(model, cache: KVBlock, ids: Tensor, read_ids: Tensor, share: float, skip: int = 0) -> KVBlock:
    """``cache`` ``[B, P, L, D]`` (a translated prefix, keys rotated) after ``model`` refreshes ``share`` of its
    positions after the first ``skip`` (the sink, its own already): the positions that reading ``read_ids``
    ``[B, r]`` (the token(s) the model reads next; only their attention is used) after the cache attends to most,
    recomputed from ``ids`` ``[B, >= P]`` (the prefix as this model tokenizes it). ``share <= 0``: ``cache`` as is;
    else the result is on the model's device."""
    if refresh_count(share, cache.seq_len - skip) == 0:
        return cache
    param = next(model.parameters())  # where the model is: the cache and ids go there, the result stays
    cache, ids, read_ids = cache.to(param.device), ids.to(param.device), read_ids.to(param.device)
    mass = attention_mass(model, cache.to(dtype=param.dtype), read_ids)  # [B, L, P]
    return recompute_at(model, cache, ids, most_attended(mass, share, skip))


def _windows(config) -> list[int | None]:
    """Per layer, the sliding window a query sees (``None``: every position before it), from the (text) config's
    ``layer_types`` (Gemma-2/3, Qwen2/3 ...); without them, every layer attends fully unless the config turns a
    window on for all of them (Mistral's ``sliding_window`` with no ``use_sliding_window: false``)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if t == "sliding_attention" else None for t in types]
    on = window is not None and getattr(config, "use_sliding_window", True)
    return [window if on else None] * config.num_hidden_layers


def refresh_mask(positions: Tensor, cached: int, window: int | None, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``[B, 1, n, cached + n]`` for ``n`` query rows at absolute ``positions`` ``[B, n]``
    (increasing) read after a ``cached``-position cache and then themselves.

    Row ``i`` (position ``p_i``) sees cached position ``t`` iff ``t < p_i``, ``t`` is not a refreshed position
    (its refreshed row stands in for it) and ``t > p_i - window``; it sees refreshed row ``j`` iff ``p_j <= p_i``
    and ``p_j > p_i - window`` (transformers' sliding-window rule: a window of ``w`` covers ``w`` positions)."""
    B, n = positions.shape
    t = torch.arange(cached, device=positions.device)  # [C]
    p = positions[:, :, None]  # [B, n, 1]
    replaced = torch.zeros(B, cached, dtype=torch.bool, device=positions.device).scatter_(1, positions, True)  # [B, C]
    see_cache = (t[None, None, :] < p) & ~replaced[:, None, :]  # [B, n, C]
    see_new = positions[:, None, :] <= p  # [B, n, n]
    if window is not None:
        see_cache &= t[None, None, :] > p - window
        see_new &= positions[:, None, :] > p - window
    allowed = torch.cat([see_cache, see_new], dim=-1)[:, None]  # [B, 1, n, C+n]
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


@torch.no_grad()
def recompute_at(model, cache: KVBlock, ids: Tensor, positions: Tensor) -> KVBlock:
    """``cache`` ``[B, P, L, D]`` (keys rotated, as the model reads them) with the model's own keys and values at
    ``positions`` ``[B, n]`` (absolute, increasing, distinct per row), computed in one forward: row ``b``'s
    position ``t`` reads ``ids[b, t]`` at position ``t`` after the cache's positions ``< t``, the earlier refreshed
    ones as refreshed (module docstring). Returns fp32 keys and values, like the cache."""
    if positions.numel() == 0:
        return cache
    P, dtype = cache.seq_len, next(model.parameters()).dtype
    if positions.min() < 0 or positions.max() >= P or ids.shape[1] < P:
        raise ValueError(f"refresh positions must lie in 0..{P - 1} with ids for each; got {positions.tolist()} "
                         f"and {ids.shape[1]} ids")
    device = cache.keys.device
    positions = positions.to(device)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    windows, kinds = _windows(config), getattr(config, "layer_types", None)
    masks = {w: refresh_mask(positions, P, w, dtype) for w in set(windows)}  # each [B, 1, n, P+n]
    if kinds is not None:  # models with per-layer-type masks take one per type
        mask = {kind: masks[w] for kind, w in zip(kinds, windows)}
    elif len(masks) == 1:
        mask = next(iter(masks.values()))
    else:
        raise ValueError("refresh: a model whose layers attend differently must name its layer_types")
    past = as_past_key_values(cache.to(dtype))
    out = model(input_ids=ids.gather(1, positions), position_ids=positions, attention_mask=mask, use_cache=True,
                logits_to_keep=1, **cache_kwargs(model, past))
    new = block_from_cache(returned_cache(model, out), cache.n_kv_heads)  # [B, P+n, L, D]
    index = positions[:, :, None, None].expand(-1, -1, cache.num_layers, cache.width)  # [B, n, L, D]
    keys = cache.keys.float().scatter(1, index, new.keys[:, P:].float())  # [B, P, L, D]
    values = cache.values.float().scatter(1, index, new.values[:, P:].float())
    return KVBlock(keys, values, cache.n_kv_heads)
