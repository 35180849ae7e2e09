"""What Σ carries of a model's cache, and how a translated block becomes a model's cache again.

A real model's first cached position is an attention sink (every head leans on it; its keys and
values are unlike any other position's), and its keys carry rotary rotations at absolute
positions. A space therefore reads and writes a *view* of a cache (:class:`CacheView`, from the
space config's ``sink_tokens`` and ``keys``):

* :meth:`CacheView.to_space`: a source's own block ``[B, P, L, D]`` -> the positions after its
  ``k = sink_tokens`` sink positions, keys un-rotated (position-free), ``[B, P-k, L, D]``: what IN
  reads;
* :meth:`CacheView.to_cache`: a translated block ``[B, P-k, L, D]`` (OUT's output) -> keys rotated
  at the target's positions ``k .. P-1``, after the target's *own* cache of its first ``k`` tokens
  (the sink it computes itself), ``[B, P, L, D]``: what the target reads.

With ``sink_tokens: 0`` and ``keys: rotated`` both are the identity (the paper's setting). Both are
differentiable, so a suffix loss's gradient reaches OUT through :meth:`to_cache`. A block that
continues a sequence (a segment starting at position ``start > 0``) has no sink: only the
rotation applies, at its absolute positions.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kvlingua.align import read_along
from kvlingua.cache import KVBlock
from kvlingua.rotary import KeyRotation


@dataclass(frozen=True)
class CacheView:
    """How a space reads a cache: the sink positions left to the target, and whether keys are un-rotated."""

    sink_tokens: int = 0
    """Positions at the start of a prefix that the target computes itself."""
    unrotate: bool = False
    """Σ carries keys without their rotary rotation."""
    refresh: float = 0.0
    """Share of a translated prefix's positions after the sink the target recomputes (:mod:`kvlingua.refresh`)."""

    @classmethod
    def of(cls, cfg) -> "CacheView":
        """The view of a :class:`~kvlingua.space_config.SpaceConfig`."""
        return cls(cfg.sink_tokens, cfg.keys == "unrotated", float(cfg.refresh))

    def sink(self, start: int = 0) -> int:
        """Sink positions of a block that starts at absolute position ``start`` (none past the start)."""
        return self.sink_tokens if start == 0 else 0

    def check_prefix(self, prefix_len: int) -> None:
        """Raise ``ValueError`` unless a prefix of ``prefix_len`` positions leaves Σ something to carry."""
        if prefix_len <= self.sink_tokens:
            raise ValueError(f"a prefix of {prefix_len} positions leaves nothing for Σ after the target's "
                             f"{self.sink_tokens} sink position(s); use longer prefixes or fewer sink_tokens")

    def to_space(self, block: KVBlock, rotation: KeyRotation | None, start: int = 0) -> KVBlock:
        """A model's own block ``[B, P, L, D]`` at positions ``start ..`` -> what Σ carries, ``[B, P-k, L, D]``.

        ``rotation`` is the model's (:meth:`kvlingua.backend.PoolBackend.rotation`); needed only when
        keys are un-rotated.
        """
        k = self.sink(start)
        body = block if k == 0 else KVBlock(block.keys[:, k:], block.values[:, k:], block.n_kv_heads)  # [B, P-k, L, D]
        if self.unrotate:
            body = _need(rotation).unrotate(body, start=start + k)
        return body

    def to_cache(self, block: KVBlock, rotation: KeyRotation | None, sink: KVBlock | None = None,
                 start: int = 0) -> KVBlock:
        """A translated block ``[B, P-k, L, D]`` -> the target's cache ``[B, P, L, D]`` at positions ``start ..``.

        Args:
            block: OUT's output in the target's layout (keys position-free when the view un-rotates).
            rotation: the target's rotary embedding (only read when keys are un-rotated).
            sink: the target's own block of its first ``k`` prefix tokens ``[B, k, L, D]`` (at ``start == 0``
                with ``sink_tokens > 0``; else None).
            start: absolute position of the block's first position in the sequence (0 for a prefix).
        """
        k = self.sink(start)
        if self.unrotate:
            block = _need(rotation).rotate(block, start=start + k)
        if k == 0:
            return block
        if sink is None or sink.seq_len != k:
            raise ValueError(f"the target's own sink block of {k} position(s) is needed, got "
                             f"{None if sink is None else sink.seq_len}")
        sink = sink.to(block.keys.device, block.keys.dtype)
        return KVBlock(torch.cat([sink.keys, block.keys], dim=1), torch.cat([sink.values, block.values], dim=1),
                       block.n_kv_heads)  # [B, P, L, D]


def _need(rotation: KeyRotation | None) -> KeyRotation:
    if rotation is None:
        raise ValueError("keys: unrotated needs the model's rotary embedding (backend.rotation(model))")
    return rotation


_ROTATIONS: "weakref.WeakKeyDictionary[nn.Module, KeyRotation]" = weakref.WeakKeyDictionary()


def model_rotation(model: nn.Module) -> KeyRotation:
    """``model``'s :class:`~kvlingua.rotary.KeyRotation`, built (and checked) once per model object."""
    if model not in _ROTATIONS:
        _ROTATIONS[model] = KeyRotation.from_model(model)
    return _ROTATIONS[model]


def module_view(cfg) -> CacheView:
    """The view of a soft-prompt module (:mod:`kvlingua.modules`): all its virtual positions are carried (a
    module has no tokens a target could read itself), keys as the space keeps them."""
    return CacheView(0, cfg.keys == "unrotated")


def translate_cache(space, block: KVBlock, source: str, target: str, rot_source: KeyRotation | None,
                    rot_target: KeyRotation | None, sink: KVBlock | None = None, start: int = 0,
                    view: CacheView | None = None, index: Tensor | None = None, ids: Tensor | None = None) -> KVBlock:
    """``source``'s own block ``[B, S, L_s, D_s]`` at positions ``start ..`` -> ``target``'s cache of them through Σ.

    ``view`` (default the space's) drops the source's sink positions, un-rotates and re-rotates keys and puts
    the target's own ``sink`` first; ``rot_*`` are the two models' rotations (read only when keys are
    un-rotated). Where the two tokenize differently, ``index`` ``[B, T-k]`` (:func:`kvlingua.align.token_map`)
    says which source position after the sink each target position after the sink reads, and the result has the
    target's ``T`` positions. ``ids`` ``[B, S-k (or T-k)]``: the target's own tokens at the positions after its sink,
    for the space's token prior (:mod:`kvlingua.prior`; None: none read). Returns ``[B, S (or T), L_t, D_t]`` in the
    space's dtype.
    """
    view = view or CacheView.of(space.cfg)
    dtype = next(space.parameters()).dtype
    body = view.to_space(block, rot_source, start).to(dtype)  # [B, S-k, L_s, D_s]
    z = read_along(space.encode(body, source), index)  # [B, S-k (or T-k), Q] at the target's positions
    out = space.decode(z, target, ids)  # [B, S-k (or T-k), L_t, D_t]
    return view.to_cache(out, rot_target, sink, start)  # [B, S (or T), L_t, D_t]
