"""The adapters into and out of the shared space Σ (paper §2.2, plus a short path).

Every pool model ``i`` owns two adapters, ``IN_i`` and ``OUT_i``. Both are the same
generic module, :class:`LayerwiseTranslator`, which maps a pair of cache-like tensors
(keys and values, each ``[B, S, L_in, D_in]``) to a pair ``[B, S, L_out, D_out]``:

* ``IN_i``:  ``[B, S, L_i, D_i]``      -> ``[B, S, 1, Q]``   (read as ``[B, S, Q]``)
* ``OUT_i``: ``[B, S, L_i, Q / L_i]``  -> ``[B, S, L_i, D_i]`` (Σ reshaped into L_i slices)

Reading order of :class:`LayerwiseTranslator` (keys and values take the same route):

1. **Input transform** (:class:`~kvlingua.layers.SliceInput`): per input slice ``l``:
   LayerNorm -> Linear -> GELU to width ``D' = embed_dim_factor * D_i`` (``D_i`` is the
   model's cache width for both IN_i and OUT_i). Each slice has its own LayerNorm affine
   and Linear (cache statistics differ layer by layer), and keys and values have
   *separate* input transforms (paper: "different sets of parameters for the linear
   transform").
2. **Cross-attention stack** (:class:`~kvlingua.layers.CrossAttentionLayer`), parameters *shared* by the
   key and value streams (they run as one batch of ``2B``). The query stream is seeded
   by slice 0; layer ``g`` takes the previous layer's output as queries and cross-attends
   to its group of slices (one slice per layer by default, the paper's design; with
   ``num_layers < L_in`` the slices are split into ``num_layers`` contiguous groups and a
   layer attends to all slices of its group, or, with ``group_mode="merge"``, the input
   transform contracts each group into one slice first, paper footnote 2). Pre-norm, residual connections, GELU
   feed-forward of width ``translation_dim_factor * D'``. Attention over positions is
   causal: position ``t`` sees positions ``<= t`` of its slices, so a translated prefix
   never depends on the future.
3. **Output transform** (:class:`~kvlingua.layers.OutputTransform`; ``per_layer``: see below): concatenate the
   layer outputs ``[B, S, G * D']`` -> LayerNorm -> Linear -> ``[B, S, L_out * D_out]``. Separate
   parameters for keys and values (the shared stack carries both; the heads let K and V
   land on their different statistics). No GELU on the final output: a cache entry can
   be negative, and GELU would bound it below by ~-0.17.
4. **Short path** (``per_layer``: see below): a Linear per K/V from the flattened input ``[B, S, L_in * D_in]``
   straight to ``[B, S, L_out * D_out]``, added to the stack's output. When it is on, the
   stack's final projection starts at zero, so training starts as a linear translator
   and the stack adds what it learns. ``short_path`` and ``stack`` switch either path off
   (ablations); at least one stays on.

**Output layout** (``SpaceConfig.output``). The paper's output transform (``dense``) is one
Linear from all ``G*D'`` stack outputs to the whole ``L_out*D_out`` layout, and the short
path one Linear from ``L_in*D_in``: at real depths that is O(L^2*D*D') parameters (1.75x
SmolLM2-135M for IN + OUT). ``per_layer`` keeps steps 1-2 and the short-path/zero-init
semantics, and makes steps 3-4 local in depth: the output layout is cut into one chunk
of ``w = L_out*D_out / L_in`` per input slice (IN: Σ as ``L_i`` slices of ``Q/L_i``, the
same cut OUT_j reads Σ with; OUT: one model layer of ``D_i``), stack layer g writes only
the chunks of its own group (:class:`~kvlingua.layers.GroupOutput`), and the short path maps slice l to
chunk l (:class:`~kvlingua.layers.SliceLinear`). Mixing across layers happens in the stack's query stream.
Its default width is a bottleneck, ``D' = 0.5*D_i``. Across models with different depths
chunk l of Σ is read by the target layer at the same relative depth.

Size of IN + OUT at published shapes, ``Q = 32*L`` (``kvlingua plan configs/shapes/*.json``),
as a share of all the model's parameters, dense -> per_layer: SmolLM2-135M 1.75 -> 0.050,
Llama-3.2-1B 0.42 -> 0.018, Qwen2.5-0.5B 0.16 -> 0.005, Gemma-2-2B 1.70 -> 0.054,
Mistral-7B 0.87 -> 0.024. ``output: auto`` (default) resolves to ``per_layer`` when the
dense adapter exceeds ``max_share`` (0.1) of a member (:func:`kvlingua.plan.resolve_output`).

Size of the dense adapter (measured with :meth:`kvlingua.space.SharedSpace.param_counts`, defaults:
embed_dim_factor=2, translation_dim_factor=1, 4 heads, both paths on), as a fraction of
the base model's non-embedding parameters:

* ``1.9m-l2-d256`` rung of :mod:`kvlingua.pretrain.sizes` (2 layers, hidden 256, 1 kv head x 64,
  1.90M): at Q=256, IN 432k (0.23) and OUT 399k (0.21) -- the paper's "about a quarter";
  ``3.8m-l4-d256``/``7.6m-l8-d256`` at Q=256: IN 0.23, OUT 0.23/0.29.
* tiny Gemma-2 of ``tests/helpers.py`` (2 layers, hidden 32, 1 kv head x 8, 17.7k): at Q=256,
  IN 29.8k (1.69) and OUT 22.1k (1.25), because Q=256 is wide next to L*D=16 and the output
  transform and short path scale with Q; at Q=16 both are 5.8k (0.33).
* Table-3 paper shape (4 layers, d_model 960, 1 kv head x 240, FFN 15360, 186M): at Q=960,
  IN = OUT = 12.0M (0.065); with the paper's adapter heads (``n_heads=32, head_dim=64``)
  IN = OUT = 24.1M (0.13 each, 0.26 the pair).

The building blocks (:class:`~kvlingua.layers.SliceInput`, :class:`~kvlingua.layers.CrossAttentionLayer`, the
output transforms and :class:`~kvlingua.layers.SliceLinear`) live in :mod:`kvlingua.layers`.

:class:`LinearAdapter` is the *linear* baseline: one Linear for K and one for V on the
layer-concatenated caches, with the same call signature.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kvlingua.layers import (
    CrossAttentionLayer,
    GroupOutput,
    OutputTransform,
    SliceInput,
    SliceLinear,
    check_input,
    init_linear,
    rescale_linear,
    slice_groups,
)
from kvlingua.space_config import SpaceConfig, stack_heads


class LayerwiseTranslator(nn.Module):
    """Paper §2.2 adapter plus a short path: ``(K, V)`` each ``[B, S, L_in, D_in]`` -> each ``[B, S, L_out, D_out]``.

    Args:
        in_layers, in_width: input layout ``L_in x D_in`` (IN_i: ``L_i x D_i``; OUT_i: ``L_i x Q/L_i``).
        out_layers, out_width: output layout (IN_i: ``1 x Q``; OUT_i: ``L_i x D_i``).
        model_width: D_i of the model this adapter belongs to; sets ``D' = embed_dim_factor * D_i``.
        cfg: the space config (sizes, switches).
    """

    def __init__(self, in_layers: int, in_width: int, out_layers: int, out_width: int, model_width: int,
                 cfg: SpaceConfig):
        super().__init__()
        for what, v in (("in_layers", in_layers), ("in_width", in_width), ("out_layers", out_layers),
                        ("out_width", out_width), ("model_width", model_width)):
            if v < 1:
                raise ValueError(f"LayerwiseTranslator: {what} must be >= 1, got {v}")
        self.in_layers, self.in_width = in_layers, in_width
        self.out_layers, self.out_width = out_layers, out_width
        d_in_flat, d_out_flat = in_layers * in_width, out_layers * out_width
        self.use_stack, self.use_short = cfg.stack, cfg.short_path
        self.per_layer = cfg.output_layout == "per_layer"
        if self.per_layer and d_out_flat % in_layers:
            raise ValueError(
                f"output 'per_layer' gives each of the {in_layers} input slices an equal share of the output "
                f"layout ({out_layers} x {out_width} = {d_out_flat}), which they do not divide"
            )
        w = d_out_flat // in_layers  # per_layer: output width per input slice (IN: Q/L_i, OUT: D_i)
        if cfg.stack:
            d = cfg.embed_dim(model_width)
            n_heads, head_dim = stack_heads(cfg, d)
            d_ff = max(1, round(cfg.translation_dim_factor * d))
            depth = min(cfg.num_layers or in_layers, in_layers)
            # merge: the input transform contracts each group of n slices into one ([L, D] -> [G, n*D] -> [G, D'])
            self.merge = 1
            if cfg.group_mode == "merge" and depth < in_layers:
                if in_layers % depth:
                    raise ValueError(
                        f"group_mode='merge' needs the {in_layers} input slices to split evenly into num_layers="
                        f"{depth} groups; choose a num_layers that divides every member's layer count"
                    )
                self.merge = in_layers // depth
            n_slices = in_layers // self.merge
            self.groups = slice_groups(n_slices, depth)
            self.embed_dim = d
            self.in_k = SliceInput(n_slices, self.merge * in_width, d, cfg.norm_eps)
            self.in_v = SliceInput(n_slices, self.merge * in_width, d, cfg.norm_eps)
            self.layers = nn.ModuleList(
                CrossAttentionLayer(d, n_heads, head_dim, d_ff, cfg.norm_eps) for _ in range(depth)
            )
            if self.per_layer:
                bounds = [(a * self.merge, b * self.merge) for a, b in self.groups]  # in input slices
                self.out_k = GroupOutput(d, bounds, w, cfg.norm_eps, zero_init=cfg.short_path)
                self.out_v = GroupOutput(d, bounds, w, cfg.norm_eps, zero_init=cfg.short_path)
            else:
                self.out_k = OutputTransform(depth * d, d_out_flat, cfg.norm_eps, zero_init=cfg.short_path)
                self.out_v = OutputTransform(depth * d, d_out_flat, cfg.norm_eps, zero_init=cfg.short_path)
        self.short_per_layer = cfg.short_layout == "per_layer"
        if cfg.short_path:
            if self.short_per_layer:
                self.short_k = SliceLinear(in_layers, in_width, w)
                self.short_v = SliceLinear(in_layers, in_width, w)
            else:
                self.short_k = init_linear(nn.Linear(d_in_flat, d_out_flat))
                self.short_v = init_linear(nn.Linear(d_in_flat, d_out_flat))

    def rescale_output(self, scale_k: Tensor, shift_k: Tensor, scale_v: Tensor, shift_v: Tensor) -> None:
        """Make the output affine-transformed, ``K -> scale_k * K + shift_k`` (likewise V), per flat output channel
        ``[L_out * D_out]``, exactly, for every input: the output is a sum of affine maps (stack output, short
        path), so each is scaled and the shift is added once."""
        for scale, shift, heads in ((scale_k, shift_k, ("out_k", "short_k")), (scale_v, shift_v, ("out_v", "short_v"))):
            parts = [getattr(self, h) for h in heads if hasattr(self, h)]
            for n, part in enumerate(parts):
                add = shift if n == len(parts) - 1 else None
                if isinstance(part, OutputTransform):
                    rescale_linear(part.proj, scale, add)
                elif isinstance(part, nn.Linear):
                    rescale_linear(part, scale, add)
                else:  # GroupOutput, SliceLinear
                    part.rescale(scale, add)

    def short_maps(self) -> tuple[nn.Module, ...]:
        """The short path's (K, V) maps (``nn.Linear`` when dense, ``SliceLinear`` per layer); none without one."""
        return (self.short_k, self.short_v) if self.use_short else ()

    def stack_forward(self, x: Tensor) -> Tensor:
        """The shared cross-attention stack: ``[N, S, L_in/m, D'] -> [N, S, G * D']`` (G = depth, m = merge)."""
        N, S, _, d = x.shape
        h = x[:, :, 0]  # [N, S, D'] query stream seeded by the first slice
        outputs = []
        for layer, (a, b) in zip(self.layers, self.groups):
            memory = x[:, :, a:b].reshape(N, S * (b - a), d)  # [N, S*n, D'] position-major
            h = layer(h, memory, b - a)  # [N, S, D']
            outputs.append(h)
        return torch.cat(outputs, dim=-1)  # [N, S, G*D']

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Translate keys and values, each ``[B, S, L_in, D_in]`` -> each ``[B, S, L_out, D_out]``."""
        check_input(keys, values, self.in_layers, self.in_width, "translator")
        B, S = keys.shape[:2]
        out_k = out_v = None
        if self.use_stack:
            grouped = (B, S, self.in_layers // self.merge, self.merge * self.in_width)
            x = torch.cat([self.in_k(keys.reshape(grouped)),  # [B, S, L_in/m, m*D_in] (m = 1 unless merging)
                           self.in_v(values.reshape(grouped))], dim=0)  # [2B, S, L_in/m, D'] K then V
            y_k, y_v = self.stack_forward(x).chunk(2, dim=0)  # each [B, S, G*D']
            out_k, out_v = self.out_k(y_k), self.out_v(y_v)  # each [B, S, L_out*D_out]
        if self.use_short:
            if self.short_per_layer:
                flat_out = (B, S, self.out_layers * self.out_width)
                short_k = self.short_k(keys).reshape(flat_out)  # [B, S, L_in, w] -> [B, S, L_out*D_out]
                short_v = self.short_v(values).reshape(flat_out)
            else:
                flat = (B, S, self.in_layers * self.in_width)
                short_k = self.short_k(keys.reshape(flat))  # [B, S, L_in*D_in] -> [B, S, L_out*D_out]
                short_v = self.short_v(values.reshape(flat))
            out_k = short_k if out_k is None else out_k + short_k
            out_v = short_v if out_v is None else out_v + short_v
        shape = (B, S, self.out_layers, self.out_width)
        return out_k.reshape(shape), out_v.reshape(shape)  # [B, S, L_out, D_out]


class LinearAdapter(nn.Module):
    """Linear baseline: one Linear for K and one for V on layer-concatenated caches.

    ``(K, V)`` each ``[B, S, L_in, D_in]`` -> flattened ``[B, S, L_in*D_in]`` -> Linear ->
    ``[B, S, L_out, D_out]``. Same call signature as :class:`LayerwiseTranslator`; built from the
    two layouts alone.
    """

    def __init__(self, in_layers: int, in_width: int, out_layers: int, out_width: int):
        super().__init__()
        self.in_layers, self.in_width = in_layers, in_width
        self.out_layers, self.out_width = out_layers, out_width
        self.k = init_linear(nn.Linear(in_layers * in_width, out_layers * out_width))
        self.v = init_linear(nn.Linear(in_layers * in_width, out_layers * out_width))

    def rescale_output(self, scale_k: Tensor, shift_k: Tensor, scale_v: Tensor, shift_v: Tensor) -> None:
        """``K -> scale_k * K + shift_k`` (likewise V) per flat output channel ``[L_out * D_out]``, exactly."""
        rescale_linear(self.k, scale_k, shift_k)
        rescale_linear(self.v, scale_v, shift_v)

    def short_maps(self) -> tuple[nn.Module, ...]:
        """The (K, V) maps: the whole adapter is a short path."""
        return self.k, self.v

    def forward(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        check_input(keys, values, self.in_layers, self.in_width, "linear adapter")
        B, S = keys.shape[:2]
        shape = (B, S, self.out_layers, self.out_width)
        flat = (B, S, self.in_layers * self.in_width)
        k = self.k(keys.reshape(flat)).reshape(shape)  # [B, S, L_in*D_in] -> [B, S, L_out, D_out]
        v = self.v(values.reshape(flat)).reshape(shape)
        return k, v


def build_adapter(in_layers: int, in_width: int, out_layers: int, out_width: int, model_width: int,
                  cfg: SpaceConfig) -> nn.Module:
    """The adapter ``cfg.adapter`` names, for the given layouts."""
    if cfg.adapter == "linear":
        return LinearAdapter(in_layers, in_width, out_layers, out_width)
    return LayerwiseTranslator(in_layers, in_width, out_layers, out_width, model_width, cfg)
