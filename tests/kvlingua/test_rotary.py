"""Key un-rotation checked against computations that do not use kvlingua.rotary: the model's own
projections, its own caches read at shifted positions, and its suffix NLL."""
import functools
import pickle
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from kvlingua.backend import suffix_token_nll
from kvlingua.cache import (
    CacheAPIError,
    KVBlock,
    arch_summary,
    block_from_cache,
    cache_kwargs,
    extract_prefix,
    returned_cache,
)
from kvlingua.rotary import KeyRotation, rotation_errors
from tests.helpers import VOCAB, tiny_model

# llama_yarn: cos/sin carry attention_scaling 1.5; phi, gpt_neox: half of each head rotated
ROPE_KINDS = ["llama", "llama_yarn", "gemma2", "gemma3", "qwen2", "qwen3", "phi", "gpt_neox"]
NO_GQA = {"phi", "gpt_neox", "gptj", "gpt2"}  # one kv head per query head
WINDOW = 4  # sliding window of gemma2 / gemma3; prefixes below are longer


@functools.cache
def built(kind: str):
    """(frozen tiny model, its verified KeyRotation); built once per kind for the whole module."""
    kw = {"kv_heads": 4} if kind in NO_GQA else {"kv_heads": 2}
    model = tiny_model(kind, layers=4 if kind == "smollm3" else 2, sliding_window=WINDOW, **kw)
    rotation = KeyRotation.from_model(model, verify=kind not in ("gptj", "smollm3"))
    return model, rotation


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def block_at(model, input_ids: torch.Tensor, start: int) -> KVBlock:
    """The model's own cache for ``input_ids`` read at positions ``start..`` (its forward, no kvlingua.rotary)."""
    B, S = input_ids.shape
    pos = torch.arange(start, start + S).expand(B, S)  # [B, S]
    out = model(input_ids=input_ids, position_ids=pos, use_cache=True, **cache_kwargs(model, DynamicCache()))
    return block_from_cache(returned_cache(model, out), arch_summary(model).n_kv_heads)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_same_token_layer0_key_is_position_free_after_unrotate(kind):
    model, rot = built(kind)
    assert rot.kind == "rope" and rot.check_err < 1e-5 and rot.shift_err < 1e-5
    block = extract_prefix(model, torch.full((1, 12), 7))  # one token at 12 positions
    before = block.keys[:, :, 0]  # [1, 12, D] layer 0
    after = rot.unrotate(block).keys[:, :, 0]
    assert rel(before, before[:, :1].expand_as(before)) > 1e-2  # RoPE made them differ
    assert rel(after, after[:, :1].expand_as(after)) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "llama_yarn"])
def test_unrotated_keys_equal_the_pre_rope_projection(kind):
    """Llama's layer-0 key before RoPE is k_proj(input_layernorm(embed(ids))): computed here by hand.

    With yarn's attention_factor 1.5, cos/sin are scaled; un-rotating by cos/-sin alone would be off by 1.5**2.
    """
    model, rot = built(kind)
    x = ids(2, 10)
    layer = model.model.layers[0]
    with torch.no_grad():
        pre = layer.self_attn.k_proj(layer.input_layernorm(model.model.embed_tokens(x)))  # [B, S, D]
    assert rel(rot.unrotate(extract_prefix(model, x)).keys[:, :, 0], pre) < 1e-5
    if kind == "llama_yarn":
        assert rot.describe()["attention_scaling"] == pytest.approx(1.5)


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_unrotate_rotate_keeps_the_suffix_nll(kind):
    model, rot = built(kind)
    x = ids(2, 18, seed=1)
    block = extract_prefix(model, x[:, :11])  # 11 > sliding window: sliding layers drop early positions
    with torch.no_grad():
        own = suffix_token_nll(model, block, x[:, 11:])  # [B, 6]
        free = rot.unrotate(block)
        again = suffix_token_nll(model, rot.rotate(free), x[:, 11:])
        unrotated_only = suffix_token_nll(model, free, x[:, 11:])
    assert (again - own).abs().max() < 1e-5
    # the rotation matters to the model (2.5e-4 .. 0.14 here: tiny random models attend almost uniformly)
    assert (unrotated_only - own).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_rotate_at_a_start_matches_the_model_reading_there(kind):
    model, rot = built(kind)
    x = ids(2, 9, seed=2)
    at0, at5 = block_at(model, x, 0), block_at(model, x, 5)
    free0, free5 = rot.unrotate(at0, start=0), rot.unrotate(at5, start=5)
    assert rel(at5.keys, at0.keys) > 1e-2
    assert rel(free5.keys, free0.keys) < 1e-5  # every layer: RoPE is the model's only use of positions
    assert rel(rot.rotate(free0, start=5).keys, at5.keys) < 1e-5
    assert rel(rot.rotate(free0, start=0).keys, at0.keys) < 1e-5
    assert rot.rotate(free0, start=5).values is free0.values


def test_rotate_then_unrotate_at_any_start_is_the_identity():
    _, rot = built("gemma3")
    g = torch.Generator().manual_seed(3)
    block = KVBlock(torch.randn(2, 7, 2, 16, generator=g), torch.randn(2, 7, 2, 16, generator=g), 2)
    for start in (0, 37, 250):
        assert rel(rot.unrotate(rot.rotate(block, start), start).keys, block.keys) < 1e-6
        assert rel(rot.rotate(rot.unrotate(block, start), start).keys, block.keys) < 1e-6


@pytest.mark.parametrize("kind", ["llama_yarn", "phi"])
def test_gradient_through_rotate_is_the_transposed_map(kind):
    """d<rotate(k), W>/dk = M^T W; M^T = a^2 M^-1 for M = a * rotation, so the grad is a^2 * unrotate(W)
    on the rotated dims and W on the dims that pass through."""
    _, rot = built(kind)
    g = torch.Generator().manual_seed(4)
    L, H, hd = rot.num_layers, rot.n_kv_heads, rot.head_dim
    keys = torch.randn(2, 6, L, H * hd, generator=g, requires_grad=True)
    w = KVBlock(torch.randn(2, 6, L, H * hd, generator=g), torch.zeros(2, 6, L, H * hd), H)
    (rot.rotate(KVBlock(keys, torch.zeros_like(keys), H), start=3).keys * w.keys).sum().backward()
    a2 = rot.describe()["attention_scaling"] ** 2
    expect = rot.unrotate(w, start=3).keys.reshape(2, 6, L, H, hd).clone()  # [B, S, L, H, hd]
    expect[..., : rot.rot_dim] *= a2
    assert rot.rot_dim == (hd if kind == "llama_yarn" else hd // 2)
    assert rel(keys.grad, expect.reshape(2, 6, L, H * hd)) < 1e-5
    k64 = torch.randn(1, 3, L, H * hd, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: rot.unrotate(KVBlock(k, k, H), start=2).keys, (k64,))


def test_interleaved_rope_gptj_is_refused():
    model = tiny_model("gptj", kv_heads=4)
    with pytest.raises(CacheAPIError, match="^gptj: .*interleaved") as err:
        KeyRotation.from_model(model)
    assert "\n" not in str(err.value)


def test_layers_without_rope_are_caught_by_the_shifted_read():
    """SmolLM3 skips RoPE on every 4th layer: layer 0 alone passes, the all-layer shift check refuses it."""
    model, unverified = built("smollm3")
    errors = rotation_errors(model, unverified)
    assert errors["check_err"] < 1e-5 and errors["shift_err"] > 0.1
    with pytest.raises(CacheAPIError, match="^smollm3: .*without RoPE"):
        KeyRotation.from_model(model)


def test_gemma3_needs_its_two_layer_types():
    model, rot = built("gemma3")
    assert rot.layer_types == ("sliding_attention", "full_attention")
    full_only = replace(rot, layer_types=("full_attention",) * 2)
    sliding_only = replace(rot, layer_types=("sliding_attention",) * 2)
    assert rotation_errors(model, full_only)["check_err"] > 1e-2  # layer 0 is a sliding layer
    assert rotation_errors(model, sliding_only)["shift_err"] > 1e-2  # layer 1 is a full layer
    block = extract_prefix(model, ids(1, 10))
    assert rel(full_only.unrotate(block).keys[:, :, 0], rot.unrotate(block).keys[:, :, 0]) > 1e-2


def test_no_rope_model_gets_the_identity():
    model = tiny_model("gpt2", kv_heads=4)
    rot = KeyRotation.from_model(model)
    assert rot.kind == "none" and rot.describe() == {"kind": "none", "model_type": "gpt2"}
    block = extract_prefix(model, ids(1, 6))
    assert rot.unrotate(block, start=3) is block and rot.rotate(block) is block
    assert KeyRotation.none().unrotate(block) is block


def test_pickle_round_trip_gives_the_same_results():
    _, rot = built("gemma3")
    back = pickle.loads(pickle.dumps(rot))
    block = KVBlock(torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16), 2)
    assert torch.equal(back.unrotate(block, 4).keys, rot.unrotate(block, 4).keys)
    assert torch.equal(back.rotate(block, 4).keys, rot.rotate(block, 4).keys)
    assert back.describe() == rot.describe()


def test_dtype_kept_and_layout_checked():
    _, rot = built("llama")
    block = KVBlock(torch.randn(1, 4, 2, 16, dtype=torch.bfloat16), torch.randn(1, 4, 2, 16), 2)
    out = rot.unrotate(block)
    assert out.keys.dtype == torch.bfloat16 and out.values is block.values
    with pytest.raises(ValueError, match="does not fit the key rotation of llama"):
        rot.unrotate(KVBlock(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16), 2))
    with pytest.raises(ValueError, match="start"):
        rot.rotate(block, start=-1)
