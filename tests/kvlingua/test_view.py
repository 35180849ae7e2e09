"""The target's own sink and keys without rotation: a cache read through a view is the model's own cache."""
from __future__ import annotations

import pytest
import torch

from kvlingua.backend import LocalBackend, suffix_token_nll
from kvlingua.cache import KVBlock, arch_summary, extract_prefix
from kvlingua.generate import GenerationParams, handoff_generate
from kvlingua.mixed import mixed_generate
from kvlingua.rotary import KeyRotation
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import CacheView
from tests.helpers import tiny_model

torch.set_num_threads(1)
IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(0))  # [B, P+S]
P = 12


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def model(request):
    return tiny_model(request.param, seed=0, layers=3, kv_heads=2, sliding_window=4)


@pytest.mark.parametrize("sink,unrotate", [(0, False), (1, True), (4, True), (2, False)])
def test_to_space_then_to_cache_is_the_models_own_cache(model, sink, unrotate):
    view = CacheView(sink, unrotate)
    own = extract_prefix(model, IDS[:, :P])  # [B, P, L, D]
    rot = KeyRotation.from_model(model)
    body = view.to_space(own, rot)
    assert body.seq_len == P - sink
    back = view.to_cache(body, rot, extract_prefix(model, IDS[:, :sink]) if sink else None)
    # the sink is read on its own: the same numbers up to float rounding of other matmul shapes
    assert torch.allclose(back.keys, own.keys, atol=1e-5) and torch.allclose(back.values, own.values, atol=1e-6)
    suffix = IDS[:, P:]
    ref = suffix_token_nll(model, own, suffix)
    assert torch.allclose(suffix_token_nll(model, back, suffix), ref, atol=1e-5)


def test_unrotated_keys_are_the_same_token_at_every_position(model):
    """Σ's view of a repeated token: one layer-0 key, wherever the token stands (an independent fact of RoPE)."""
    ids = torch.full((1, 9), 7)
    own = extract_prefix(model, ids)
    body = CacheView(1, True).to_space(own, KeyRotation.from_model(model))  # positions 1..8, position-free
    k0 = body.keys[0, :, 0]  # [8, D] layer 0
    assert (own.keys[0, 1:, 0] - own.keys[0, 1, 0]).abs().max() > 1e-3  # rotated: differ by position
    assert (k0 - k0[0]).abs().max() < 1e-5


def test_a_segment_after_the_start_keeps_no_sink(model):
    view = CacheView(2, True)
    own = extract_prefix(model, IDS[:, :P])
    rot = KeyRotation.from_model(model)
    seg = KVBlock(own.keys[:, 5:], own.values[:, 5:], own.n_kv_heads)
    body = view.to_space(seg, rot, start=5)
    assert body.seq_len == seg.seq_len
    back = view.to_cache(body, rot, None, start=5)
    assert torch.allclose(back.keys, seg.keys, atol=1e-5)


def test_missing_sink_and_too_short_prefix_are_named():
    view = CacheView(2, False)
    block = KVBlock(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), 1)
    with pytest.raises(ValueError, match="sink block of 2"):
        view.to_cache(block, None, None)
    with pytest.raises(ValueError, match="nothing for Σ"):
        view.check_prefix(2)
    with pytest.raises(ValueError, match="rotary embedding"):
        CacheView(0, True).to_space(block, None)


def identity_space(models: dict, cfg: SpaceConfig) -> SharedSpace:
    """A linear space whose IN and OUT are identities (Q = L*D for every member): a lossless Σ."""
    s = next(iter(models.values()))
    summary = arch_summary(s)
    space = SharedSpace({n: arch_summary(m) for n, m in models.items()}, cfg)
    eye = torch.eye(summary.num_layers * summary.width)
    with torch.no_grad():
        for n in models:
            for side in ("in", "out"):
                for lin in (space.adapters(n)[side].k, space.adapters(n)[side].v):
                    lin.weight.copy_(eye)
                    lin.bias.zero_()
    return space.eval().requires_grad_(False)


@pytest.mark.parametrize("sink", [0, 1, 3])
def test_latent_handoff_through_a_lossless_space_is_the_text_handoff(sink):
    """With identity adapters between two copies of one model, the sink, un-rotation at the source and rotation
    at the target must give the target exactly its own cache: greedy tokens equal the text hand-off's."""
    a = tiny_model("llama", seed=3, layers=2, kv_heads=2)
    b = tiny_model("llama", seed=3, layers=2, kv_heads=2)
    models = {"a": a, "b": b}
    s = arch_summary(a)
    space = identity_space(models, SpaceConfig(adapter="linear", q_dim=s.num_layers * s.width, sink_tokens=sink))
    prompt = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 64, 12]])
    params = GenerationParams(max_new_tokens=8)
    text = handoff_generate(models, space, "a", "b", prompt, params, handoff="text").tokens
    assert handoff_generate(models, space, "a", "b", prompt, params, handoff="latent").tokens == text
    mixed = mixed_generate(models, space, prompt, [("a", 3), ("b", 3), ("a", 2)], params)
    assert mixed.tokens == text and len(mixed.switches) == 2


def test_evaluate_keeps_the_sink_in_control_and_translated_alike():
    """Σ as a lossless map scores the target's own NLL (base), and control keeps the row's own sink."""
    from kvlingua.evaluate import evaluate
    from kvlingua.batch import Batch

    a = tiny_model("gemma2", seed=4, layers=2, kv_heads=1)
    models = {"a": a}
    s = arch_summary(a)
    space = identity_space(models, SpaceConfig(adapter="linear", q_dim=s.num_layers * s.width, sink_tokens=2))
    backend = LocalBackend(models)
    batch = Batch.same_text(IDS, ["a"], P)
    res = evaluate(backend, [batch], [("a", "a")], {"s": space}, identity=False)
    row = res.per_batch["all"]["a->a"]
    assert row["s"][0] == pytest.approx(row["base"][0], abs=1e-5)
    control_ids = torch.cat([IDS[:, :2], IDS.roll(1, 0)[:, 2:P]], dim=1)  # own sink, another row's content
    want = suffix_token_nll(a, extract_prefix(a, control_ids), IDS[:, P:]).mean(1).mean().item()
    assert row["control"][0] == pytest.approx(want, abs=1e-5)
