"""The adapter module: shapes, causality, the short path, K/V parameter sharing, grouped depth, per-layer output."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvlingua.config import ConfigError, from_dict, to_dict
from kvlingua.layers import CrossAttentionLayer, GroupOutput, OutputTransform, slice_groups
from kvlingua.space_config import SpaceConfig
from kvlingua.translator import LayerwiseTranslator, LinearAdapter, build_adapter

torch.set_num_threads(1)


def _kv(B=2, S=7, L=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, L, D, generator=g), torch.randn(B, S, L, D, generator=g)


def _randomise(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter (including zero-initialised ones) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_config_checks_and_strict_loading():
    with pytest.raises(ValueError, match="adapter must be one of"):
        SpaceConfig(adapter="mlp")
    with pytest.raises(ValueError, match="at least one of short_path and stack"):
        SpaceConfig(short_path=False, stack=False)
    with pytest.raises(ValueError, match="embed_dim_factor"):
        SpaceConfig(embed_dim_factor=0)
    with pytest.raises(ValueError, match="num_layers"):
        SpaceConfig(num_layers=0)
    with pytest.raises(ValueError, match="output must be one of"):
        SpaceConfig(output="sparse")
    with pytest.raises(ValueError, match="max_share must be > 0"):
        SpaceConfig(max_share=0)
    with pytest.raises(ValueError, match=r"init_prefix_len must be None or an integer > sink_tokens \(1\), got 1"):
        SpaceConfig(init_prefix_len=1)
    with pytest.raises(ValueError, match="init_prefix_len must be None"):
        SpaceConfig(init_prefix_len=True)
    assert SpaceConfig(init_prefix_len=2, sink_tokens=1).init_prefix_len == 2
    with pytest.raises(ValueError, match=r"out_weights must be one of \['uniform', 'attention'\], got 'suffix'"):
        SpaceConfig(out_weights="suffix")
    with pytest.raises(ValueError, match="out_weights: attention weighs the closed-form start; init is 'match'"):
        SpaceConfig(init="match", out_weights="attention")
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(SpaceConfig, {"q_dim": 64, "qdim": 3})
    assert from_dict(SpaceConfig, {"q_dim": 64, "num_layers": 2}) == SpaceConfig(q_dim=64, num_layers=2)
    cfg = SpaceConfig(q_dim=48, adapter="linear", head_dim=7, stack=False)
    assert from_dict(SpaceConfig, to_dict(cfg)) == cfg


def test_heads_that_do_not_divide_embed_dim_fall_back_to_the_most_that_do():
    """A model whose D' = 5 (KV width 10 at factor 0.5) gets 1 head of 5, not a traceback after the job started."""
    t = LayerwiseTranslator(2, 10, 1, 16, 10, SpaceConfig(output="per_layer", init="random"))  # D' = 5, n_heads 4
    assert t.layers[0].n_heads == 1 and t.layers[0].q_proj.out_features == 5
    t = LayerwiseTranslator(2, 8, 1, 16, 8, SpaceConfig(n_heads=3))  # D' = 16: 2 heads of 8
    assert t.layers[0].n_heads == 2 and t.layers[0].q_proj.out_features == 16
    # an explicit head_dim keeps the heads asked for
    t = LayerwiseTranslator(2, 8, 1, 16, 8, SpaceConfig(n_heads=3, head_dim=5))
    assert t.layers[0].q_proj.out_features == 15


PER_LAYER = [SpaceConfig(output="per_layer", init="random"), SpaceConfig(output="per_layer", init="random", num_layers=3),
             SpaceConfig(output="per_layer", init="random", num_layers=2, group_mode="merge"),
             SpaceConfig(output="per_layer", init="random", short_path=False), SpaceConfig(output="per_layer", init="random", stack=False)]


@pytest.mark.parametrize("cfg", [SpaceConfig(), SpaceConfig(short_path=False), SpaceConfig(stack=False),
                                 SpaceConfig(num_layers=2), SpaceConfig(adapter="linear"), *PER_LAYER])
def test_shapes_in_and_out_layouts(cfg):
    k, v = _kv(L=4, D=16)
    enc = build_adapter(4, 16, 1, 64, 16, cfg)  # IN: [B,S,4,16] -> [B,S,1,64]
    zk, zv = enc(k, v)
    assert zk.shape == zv.shape == (2, 7, 1, 64)
    dec = build_adapter(4, 16, 4, 16, 16, cfg)  # OUT: [B,S,4,64/4] -> [B,S,4,16]
    ok, ov = dec(zk.reshape(2, 7, 4, 16), zv.reshape(2, 7, 4, 16))
    assert ok.shape == ov.shape == (2, 7, 4, 16)
    with pytest.raises(ValueError, match=r"expects keys and values \[B, S, 4, 16\]"):
        enc(k[:, :, :3], v[:, :, :3])


@pytest.mark.parametrize("cfg", [SpaceConfig(), SpaceConfig(num_layers=2), SpaceConfig(num_layers=3),
                                 SpaceConfig(num_layers=2, group_mode="merge"), SpaceConfig(short_path=False),
                                 SpaceConfig(adapter="linear"), *PER_LAYER])
def test_causal_over_positions(cfg):
    torch.manual_seed(0)
    t = build_adapter(4, 16, 2, 24, 16, cfg)
    _randomise(t)  # the zero-initialised stack projection must not hide a leak
    k, v = _kv(S=9)
    base_k, base_v = t(k, v)
    for pos in (0, 4, 7):
        k2, v2 = k.clone(), v.clone()
        k2[:, pos + 1:] += torch.randn_like(k2[:, pos + 1:])
        v2[:, pos + 1:] += torch.randn_like(v2[:, pos + 1:])
        out_k, out_v = t(k2, v2)
        torch.testing.assert_close(out_k[:, : pos + 1], base_k[:, : pos + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(out_v[:, : pos + 1], base_v[:, : pos + 1], rtol=0, atol=1e-5)
        assert (out_k[:, pos + 1] - base_k[:, pos + 1]).abs().max() > 1e-3  # the future does change the future


def test_zero_init_stack_equals_short_path():
    torch.manual_seed(0)
    t = LayerwiseTranslator(4, 16, 1, 64, 16, SpaceConfig())
    k, v = _kv()
    out_k, out_v = t(k, v)
    Wk, bk = t.short_k.weight, t.short_k.bias
    Wv, bv = t.short_v.weight, t.short_v.bias
    ref_k = (k.reshape(2, 7, 64) @ Wk.T + bk).reshape(2, 7, 1, 64)
    ref_v = (v.reshape(2, 7, 64) @ Wv.T + bv).reshape(2, 7, 1, 64)
    torch.testing.assert_close(out_k, ref_k)
    torch.testing.assert_close(out_v, ref_v)
    assert torch.count_nonzero(t.out_k.proj.weight) == 0
    # the stack is live: the gradient reaches the zero projection
    out_k.pow(2).sum().backward()
    assert t.out_k.proj.weight.grad.abs().sum() > 0


def test_ablations():
    torch.manual_seed(0)
    k, v = _kv()
    short = LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig(stack=False))
    assert not hasattr(short, "layers") and not hasattr(short, "in_k")
    ref = k.reshape(2, 7, 64) @ short.short_k.weight.T + short.short_k.bias
    torch.testing.assert_close(short(k, v)[0].reshape(2, 7, 32), ref)

    stack = LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig(short_path=False))
    assert not hasattr(stack, "short_k")
    assert torch.count_nonzero(stack.out_k.proj.weight) > 0  # no short path: the stack is initialised live
    out_k, _ = stack(k, v)
    y_k = stack.stack_forward(torch.cat([stack.in_k(k), stack.in_v(v)]))[:2]
    torch.testing.assert_close(out_k.reshape(2, 7, 32), stack.out_k(y_k))
    assert out_k.abs().sum() > 0


def test_kv_input_transforms_separate_stack_shared():
    torch.manual_seed(0)
    t = LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig())
    _randomise(t)
    names = [n for n, _ in t.named_parameters()]
    assert t.in_k.weight.data_ptr() != t.in_v.weight.data_ptr()
    assert not any(".k." in n or ".v." in n for n in names if n.startswith("layers."))  # one stack
    # a loss on the keys output alone trains the K input transform and the shared stack, never V's transform
    k, v = _kv()
    out_k, _ = t(k, v)
    out_k.pow(2).sum().backward()
    assert t.in_k.weight.grad.abs().sum() > 0
    assert t.in_v.weight.grad is None or t.in_v.weight.grad.abs().sum() == 0
    assert t.layers[0].q_proj.weight.grad.abs().sum() > 0
    # with the K-specific parts copied onto the V-specific ones, K and V take the very same route
    with torch.no_grad():
        for a, b in ((t.in_k, t.in_v), (t.out_k, t.out_v), (t.short_k, t.short_v)):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pb.copy_(pa)
    ok, ov = t(k, k)
    torch.testing.assert_close(ok, ov)


def test_slice_groups_partition():
    assert slice_groups(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert slice_groups(4, 2) == [(0, 2), (2, 4)]
    assert slice_groups(5, 2) == [(0, 3), (3, 5)]
    assert slice_groups(3, 1) == [(0, 3)]


def test_grouped_depth_attends_only_its_group():
    torch.manual_seed(0)
    t = LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig(num_layers=2))
    assert len(t.layers) == 2 and t.groups == [(0, 2), (2, 4)]
    capped = LayerwiseTranslator(2, 16, 1, 32, 16, SpaceConfig(num_layers=8))
    assert len(capped.layers) == 2
    d = t.embed_dim
    x = torch.randn(2, 5, 4, d)
    y = t.stack_forward(x)  # [2, 5, 2*d]
    x2 = x.clone()
    x2[:, :, 3] += torch.randn(2, 5, d)  # a slice of the second group (not a constant: LayerNorm removes those)
    y2 = t.stack_forward(x2)
    torch.testing.assert_close(y2[..., :d], y[..., :d])  # layer 0 never sees slice 3
    assert (y2[..., d:] - y[..., d:]).abs().max() > 1e-3
    x3 = x.clone()
    x3[:, :, 1] += torch.randn(2, 5, d)  # second slice of the first group
    assert (t.stack_forward(x3)[..., :d] - y[..., :d]).abs().max() > 1e-3


def test_merged_groups_contract_slices_in_the_input_transform():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="group_mode='merge' needs the 4 input slices to split evenly"):
        LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig(num_layers=3, group_mode="merge"))
    t = LayerwiseTranslator(4, 16, 1, 32, 16, SpaceConfig(num_layers=2, group_mode="merge"))
    d = t.embed_dim
    assert t.in_k.weight.shape == (2, 32, d) and len(t.layers) == 2 and t.groups == [(0, 1), (1, 2)]
    first = []
    t.layers[0].register_forward_hook(lambda mod, args, out: first.append(out.detach()))
    k, v = _kv()
    t(k, v)
    k2 = k.clone()
    k2[:, :, 3] += torch.randn(2, 7, 16)  # slice 3 belongs to the second group
    t(k2, v)
    torch.testing.assert_close(first[1], first[0])  # layer 0 reads only slices 0-1
    k3 = k.clone()
    k3[:, :, 1] += torch.randn(2, 7, 16)
    t(k3, v)
    assert (first[2] - first[0]).abs().max() > 1e-3
    # the contraction is one Linear per group on the concatenated slices, as a direct computation shows
    x = F.layer_norm(k.reshape(2, 7, 2, 32), (32,)) * t.in_k.norm_weight + t.in_k.norm_bias
    ref = F.gelu(torch.stack([x[:, :, g] @ t.in_k.weight[g] + t.in_k.bias[g] for g in range(2)], dim=2))
    torch.testing.assert_close(t.in_k(k.reshape(2, 7, 2, 32)), ref)


def test_cross_attention_matches_explicit_loop():
    """Grouped causal cross-attention against a per-position softmax written out by hand."""
    torch.manual_seed(0)
    d, H, hd, n, S = 12, 3, 4, 2, 5
    layer = CrossAttentionLayer(d, H, hd, 16, 1e-5)
    _randomise(layer)
    h, mem = torch.randn(1, S, d), torch.randn(1, S * n, d)
    out = layer(h, mem, n)[0]
    q = layer.q_proj(layer.norm_q(h))[0].view(S, H, hd)
    m = layer.norm_mem(mem)[0]
    k, v = layer.k_proj(m).view(S * n, H, hd), layer.v_proj(m).view(S * n, H, hd)
    for t in range(S):
        visible = (t + 1) * n  # positions 0..t, all n slices each (position-major)
        heads = []
        for i in range(H):
            w = torch.softmax(k[:visible, i] @ q[t, i] / math.sqrt(hd), dim=0)
            heads.append(w @ v[:visible, i])
        r = h[0, t] + layer.o_proj(torch.cat(heads))
        r = r + layer.ff_down(F.gelu(layer.ff_up(layer.norm_ff(r))))
        torch.testing.assert_close(out[t], r, rtol=1e-4, atol=1e-5)


def test_linear_adapter_is_one_matmul_per_kv():
    torch.manual_seed(0)
    a = LinearAdapter(4, 16, 2, 8)
    k, v = _kv()
    ok, ov = a(k, v)
    torch.testing.assert_close(ok, (k.reshape(2, 7, 64) @ a.k.weight.T + a.k.bias).reshape(2, 7, 2, 8))
    torch.testing.assert_close(ov, (v.reshape(2, 7, 64) @ a.v.weight.T + a.v.bias).reshape(2, 7, 2, 8))
    assert sum(p.numel() for p in a.parameters()) == 2 * (64 * 16 + 16)


# ---------------------------------------------------------------------------------------------- per-layer output
def test_auto_output_builds_dense_until_resolved_and_widths_follow_the_layout():
    assert SpaceConfig().output == "auto" and SpaceConfig().output_layout == "dense"
    assert SpaceConfig().embed_factor == 2.0 and SpaceConfig(output="per_layer", init="random").embed_factor == 0.5
    assert SpaceConfig(output="per_layer", init="random", embed_dim_factor=3.0).embed_factor == 3.0
    dense = build_adapter(4, 16, 4, 16, 16, SpaceConfig())
    assert isinstance(dense.out_k, OutputTransform) and dense.embed_dim == 32
    per = build_adapter(4, 16, 4, 16, 16, SpaceConfig(output="per_layer", init="random"))
    assert isinstance(per.out_k, GroupOutput) and per.embed_dim == 8
    with pytest.raises(ValueError, match="equal share of the output layout"):
        build_adapter(4, 16, 1, 30, 16, SpaceConfig(output="per_layer", init="random"))  # 30 outputs over 4 slices


def _per_layer_count(L: int, d_in: int, w: int, D: int) -> int:
    """IN or OUT parameters of a full-depth per_layer translator, written out by hand.

    Input slices ``L x d_in``, output chunk ``w`` per slice, model width ``D`` (D' = D/2, 4 heads of
    D'/4, FFN D'): per slice and K/V a LayerNorm (2*d_in) and Linear (d_in*D' + D'); per stack layer
    three LayerNorms (6*D'), q/k/v/o (4*(D'^2 + D')) and the FFN (2*D'^2 + 2*D'); per group (= slice)
    and K/V an output LayerNorm (2*D') and Linear (D'*w + w); per slice and K/V a short Linear (d_in*w + w).
    """
    d = D // 2
    per_slice_kv = (2 * d_in + d_in * d + d) + (2 * d + d * w + w) + (d_in * w + w)
    per_stack_layer = 6 * d + 4 * (d * d + d) + 2 * d * d + 2 * d
    return L * (2 * per_slice_kv + per_stack_layer)


def test_per_layer_param_count_is_linear_in_depth():
    D, w = 16, 4  # Q = w * L grows with depth, as Q = 32 * L does at real shapes
    n = lambda m: sum(p.numel() for p in m.parameters())
    for L in (2, 3, 5, 8):
        cfg = SpaceConfig(q_dim=w * L, output="per_layer", init="random")
        assert n(build_adapter(L, D, 1, w * L, D, cfg)) == _per_layer_count(L, D, w, D)  # IN
        assert n(build_adapter(L, w, L, D, D, cfg)) == _per_layer_count(L, w, D, D)  # OUT
    # the paper's dense output grows faster than linearly: 4x deeper is more than 4x larger
    dense = lambda L: n(build_adapter(L, w, L, D, D, SpaceConfig(q_dim=w * L, output="dense")))
    assert dense(8) > 5 * dense(2)


def test_per_layer_zero_init_stack_equals_per_slice_short_path():
    torch.manual_seed(0)
    t = build_adapter(4, 16, 4, 16, 16, SpaceConfig(output="per_layer", init="random"))  # OUT-like: chunk l = model layer l
    k, v = _kv()
    out_k, out_v = t(k, v)
    for out, x, short in ((out_k, k, t.short_k), (out_v, v, t.short_v)):
        for l in range(4):
            torch.testing.assert_close(out[:, :, l], x[:, :, l] @ short.weight[l] + short.bias[l])
    assert all(torch.count_nonzero(h.proj.weight) == 0 for h in t.out_k.heads)
    out_k.pow(2).sum().backward()
    assert all(h.proj.weight.grad.abs().sum() > 0 for h in t.out_k.heads)  # the stack is live


def test_per_layer_group_writes_only_its_own_chunks():
    """Stack only, two groups of two slices: output layers 0-1 never see input slices 2-3."""
    torch.manual_seed(0)
    t = build_adapter(4, 16, 4, 16, 16, SpaceConfig(output="per_layer", init="random", num_layers=2, short_path=False))
    _randomise(t)
    k, v = _kv()
    base_k, _ = t(k, v)
    k2 = k.clone()
    k2[:, :, 3] += torch.randn(2, 7, 16)
    out_k, _ = t(k2, v)
    torch.testing.assert_close(out_k[:, :, :2], base_k[:, :, :2])
    assert (out_k[:, :, 2:] - base_k[:, :, 2:]).abs().max() > 1e-3
    k3 = k.clone()
    k3[:, :, 0] += torch.randn(2, 7, 16)  # slice 0 seeds the query stream, which reaches every group
    assert (t(k3, v)[0][:, :, 3] - base_k[:, :, 3]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [dict(output="dense"), dict(output="per_layer", init="random"), dict(output="per_layer", init="random", num_layers=2),
                                dict(output="dense", short_path=False), dict(output="per_layer", init="random", stack=False),
                                dict(adapter="linear")], ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_rescale_output_is_an_exact_affine_map_of_the_output(kw):
    """out -> scale * out + shift per flat channel, for any weights (stack and short path both live)."""
    torch.manual_seed(0)
    t = build_adapter(4, 16, 2, 24, 16, SpaceConfig(**kw))  # [.., 4, 16] -> [.., 2, 24]
    _randomise(t)
    k, v = _kv()
    before_k, before_v = t(k, v)
    g = torch.Generator().manual_seed(3)
    scale_k, shift_k, scale_v, shift_v = (torch.randn(48, generator=g) for _ in range(4))
    t.rescale_output(scale_k, shift_k, scale_v, shift_v)
    after_k, after_v = t(k, v)
    torch.testing.assert_close(after_k.flatten(2), before_k.flatten(2) * scale_k + shift_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after_v.flatten(2), before_v.flatten(2) * scale_v + shift_v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="init"):
        SpaceConfig(init="lsuv")
