"""Context use: how much a model's predictions right after a prefix depend on that prefix.

For rows of packed text ``chunks[N, T]`` the first ``prefix_len`` tokens are the prefix
and the rest the suffix, exactly as in the Σ evaluation (:mod:`kvlingua.evaluate`): the
prefix goes into the KV cache (:func:`kvlingua.cache.extract_prefix`), the suffix is read
after it and its tokens ``suffix[1 : first+1]`` are scored
(:func:`kvlingua.backend.suffix_token_nll`), i.e. positions ``P+1 .. P+first``. They are
scored twice: after the row's OWN prefix, and after ANOTHER row's prefix (rows rolled by
``N // 2`` so the other prefix comes from far away in the packed stream, not the
neighbouring text). Same positions, wrong content: the gap is what the model reads from
its context, the room a translator has to transfer content (the eval's base vs control).
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kvlingua.backend import suffix_token_nll
from kvlingua.cache import extract_prefix


def _suffix_nll(model: PreTrainedModel, prefix: Tensor, suffix: Tensor) -> Tensor:
    """Per-token NLL ``[B, F]`` of ``suffix[:, 1:]`` (``suffix`` ``[B, F+1]``) read after ``prefix`` ``[B, P]``."""
    return suffix_token_nll(model, extract_prefix(model, prefix), suffix)  # [B, F]


@torch.no_grad()
def context_use(model: PreTrainedModel, chunks: Tensor, prefix_len: int = 64, first: int = 16,
                batch_size: int = 32, max_rows: int | None = None) -> dict[str, float]:
    """Mean NLL of the first ``first`` scored suffix tokens after the own vs another row's prefix.

    Args:
        model: a causal LM (put in eval mode by the caller; no gradients are taken).
        chunks: ``[N, T]`` token ids, ``T > prefix_len + first``, ``N >= 2``.
        prefix_len: prefix positions P.
        first: scored suffix tokens (positions ``P+1 .. P+first``; position ``P`` is read, not scored).
        batch_size: rows per forward.
        max_rows: use only the first ``max_rows`` rows (all when ``None``).

    Returns:
        ``nll_own``, ``nll_other`` (nats per token), ``gap = nll_other - nll_own`` and
        ``relative_gap = gap / nll_other``, plus ``prefix_len``, ``first`` and ``rows``.
    """
    if chunks.dim() != 2:
        raise ValueError(f"chunks must be [N, T], got shape {tuple(chunks.shape)}")
    if max_rows is not None:
        chunks = chunks[:max_rows]
    N, T = chunks.shape
    if prefix_len < 1 or first < 1:
        raise ValueError(f"prefix_len and first must be positive, got {prefix_len} and {first}")
    if T < prefix_len + first + 1:
        raise ValueError(f"rows of {T} tokens are too short for prefix_len={prefix_len} + 1 + first={first}")
    if N < 2:
        raise ValueError("context_use needs at least 2 rows (the other-prefix condition borrows another row)")
    device = next(model.parameters()).device
    prefixes = chunks[:, :prefix_len]  # [N, P]
    others = torch.roll(prefixes, shifts=N // 2, dims=0)  # [N, P]: row i gets row i - N//2's prefix
    suffixes = chunks[:, prefix_len: prefix_len + first + 1]  # [N, F+1]
    own_sum = other_sum = 0.0
    for s in range(0, N, batch_size):
        suf = suffixes[s: s + batch_size].to(device)
        own_sum += _suffix_nll(model, prefixes[s: s + batch_size].to(device), suf).sum().item()
        other_sum += _suffix_nll(model, others[s: s + batch_size].to(device), suf).sum().item()
    own, other = own_sum / (N * first), other_sum / (N * first)
    return {"nll_own": own, "nll_other": other, "gap": other - own, "relative_gap": (other - own) / other,
            "prefix_len": prefix_len, "first": first, "rows": N}
