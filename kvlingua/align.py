"""Which source position a target position reads when the two models tokenize differently.

Text is the interface between tokenizers (README.md, *Your own models*): both models tokenize the
same text, and every token knows the character where it ends. Target position ``t`` reads Σ at the
**last source token that ends at or before t's last character**, so no target position ever reads a
source token that reaches past it (causal), and the map is monotone in ``t``. A target token that ends
before any source token has (the left edge of a window, where the source's tokens started later) reads
the source's first position: the map is clamped there, it never points outside the block.

Ends are measured in one frame for both models (here: characters relative to the prefix cut, so every
prefix token ends at or before 0). Tokens with no characters (a BOS) carry :data:`NO_CHARS` and are
never read through the map: they are the sink positions each target computes itself.

With one tokenizer the two end sequences are equal and the map is the identity, which callers skip
(:meth:`kvlingua.batch.Batch.align` returns None), so a shared-tokenizer pool computes exactly what it
computed before the map existed.
"""
from __future__ import annotations

import torch
from torch import Tensor

NO_CHARS = -(2 ** 30)
"""The end of a token that covers no characters (a BOS or other special token put first)."""


def token_map(source_ends: Tensor, target_ends: Tensor) -> Tensor:
    """For each target position, the index of the source position it reads.

    Args:
        source_ends: ``[B, S]`` character end of each source token, non-decreasing along a row.
        target_ends: ``[B, T]`` character end of each target token, same frame.

    Returns:
        ``[B, T]`` int64 indices into ``0 .. S-1``: the last source token ending at or before the target
        token's end, clamped to 0 where none has ended yet.
    """
    if source_ends.dim() != 2 or target_ends.dim() != 2 or source_ends.shape[0] != target_ends.shape[0]:
        raise ValueError(f"token_map needs ends [B, S] and [B, T] with one B, got {tuple(source_ends.shape)} "
                         f"and {tuple(target_ends.shape)}")
    if source_ends.shape[1] == 0:
        raise ValueError("token_map needs at least one source position")
    src = source_ends.long().contiguous()  # [B, S]
    tgt = target_ends.long().contiguous()  # [B, T]
    idx = torch.searchsorted(src, tgt, right=True) - 1  # [B, T] last source end <= target end
    return idx.clamp_(min=0)


def gather_positions(t: Tensor, index: Tensor) -> Tensor:
    """``t`` ``[B, S, ...]`` read at ``index`` ``[B, T]`` along positions: ``[B, T, ...]`` (differentiable)."""
    B, T = index.shape
    idx = index.to(t.device).reshape(B, T, *([1] * (t.dim() - 2))).expand(B, T, *t.shape[2:])  # [B, T, ...]
    return t.gather(1, idx)


def read_along(latent, index: Tensor | None):
    """A source's Σ block (:class:`~kvlingua.space.LatentBlock`, keys and values ``[B, S, Q]``) read at the
    target's positions: ``[B, T, Q]`` along ``index`` ``[B, T]`` (:func:`token_map`); as is where ``index`` is None."""
    return latent if index is None else latent.map(lambda t: gather_positions(t, index))


def leading_specials(tokenizer) -> list[int]:
    """The ids ``tokenizer`` puts before any text when it adds special tokens (its BOS where it adds one)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n < 0 or with_special[n:n + len(plain)] != plain:
        return []  # a tokenizer that adds tokens at the end only puts nothing first
    return list(with_special[:n])


def text_ends(tokenizer, text: str, specials: bool = True) -> tuple[list[int], list[int]]:
    """``text`` as ``tokenizer`` reads it, and where each token's characters end relative to the text's end.

    Returns ``(ids, ends)``: the leading special tokens first where ``specials`` (ends :data:`NO_CHARS`), then the
    text's tokens, whose ends are ``offset_end - len(text)`` (``<= 0``, non-decreasing): the frame of
    :func:`token_map` for two tokenizations of one text.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first = leading_specials(tokenizer) if specials else []
    ends, top = [], NO_CHARS
    for _, end in enc["offset_mapping"]:
        top = max(top, end - len(text))
        ends.append(top)
    return first + list(enc["input_ids"]), [NO_CHARS] * len(first) + ends
