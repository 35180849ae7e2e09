"""Building blocks of the adapters in :mod:`kvlingua.translator`: per-slice input transform, causal
cross-attention layer, output transforms (the paper's dense one and the depth-local ``per_layer`` ones) and the
block-diagonal short path.

An adapter's last maps are affine, so its output can be rescaled exactly (``out -> scale * out + shift`` per flat
output channel): :func:`rescale_linear` for a Linear, ``rescale`` on :class:`GroupOutput` and :class:`SliceLinear`;
:meth:`~kvlingua.translator.LayerwiseTranslator.rescale_output` applies them for ``out_init: match``
(:mod:`kvlingua.outinit`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def init_linear(linear: nn.Linear) -> nn.Linear:
    """Variance-preserving init (std 1/sqrt(fan_in)), zero bias: a cache keeps its scale through it."""
    nn.init.normal_(linear.weight, std=1.0 / math.sqrt(linear.in_features))
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def check_input(keys: Tensor, values: Tensor, layers: int, width: int, who: str) -> None:
    """Raise ValueError unless keys and values are both ``[B, S, layers, width]``."""
    if keys.dim() != 4 or tuple(keys.shape[2:]) != (layers, width) or keys.shape != values.shape:
        raise ValueError(
            f"{who} expects keys and values [B, S, {layers}, {width}], got {tuple(keys.shape)} and {tuple(values.shape)}"
        )


def slice_groups(n_slices: int, n_groups: int) -> list[tuple[int, int]]:
    """Split ``n_slices`` into ``n_groups`` contiguous ``(start, end)`` ranges, sizes differing by <= 1."""
    base, extra = divmod(n_slices, n_groups)
    bounds, start = [], 0
    for g in range(n_groups):
        end = start + base + (1 if g < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


class SliceInput(nn.Module):
    """Per-slice LayerNorm -> Linear -> GELU: ``[N, S, L, D_in] -> [N, S, L, D']``, own weights per slice."""

    def __init__(self, n_slices: int, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.ones(n_slices, d_in))  # [L, D_in]
        self.norm_bias = nn.Parameter(torch.zeros(n_slices, d_in))  # [L, D_in]
        self.weight = nn.Parameter(torch.randn(n_slices, d_in, d_out) / math.sqrt(d_in))  # [L, D_in, D']
        self.bias = nn.Parameter(torch.zeros(n_slices, d_out))  # [L, D']

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.norm_weight + self.norm_bias  # [N, S, L, D_in]
        return F.gelu(torch.einsum("nsld,lde->nsle", x, self.weight) + self.bias)  # [N, S, L, D']


class CrossAttentionLayer(nn.Module):
    """One pre-norm layer: causal cross-attention of the query stream to its slices, then a GELU FFN.

    Args of forward:
        h: ``[N, S, D']`` query stream.
        memory: ``[N, S * n, D']`` the ``n`` slices of this layer, position-major (position s, slice j
            at index ``s * n + j``).
        n: slices per position in ``memory``.
    Returns ``[N, S, D']``.
    """

    def __init__(self, d: int, n_heads: int, head_dim: int, d_ff: int, eps: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        inner = n_heads * head_dim
        self.norm_q = nn.LayerNorm(d, eps=eps)
        self.norm_mem = nn.LayerNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, inner)
        self.k_proj = nn.Linear(d, inner)
        self.v_proj = nn.Linear(d, inner)
        self.o_proj = nn.Linear(inner, d)
        self.norm_ff = nn.LayerNorm(d, eps=eps)
        self.ff_up = nn.Linear(d, d_ff)
        self.ff_down = nn.Linear(d_ff, d)

    def _heads(self, x: Tensor) -> Tensor:
        N, T, _ = x.shape
        return x.view(N, T, self.n_heads, self.head_dim).transpose(1, 2)  # [N, H, T, hd]

    def forward(self, h: Tensor, memory: Tensor, n: int) -> Tensor:
        N, S, _ = h.shape
        mem = self.norm_mem(memory)  # [N, S*n, D']
        q = self._heads(self.q_proj(self.norm_q(h)))  # [N, H, S, hd]
        k = self._heads(self.k_proj(mem))  # [N, H, S*n, hd]
        v = self._heads(self.v_proj(mem))  # [N, H, S*n, hd]
        if n == 1:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [N, H, S, hd]
        else:
            causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()  # [S, S]: s <= t
            mask = causal.repeat_interleave(n, dim=1)  # [S, S*n]: (t, s*n+j) visible iff s <= t
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [N, H, S, hd]
        att = att.transpose(1, 2).reshape(N, S, self.n_heads * self.head_dim)  # [N, S, H*hd]
        h = h + self.o_proj(att)
        return h + self.ff_down(F.gelu(self.ff_up(self.norm_ff(h))))  # [N, S, D']


class OutputTransform(nn.Module):
    """LayerNorm -> Linear on the concatenated layer outputs: ``[N, S, G*D'] -> [N, S, L_out*D_out]``."""

    def __init__(self, d_in: int, d_out: int, eps: float, zero_init: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_in, eps=eps)
        self.proj = init_linear(nn.Linear(d_in, d_out))
        if zero_init:
            nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


@torch.no_grad()
def rescale_linear(linear: nn.Linear, scale: Tensor, shift: Tensor | None) -> None:
    """``y -> scale * y + shift`` for ``y = linear(x)``: rows of the weight and the bias, ``scale`` ``[out]``."""
    linear.weight.mul_(scale[:, None])  # [out, in]
    if linear.bias is not None:
        linear.bias.mul_(scale)
        if shift is not None:
            linear.bias.add_(shift)


class GroupOutput(nn.Module):
    """``per_layer`` output transform: stack layer g's output -> only its own group's output slices.

    ``[N, S, G*D'] -> [N, S, L_in*w]``: group g covers input slices ``a..b`` and writes output chunks
    ``a..b`` of width ``w`` each (LayerNorm -> Linear ``D' -> (b-a)*w``, like :class:`OutputTransform`
    per group). Parameters: ``sum_g (2*D' + D'*(b-a)*w + (b-a)*w) = G*2*D' + L_in*w*(D' + 1)``, linear in depth.
    """

    def __init__(self, d: int, bounds: list[tuple[int, int]], w: int, eps: float, zero_init: bool):
        super().__init__()
        self.d = d
        self.heads = nn.ModuleList(OutputTransform(d, (b - a) * w, eps, zero_init) for a, b in bounds)

    def rescale(self, scale: Tensor, shift: Tensor | None) -> None:
        """``out -> scale * out + shift`` on the flat output ``[L_in*w]`` (head g owns a contiguous range)."""
        start = 0
        for head in self.heads:
            n = head.proj.out_features
            rescale_linear(head.proj, scale[start:start + n], None if shift is None else shift[start:start + n])
            start += n

    def forward(self, y: Tensor) -> Tensor:
        N, S, _ = y.shape
        y = y.view(N, S, len(self.heads), self.d)  # [N, S, G, D']
        return torch.cat([head(y[:, :, g]) for g, head in enumerate(self.heads)], dim=-1)  # [N, S, L_in*w]


class SliceLinear(nn.Module):
    """``per_layer`` short path: a Linear per slice, ``[N, S, L, D_in] -> [N, S, L, w]`` (block-diagonal)."""

    def __init__(self, n_slices: int, d_in: int, w: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_slices, d_in, w) / math.sqrt(d_in))  # [L, D_in, w]
        self.bias = nn.Parameter(torch.zeros(n_slices, w))  # [L, w]

    @torch.no_grad()
    def rescale(self, scale: Tensor, shift: Tensor | None) -> None:
        """``out -> scale * out + shift`` on the flat output ``[L*w]``."""
        L, _, w = self.weight.shape
        self.weight.mul_(scale.view(L, 1, w))  # [L, D_in, w]
        self.bias.mul_(scale.view(L, w))  # [L, w]
        if shift is not None:
            self.bias.add_(shift.view(L, w))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nsld,ldw->nslw", x, self.weight) + self.bias  # [N, S, L, w]
