"""Keys without rotation: a model's rotary embedding (RoPE) applied to KV blocks, and undone.

A cached key at absolute position ``p`` is ``R(p) k``: the pre-RoPE key ``k`` rotated (in 2-D pairs,
on the first ``rot_dim`` dims of each head) by angles that grow with ``p``. A block whose keys are
un-rotated carries position-free keys; rotating them again at the target model's own positions
makes the block a cache that model can read, at whatever start it is placed.

Reading order:

1. :meth:`KeyRotation.from_model` finds the model's own rotary module (the base model's
   ``rotary_emb``; transformers 5.x keeps one per model, not per layer), copies it to CPU,
   records the per-layer layer types (Gemma-3 rotates sliding and full attention layers with
   different bases) and ``rot_dim``, and runs the self-check (4). No RoPE formula is written
   here: cos/sin always come from that module.
2. :meth:`KeyRotation._cos_sin`: cos/sin ``[S, L, rot_dim]`` for positions ``start ..
   start+S-1``, computed in fp32 by the module (once per distinct layer type, then spread to the layers).
3. :meth:`KeyRotation.rotate` and :meth:`KeyRotation.unrotate`: one map per pair of dims,
   ``x * P + rotate_half(x) * Q``. Rotating is the model's own ``k * cos + rotate_half(k) * sin``
   (``P = cos``, ``Q = sin``); un-rotating is the exact inverse of that 2x2 map, so rope types
   whose cos/sin carry an ``attention_scaling`` factor ``a`` (yarn, longrope) un-rotate too
   (the map's determinant is ``a**2``, not 1). Dims past ``rot_dim`` (partial rotary: Phi,
   StableLM, GPT-NeoX) pass through, as in those models' attention.
4. :func:`rotation_errors`: the self-check. A repeated token ``[t, t, ...]`` has the same
   pre-RoPE key at every position of layer 0, so un-rotated layer-0 keys must agree across
   positions (``check_err``). RoPE is the model's only use of positions, so the whole prefix
   read at positions shifted by ``SHIFT`` un-rotates (there) to the same keys on every layer
   (``shift_err``): this catches layers without RoPE (SmolLM3's NoPE layers) and wrong layer
   types, which layer 0 alone cannot. Interleaved RoPE (GPT-J) fails both.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel

from kvlingua.cache import (
    CacheAPIError,
    KVBlock,
    arch_summary,
    block_from_cache,
    cache_kwargs,
    extract_prefix,
    returned_cache,
)

CHECK_POSITIONS = 8
"""Positions of the repeated-token prefix the self-check reads."""
SHIFT = 16
"""How far the self-check's second read of that prefix is moved along the positions."""


def check_tolerance(dtype: torch.dtype) -> float:
    """Largest self-check error (relative to the key scale) accepted for a model computing in ``dtype``.

    ``1e-4`` in fp32 (measured errors are ~1e-7); 8 ulps of a half-precision type, whose cached keys
    are rounded (~0.06 for bf16, ~0.008 for fp16). A wrong rotation errs by the key scale itself.
    """
    return max(1e-4, 8 * torch.finfo(dtype).eps)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim: the pairing transformers' ``apply_rotary_pos_emb`` uses."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _find_rotary(model: nn.Module, model_type: str) -> nn.Module | None:
    """The model's rotary embedding module, or ``None`` if it has none (GPT-2: absolute positions)."""
    base = getattr(model, "base_model", model)
    found = getattr(base, "rotary_emb", None)
    if isinstance(found, nn.Module):
        return found
    named = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"]
    if len(named) == 1:  # e.g. a language model nested in a multimodal base model
        return named[0]
    if named:
        raise CacheAPIError(
            f"{model_type}: {len(named)} rotary_emb modules (one per layer?); kvlingua needs the one "
            "rotary embedding of the base model"
        )
    other = [n for n, _ in model.named_modules() if "rotary" in n.lower() or "rope" in n.rsplit(".", 1)[-1].lower()]
    if other:
        raise CacheAPIError(
            f"{model_type}: has a rotary module {other[0]!r} but no rotary_emb; kvlingua cannot un-rotate its keys"
        )
    return None


@dataclass(frozen=True, eq=False)
class KeyRotation:
    """A model's rotary embedding applied to KV blocks, per layer (picklable: it may cross Ray).

    Build it with :meth:`from_model` (or :meth:`none` for the identity). Blocks are ``[B, S, L, D]``
    with ``D = n_kv_heads * head_dim``; rotation acts on the first ``rot_dim`` dims of each head.
    """

    kind: str
    """``"rope"`` or ``"none"`` (no rotary embedding: keys are left as they are)."""
    model_type: str = ""
    """transformers ``model_type`` of the model it was built from."""
    rotary: nn.Module | None = None
    """CPU copy of the model's rotary module; ``rotary(x, position_ids[, layer_type]) -> cos, sin``."""
    layer_types: tuple[str, ...] | None = None
    """Per layer, the ``layer_type`` the module is called with (Gemma-3); ``None``: one call serves every layer."""
    rot_dim: int = 0
    """Rotated dims at the start of each head (``cos.shape[-1]``; ``< head_dim`` for partial rotary)."""
    n_kv_heads: int = 0
    head_dim: int = 0
    num_layers: int = 0
    check_err: float | None = None
    """Self-check: layer-0 keys of a repeated token after un-rotation, max spread / key scale."""
    shift_err: float | None = None
    """Self-check: un-rotated keys read at shifted positions, max difference / key scale over layers."""

    def __post_init__(self) -> None:
        if self.kind not in ("rope", "none"):
            raise ValueError(f"KeyRotation kind must be 'rope' or 'none', got {self.kind!r}")
        if self.kind == "rope" and self.rotary is None:
            raise ValueError("a 'rope' KeyRotation needs its rotary module")

    @classmethod
    def none(cls) -> "KeyRotation":
        """The identity: keys of models without RoPE carry no rotation to undo."""
        return cls(kind="none")

    @classmethod
    def from_model(cls, model: PreTrainedModel, verify: bool = True) -> "KeyRotation":
        """The key rotation of ``model``, from its own rotary embedding module.

        Args:
            model: a transformers causal LM (frozen or not; it is only read).
            verify: run :func:`rotation_errors` and refuse the model if un-rotation is not exact.

        Raises:
            CacheAPIError: the rotary module cannot be found or called, or (``verify``) its keys do
                not un-rotate with ``rotate_half`` pairs (interleaved RoPE such as GPT-J, layers
                without RoPE such as SmolLM3's); the one-line message names the model type.
        """
        summary = arch_summary(model)
        layout = dict(model_type=summary.model_type, n_kv_heads=summary.n_kv_heads, head_dim=summary.head_dim,
                      num_layers=summary.num_layers)
        found = _find_rotary(model, summary.model_type)
        if found is None:
            return cls(kind="none", **layout)
        rotary = copy.deepcopy(found).to("cpu")
        layer_types = None
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            config_types = getattr(model.config.get_text_config(), "layer_types", None)
            if config_types is not None:
                layer_types = tuple(config_types)
        rot = cls(kind="rope", rotary=rotary, layer_types=layer_types, **layout)
        try:
            cos, sin = rot._cos_sin(0, 1)  # each [1, L or 1, rot_dim]
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise CacheAPIError(f"{summary.model_type}: its rotary embedding cannot be called as "
                                f"rotary_emb(x, position_ids[, layer_type]): {e}") from None
        rot_dim = cos.shape[-1]
        if cos.shape != sin.shape or rot_dim % 2 or rot_dim > summary.head_dim:
            raise CacheAPIError(f"{summary.model_type}: rotary embedding returned cos {tuple(cos.shape)} and sin "
                                f"{tuple(sin.shape)}; expected two [.., rot_dim] tables, rot_dim even and <= "
                                f"head_dim {summary.head_dim}")
        rot = replace(rot, rot_dim=rot_dim)
        if not verify:
            return rot
        errors = rotation_errors(model, rot)
        tol = check_tolerance(next(model.parameters()).dtype)
        if errors["check_err"] > tol or errors["shift_err"] > tol:
            raise CacheAPIError(
                f"{summary.model_type}: its keys do not un-rotate with its rotary embedding (rotate_half pairs "
                f"on the first {rot_dim} of {summary.head_dim} dims per head): repeated-token error "
                f"{errors['check_err']:.2g}, shifted-positions error {errors['shift_err']:.2g} x key scale "
                f"(tolerance {tol:.0e}); interleaved RoPE and layers without RoPE are not supported"
            )
        return replace(rot, **errors)

    @torch.no_grad()
    def _type_cos_sin(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin for positions ``start .. start+length-1`` per distinct layer type: each ``[S, T, rot_dim]``
        (``T`` types in order of first appearance; ``[S, 1, rot_dim]`` when one table serves every layer), fp32 on
        CPU, from the model's own rotary module."""
        x = torch.zeros(1, dtype=torch.float32)  # the module reads only its device and dtype
        pos = torch.arange(start, start + length)[None]  # [1, S]
        if self.layer_types is None:
            cos, sin = self.rotary(x, pos)  # each [1, S, rot_dim]
            return cos[0, :, None], sin[0, :, None]  # [S, 1, rot_dim]
        per_type = [self.rotary(x, pos, t) for t in dict.fromkeys(self.layer_types)]  # each ([1, S, rot_dim] x 2)
        return (torch.stack([c[0] for c, _ in per_type], dim=1),  # [S, T, rot_dim]
                torch.stack([s[0] for _, s in per_type], dim=1))

    def _per_layer(self, table: Tensor) -> Tensor:
        """A per-type table ``[S, T, rot_dim]`` -> per layer ``[S, L, rot_dim]`` (``[S, 1, rot_dim]`` as is)."""
        if self.layer_types is None:
            return table
        types = list(dict.fromkeys(self.layer_types))
        index = torch.tensor([types.index(t) for t in self.layer_types], device=table.device)  # [L]
        return table.index_select(1, index)  # [S, L, rot_dim]

    def _cos_sin(self, start: int, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin for positions ``start .. start+length-1``: each ``[S, L, rot_dim]`` (``[S, 1, rot_dim]``
        when one table serves every layer), fp32 on CPU, from the model's own rotary module."""
        cos, sin = self._type_cos_sin(start, length)  # each [S, T, rot_dim]
        return self._per_layer(cos), self._per_layer(sin)  # each [S, L, rot_dim]

    def _check(self, block: KVBlock, start: int) -> None:
        if start < 0:
            raise ValueError(f"start must be a position >= 0, got {start}")
        if block.layout != (self.num_layers, self.n_kv_heads, self.head_dim):
            raise ValueError(
                f"KV block of {block.num_layers} layers x {block.n_kv_heads} kv heads x {block.head_dim} does not "
                f"fit the key rotation of {self.model_type}: {self.num_layers} layers x {self.n_kv_heads} kv heads "
                f"x {self.head_dim}"
            )

    def _map(self, block: KVBlock, p: Tensor, q: Tensor) -> KVBlock:
        """Keys ``x -> x * p + rotate_half(x) * q`` on the first ``rot_dim`` dims of each head; values untouched.

        ``p``, ``q``: ``[S, L or 1, rot_dim]`` fp32 tables. The map runs in (at least) fp32 and the result is
        rounded to the block's dtype once: in bf16 arithmetic an un-rotate/rotate round trip of a bf16
        SmolLM2-135M block moved its suffix NLL by 0.08 nats per token on average; in fp32 it gives the
        block back (to 1e-7) and the NLL exactly.
        """
        B, S, L, D = block.keys.shape
        dtype = torch.promote_types(block.keys.dtype, torch.float32)
        keys = block.keys.reshape(B, S, L, self.n_kv_heads, self.head_dim)  # [B, S, L, H, hd]
        p = p.to(keys.device, dtype)[:, :, None]  # [S, L or 1, 1, rot_dim]
        q = q.to(keys.device, dtype)[:, :, None]
        k_rot = keys[..., : self.rot_dim].to(dtype)  # [B, S, L, H, rot_dim]
        k_pass = keys[..., self.rot_dim :]  # [B, S, L, H, hd - rot_dim]: partial rotary passes these through
        k_rot = (k_rot * p + rotate_half(k_rot) * q).to(keys.dtype)
        keys = torch.cat((k_rot, k_pass), dim=-1).reshape(B, S, L, D)  # [B, S, L, D]
        return KVBlock(keys, block.values, block.n_kv_heads)

    def _tables(self, block: KVBlock, start: int) -> tuple[Tensor, Tensor]:
        """cos, sin per distinct layer type ``[S, T, rot_dim]`` at the values the model multiplies by in the block's
        dtype, as fp32. The maps' factors are computed on these and spread to the layers last (:meth:`_per_layer`):
        Gemma-3's 18 layers have 2 types, and the elementwise work on per-layer tables cost ~30 ms of a 512-token
        un-rotation (of ~36) on 2 CPU cores."""
        cos, sin = self._type_cos_sin(start, block.seq_len)
        return cos.to(block.keys.dtype).float(), sin.to(block.keys.dtype).float()

    def rotate(self, block: KVBlock, start: int = 0) -> KVBlock:
        """Position-free keys -> keys rotated at positions ``start .. start+S-1`` (the model's own RoPE).

        Args:
            block: keys/values ``[B, S, L, D]``; keys position-free (from :meth:`unrotate` or an adapter).
            start: absolute position of the block's first entry.

        Returns:
            A block ``[B, S, L, D]`` of the same dtype and device, values the same tensor; differentiable.
        """
        if self.kind == "none":
            return block
        self._check(block, start)
        cos, sin = self._tables(block, start)  # each [S, T, rot_dim]
        return self._map(block, self._per_layer(cos), self._per_layer(sin))

    def unrotate(self, block: KVBlock, start: int = 0) -> KVBlock:
        """Keys rotated at positions ``start .. start+S-1`` -> position-free keys: the exact inverse of :meth:`rotate`.

        Per pair ``(x1, x2)`` the model computes ``y = [[c1, -s1], [s2, c2]] x``; its inverse is
        ``[[c2, s1], [-s2, c1]] / (c1 c2 + s1 s2)`` (``c1 = c2 = a cos``, ``s1 = s2 = a sin`` in practice,
        determinant ``a**2`` with ``a`` the rope type's ``attention_scaling``).

        Args:
            block: keys/values ``[B, S, L, D]`` as a model cached them (e.g. :func:`kvlingua.cache.extract_prefix`).
            start: absolute position the block's first entry was read at.

        Returns:
            A block ``[B, S, L, D]`` of the same dtype and device, values the same tensor; differentiable.
        """
        if self.kind == "none":
            return block
        self._check(block, start)
        cos, sin = self._tables(block, start)  # each [S, T, rot_dim]
        c1, c2 = cos.chunk(2, dim=-1)  # each [S, T, rot_dim / 2]
        s1, s2 = sin.chunk(2, dim=-1)
        det = (c1 * c2 + s1 * s2).repeat(1, 1, 2)  # [S, T, rot_dim]
        return self._map(block, self._per_layer(torch.cat((c2, c1), dim=-1) / det), self._per_layer(-sin / det))

    def describe(self) -> dict[str, Any]:
        """JSON-able record for ``pool.json``: kind, layout, layer types, rope type and scaling, self-check errors."""
        if self.kind == "none":
            return {"kind": "none", "model_type": self.model_type}
        cos, _ = self._cos_sin(0, 1)  # [1, L or 1, rot_dim]; at position 0, cos = attention_scaling
        scaling = [round(float(c), 6) for c in cos[0, :, 0]]
        return {
            "kind": self.kind,
            "model_type": self.model_type,
            "rope_type": getattr(self.rotary, "rope_type", None),
            "attention_scaling": scaling[0] if len(set(scaling)) == 1 else scaling,
            "rot_dim": self.rot_dim,
            "head_dim": self.head_dim,
            "n_kv_heads": self.n_kv_heads,
            "layer_types": list(self.layer_types) if self.layer_types is not None else None,
            "check_err": self.check_err,
            "shift_err": self.shift_err,
        }


@torch.no_grad()
def _block_at(model: PreTrainedModel, input_ids: Tensor, start: int, n_kv_heads: int) -> KVBlock:
    """``model``'s block for ``input_ids`` ``[B, S]`` read at positions ``start .. start+S-1``: ``[B, S, L, D]``."""
    if start == 0:
        return extract_prefix(model, input_ids)
    B, S = input_ids.shape
    pos = torch.arange(start, start + S, device=input_ids.device).expand(B, S)  # [B, S]
    out = model(input_ids=input_ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, DynamicCache()))
    return block_from_cache(returned_cache(model, out), n_kv_heads)


@torch.no_grad()
def rotation_errors(model: PreTrainedModel, rotation: KeyRotation) -> dict[str, float]:
    """How exactly ``rotation`` un-rotates ``model``'s keys, relative to the key scale (see the module docstring).

    Reads two repeated tokens ``[[t, t, ...], [u, u, ...]]`` (``CHECK_POSITIONS`` long) at positions
    ``0..`` and at ``SHIFT..``. Returns ``check_err``: max spread over positions of the un-rotated
    layer-0 keys / max |key|; and ``shift_err``: max over layers of the difference between the two
    reads' un-rotated keys / that layer's max |key|.
    """
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    ids = torch.tensor([[vocab // 3], [2 * vocab // 3]], device=device).expand(2, CHECK_POSITIONS)  # [2, n]
    free = rotation.unrotate(_block_at(model, ids, 0, rotation.n_kv_heads), start=0)  # [2, n, L, D]
    shifted = rotation.unrotate(_block_at(model, ids, SHIFT, rotation.n_kv_heads), start=SHIFT)  # [2, n, L, D]
    k0 = free.keys[:, :, 0].float()  # [2, n, D]
    check_err = (k0 - k0[:, :1]).abs().max() / k0.abs().max()
    scale = free.keys.float().abs().amax(dim=(0, 1, 3))  # [L]
    shift_err = ((shifted.keys.float() - free.keys.float()).abs().amax(dim=(0, 1, 3)) / scale).max()
    return {"check_err": float(check_err), "shift_err": float(shift_err)}
