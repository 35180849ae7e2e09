"""Context use: how much a model's predictions right after a prefix depend on that prefix.

For rows of packed text ``chunks[N, T]`` take the first ``prefix_len`` tokens as the
prefix and score the next ``first`` tokens twice: after the row's OWN prefix, and after
ANOTHER row's prefix (the rows rolled by ``N // 2``, so the other prefix comes from far
away in the packed stream, not the neighbouring text). Same positions, wrong content:
the gap is what the model reads from its context. This is the "control" condition of
the Σ evaluation, applied to a single model; a pool whose gap is tiny gives a
translator nothing to transfer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel


def _window_nll(model: PreTrainedModel, prefix: Tensor, suffix: Tensor) -> Tensor:
    """Per-token NLL ``[B, F]`` of ``suffix[B, F]`` read right after ``prefix[B, P]``."""
    ids = torch.cat([prefix, suffix], dim=1)  # [B, P+F]
    P, Fn = prefix.shape[1], suffix.shape[1]
    logits = model(input_ids=ids, use_cache=False).logits[:, P - 1: P + Fn - 1].float()  # [B, F, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), suffix.reshape(-1),
                           reduction="none").view_as(suffix)  # [B, F]


@torch.no_grad()
def context_use(model: PreTrainedModel, chunks: Tensor, prefix_len: int = 64, first: int = 16,
                batch_size: int = 32, max_rows: int | None = None) -> dict[str, float]:
    """Mean NLL of the ``first`` tokens after the own prefix vs after another row's prefix.

    Args:
        model: a causal LM (put in eval mode by the caller; no gradients are taken).
        chunks: ``[N, T]`` token ids, ``T >= prefix_len + first``, ``N >= 2``.
        prefix_len: prefix positions P.
        first: scored tokens right after the prefix (positions ``P .. P+first-1``).
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
    if T < prefix_len + first:
        raise ValueError(f"rows of {T} tokens are too short for prefix_len={prefix_len} + first={first}")
    if N < 2:
        raise ValueError("context_use needs at least 2 rows (the other-prefix condition borrows another row)")
    device = next(model.parameters()).device
    prefixes = chunks[:, :prefix_len]  # [N, P]
    others = torch.roll(prefixes, shifts=N // 2, dims=0)  # [N, P]: row i gets row i - N//2's prefix
    suffixes = chunks[:, prefix_len: prefix_len + first]  # [N, F]
    own_sum = other_sum = 0.0
    for s in range(0, N, batch_size):
        suf = suffixes[s: s + batch_size].to(device)
        own_sum += _window_nll(model, prefixes[s: s + batch_size].to(device), suf).sum().item()
        other_sum += _window_nll(model, others[s: s + batch_size].to(device), suf).sum().item()
    own, other = own_sum / (N * first), other_sum / (N * first)
    return {"nll_own": own, "nll_other": other, "gap": other - own, "relative_gap": (other - own) / other,
            "prefix_len": prefix_len, "first": first, "rows": N}
