"""The shared space Σ on a heterogeneous pool: shapes, paths, files, growth, and that it can learn."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvlingua.backend import suffix_token_nll
from kvlingua.cache import ArchSummary, KVBlock, arch_summary, extract_prefix
from kvlingua.space import LatentBlock, SharedSpace, adapter_file, identity_translate
from kvlingua.space_config import SpaceConfig
from tests.helpers import tiny_model

torch.set_num_threads(1)
Q = 32


@pytest.fixture(scope="module")
def models():
    """A Gemma-2 (L=2, D=8, 1 kv head) and a Llama (L=4, D=16, 2 kv heads)."""
    return {
        "gem": tiny_model("gemma2", seed=0, layers=2),
        "lla": tiny_model("llama", seed=1, layers=4, hidden=64, kv_heads=2, head_dim=8),
    }


@pytest.fixture(scope="module")
def summaries(models):
    return {n: arch_summary(m) for n, m in models.items()}


@pytest.fixture(scope="module")
def blocks(models):
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    return {n: extract_prefix(m, ids) for n, m in models.items()}


def _space(summaries, seed=0, **kw) -> SharedSpace:
    torch.manual_seed(seed)
    return SharedSpace(summaries, SpaceConfig(q_dim=Q, **kw))


def _randomise(space: SharedSpace, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in space.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("kw", [{}, {"adapter": "linear"}, {"num_layers": 1}, {"stack": False},
                                {"num_layers": 1, "group_mode": "merge"}])
def test_every_path_has_the_target_layout_and_feeds_the_target(models, summaries, blocks, kw):
    space = _space(summaries, **kw)
    assert space.names == ["gem", "lla"]
    for src in space.names:
        z = space.encode(blocks[src], src)
        assert z.keys.shape == z.values.shape == (2, 6, Q)
        for tgt in space.names:
            out = space.translate(blocks[src], src, tgt)
            s = summaries[tgt]
            assert out.keys.shape == (2, 6, s.num_layers, s.width) and out.n_kv_heads == s.n_kv_heads
            nll = suffix_token_nll(models[tgt], out, torch.randint(0, 128, (2, 4)))
            assert nll.shape == (2, 3) and torch.isfinite(nll).all()


def test_bad_inputs_are_named(summaries, blocks):
    three = ArchSummary("llama", 3, 1, 8, 128, 32)
    with pytest.raises(ValueError, match="q_dim=32 is not divisible by the 3 layers of model 'odd'"):
        SharedSpace({"gem": summaries["gem"], "odd": three}, SpaceConfig(q_dim=Q))
    space = _space(summaries)
    with pytest.raises(ValueError, match="does not fit model 'lla'"):
        space.encode(blocks["gem"], "lla")
    with pytest.raises(KeyError, match="unknown pool model 'nope'"):
        space.translate(blocks["gem"], "gem", "nope")
    with pytest.raises(ValueError, match=r"LatentBlock needs keys and values of equal shape \[B, S, Q\]"):
        LatentBlock(torch.zeros(1, 2, 8), torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="latent block has width 8"):
        space.decode(LatentBlock(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)), "gem")
    with pytest.raises(ValueError, match="model name 'a.b'"):
        space.add_member("a.b", summaries["gem"])
    with pytest.raises(ValueError, match="already a member"):
        space.add_member("gem", summaries["gem"])
    with pytest.raises(ValueError, match="'values' clashes"):
        space.add_member("values", summaries["gem"])


@pytest.mark.parametrize("kw", [{}, {"num_layers": 1}, {"adapter": "linear"}])
def test_empty_prefix_translates_to_an_empty_block(summaries, kw):
    space = _space(summaries, **kw)
    empty = KVBlock(torch.zeros(2, 0, 2, 8), torch.zeros(2, 0, 2, 8), 1)  # [B, 0, L, D]
    assert space.encode(empty, "gem").keys.shape == (2, 0, Q)
    assert space.translate(empty, "gem", "lla").keys.shape == (2, 0, 4, 16)


@pytest.mark.parametrize("kw", [{}, {"num_layers": 2}, {"num_layers": 2, "group_mode": "merge"}, {"adapter": "linear"}])
def test_translate_is_causal(summaries, blocks, kw):
    space = _space(summaries, **kw)
    _randomise(space)  # zero-initialised stack projections must not hide a leak
    b = blocks["lla"]
    base = space.translate(b, "lla", "gem")
    k, v = b.keys.clone(), b.values.clone()
    k[:, 3:] += torch.randn_like(k[:, 3:])
    v[:, 3:] += torch.randn_like(v[:, 3:])
    out = space.translate(KVBlock(k, v, b.n_kv_heads), "lla", "gem")
    torch.testing.assert_close(out.keys[:, :3], base.keys[:, :3], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.values[:, :3], base.values[:, :3], rtol=0, atol=1e-5)
    assert (out.keys[:, 3] - base.keys[:, 3]).abs().max() > 1e-3


def test_initial_translate_is_the_composed_short_path(summaries, blocks):
    space = _space(summaries)
    b = blocks["gem"]
    out = space.translate(b, "gem", "lla")
    s_in, s_out = space.adapters("gem")["in"], space.adapters("lla")["out"]
    for which, x, got in (("k", b.keys, out.keys), ("v", b.values, out.values)):
        lin_in, lin_out = getattr(s_in, f"short_{which}"), getattr(s_out, f"short_{which}")
        z = x.reshape(2, 6, 16) @ lin_in.weight.T + lin_in.bias  # [B, S, Q]
        ref = (z @ lin_out.weight.T + lin_out.bias).reshape(2, 6, 4, 16)  # Q read as 4 slices of 8, flat again
        torch.testing.assert_close(got, ref)


def test_without_stack_equals_a_zeroed_stack_output(summaries, blocks):
    """The stack ablation keeps the trained short path: same output as zeroing the stack's output transforms."""
    space = _space(summaries)
    _randomise(space)  # a "trained" translator: the stack contributes
    b = blocks["gem"]
    rng = torch.get_rng_state()
    twin = space.without_stack()
    assert torch.equal(torch.get_rng_state(), rng)  # building the copy draws no random numbers
    assert twin.cfg == replace(space.cfg, stack=False) and space.cfg.stack  # the copy says what it is
    bare = _space(summaries, stack=False)  # a space built without a stack has exactly the copy's tensors
    assert twin.state_dict().keys() == bare.state_dict().keys() and twin.param_counts() == bare.param_counts()
    assert all(torch.equal(t, space.state_dict()[k]) for k, t in twin.state_dict().items())
    ablated = twin.translate(b, "gem", "lla")
    assert not torch.allclose(ablated.keys, space.translate(b, "gem", "lla").keys, atol=1e-3)
    with torch.no_grad():
        for name in space.names:
            for adapter in space.adapters(name).values():
                for out in (adapter.out_k, adapter.out_v):
                    for p in out.parameters():
                        p.zero_()
    zeroed = space.translate(b, "gem", "lla")
    torch.testing.assert_close(ablated.keys, zeroed.keys)
    torch.testing.assert_close(ablated.values, zeroed.values)
    with pytest.raises(ValueError, match="stack"):
        _space(summaries, adapter="linear").without_stack()
    with pytest.raises(ValueError, match="short path"):
        _space(summaries, short_path=False).without_stack()


def test_identity_baseline(summaries, blocks):
    gem = summaries["gem"]
    out = identity_translate(blocks["gem"], gem, gem)
    assert torch.equal(out.keys, blocks["gem"].keys) and out.n_kv_heads == 1
    with pytest.raises(ValueError, match=r"source has 2 layers x 1 kv heads x 8 \(D=8\), target has 4 layers x "
                                         r"2 kv heads x 8 \(D=16\)"):
        identity_translate(blocks["gem"], gem, summaries["lla"])


def _save_adapters(space: SharedSpace, out) -> None:
    """The adapter files a pool directory holds (``kvlingua.pool`` writes them the same way)."""
    for n in space.names:
        save_file(space.adapter_state(n), str(out / adapter_file(n)))


def test_adapter_files_load_into_a_fresh_space_bit_identically(tmp_path, summaries, blocks):
    space = _space(summaries)
    _randomise(space)
    _save_adapters(space, tmp_path)
    loaded = _space(summaries, seed=5)
    for n in loaded.names:
        loaded.load_adapter_file(n, tmp_path / adapter_file(n))
    for src, tgt in (("gem", "lla"), ("lla", "lla")):
        a, b = space.translate(blocks[src], src, tgt), loaded.translate(blocks[src], src, tgt)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_tampered_adapter_file_is_refused(tmp_path, summaries):
    space = _space(summaries)
    _save_adapters(space, tmp_path)
    f = tmp_path / "adapters-lla.safetensors"
    state = load_file(str(f))
    state["in.short_k.weight"] = state["in.short_k.weight"][:, :8].contiguous()
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"model 'lla': adapter tensor 'in.short_k.weight' .* shape \(32, 8\), "
                                         r"the space config needs \(32, 64\)"):
        space.load_adapter_file("lla", f)
    del state["in.short_k.weight"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"model 'lla'.*missing tensors \['in.short_k.weight'\]"):
        space.load_adapter_file("lla", f)
    f.unlink()
    with pytest.raises(FileNotFoundError, match="model 'lla': adapter file not found"):
        space.load_adapter_file("lla", f)


def test_add_member_leaves_existing_adapters_untouched(summaries, blocks):
    space = SharedSpace({"gem": summaries["gem"]}, SpaceConfig(q_dim=Q))
    before = {k: t.clone() for k, t in space.state_dict().items()}
    cyc = space.translate(blocks["gem"], "gem", "gem")
    space.add_member("lla", summaries["lla"])
    after = space.state_dict()
    assert all(torch.equal(after[k], t) for k, t in before.items())
    assert torch.equal(space.translate(blocks["gem"], "gem", "gem").keys, cyc.keys)
    new = {id(p) for p in space.parameters_of(["lla"])}
    old = {id(p) for p in space.parameters_of(["gem"])}
    assert new.isdisjoint(old) and len(new) + len(old) == len(list(space.parameters()))


def test_param_counts_grow_linearly_with_the_pool(summaries):
    """Two adapters per model, never N²: a pool of n copies holds n × one model's adapters, and a member
    that joins adds exactly its own pair (what a one-member space of it holds), leaving the others as they were."""
    gem = summaries["gem"]
    one = SharedSpace({"m0": gem}, SpaceConfig(q_dim=Q))
    per = sum(p.numel() for p in one.parameters())
    for n in (2, 4):
        space = SharedSpace({f"m{i}": gem for i in range(n)}, SpaceConfig(q_dim=Q))
        assert sum(p.numel() for p in space.parameters()) == n * per
    space = _space({"gem": gem})
    before = space.param_counts()["gem"]
    space.add_member("lla", summaries["lla"])
    alone = sum(p.numel() for p in SharedSpace({"lla": summaries["lla"]}, SpaceConfig(q_dim=Q)).parameters())
    assert space.param_counts()["gem"] == before
    assert sum(space.param_counts()["lla"].values()) == alone
    assert sum(p.numel() for p in space.parameters()) == per + alone


def test_linear_param_counts_match_the_hand_formula(summaries):
    """The linear adapters by hand: IN_m maps L·D -> Q and OUT_m maps L·(Q/L) -> L·D, one Linear (weight + bias)
    for keys and one for values."""
    space = _space(summaries, adapter="linear")
    for name, (L, D) in {"gem": (2, 8), "lla": (4, 16)}.items():
        assert (summaries[name].num_layers, summaries[name].width) == (L, D)
        assert space.param_counts()[name] == {"in": 2 * (L * D * Q + Q), "out": 2 * (Q * L * D + L * D)}


def test_it_learns_a_reconstruction(models, summaries):
    """200 Adam steps of gem -> lla reconstruction cut the MSE >5x and beat the best linear map (least squares)."""
    ids = torch.randint(0, 128, (16, 8), generator=torch.Generator().manual_seed(1))
    src, tgt = extract_prefix(models["gem"], ids), extract_prefix(models["lla"], ids)
    torch.manual_seed(0)
    space = SharedSpace(summaries, SpaceConfig(q_dim=Q))
    opt = torch.optim.Adam(space.parameters(), lr=3e-3)

    def mse() -> torch.Tensor:
        out = space.translate(src, "gem", "lla")
        return ((out.keys - tgt.keys) ** 2).mean() + ((out.values - tgt.values) ** 2).mean()

    with torch.no_grad():
        start = mse().item()
    for _ in range(200):
        opt.zero_grad()
        loss = mse()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = mse().item()

    def lstsq_mse(x: torch.Tensor, y: torch.Tensor) -> float:  # best affine map, flattened per position
        X = torch.cat([x.reshape(-1, 16), torch.ones(x.shape[0] * x.shape[1], 1)], dim=1).double()  # [N, 17]
        Y = y.reshape(-1, 64).double()  # [N, 64]
        W = torch.linalg.lstsq(X, Y).solution
        return ((X @ W - Y) ** 2).mean().item()

    linear_best = lstsq_mse(src.keys, tgt.keys) + lstsq_mse(src.values, tgt.values)
    print(f"reconstruction MSE: start {start:.4f}, after 200 steps {end:.4f}, best linear {linear_best:.4f}")
    assert end < start / 5
    assert end < linear_best / 2
