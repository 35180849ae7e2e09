"""The token prior (kvlingua.prior): its lookup against a per-position loop, its fits against means computed here,
and its fit on a pool, gate included, against an independent suffix NLL."""
from __future__ import annotations

import pytest
import torch

from kvlingua.align import read_along
from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock
from kvlingua.closedform import closed_form_init
from kvlingua.prior import TokenPrior
from kvlingua.prior_fit import PRIOR_SHRINK, _fit_slots, _token_stats, fit_token_prior
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import CacheView
from tests.helpers import tiny_model
from tests.kvlingua.test_closedform import batches

torch.set_num_threads(1)


def test_fresh_prior_is_the_identity_and_a_set_one_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    B, S, L, D = 2, 7, 3, 4
    block = KVBlock(torch.randn(B, S, L, D, generator=g), torch.randn(B, S, L, D, generator=g), 1)
    ids = torch.randint(0, 6, (B, S), generator=g)
    prior = TokenPrior(4, L, D)
    same = prior(block, ids)
    assert torch.equal(same.keys, block.keys) and torch.equal(same.values, block.values)
    prior.ids.copy_(torch.tensor([-1, 1, 3, 4]))
    for kind in ("keys", "values"):
        getattr(prior, f"scale_{kind}").copy_(torch.randint(0, 2, (4, L), generator=g).float())
        getattr(prior, f"shift_{kind}").copy_(torch.randn(4, L, D, generator=g))
    got = prior(block, ids)
    slots = {1: 1, 3: 2, 4: 3}
    for kind in ("keys", "values"):
        want = getattr(block, kind).clone()
        for b in range(B):
            for s in range(S):
                t = int(ids[b, s])
                if t in slots:
                    i = slots[t]
                    want[b, s] = (getattr(prior, f"scale_{kind}")[i][:, None] * want[b, s]
                                  + getattr(prior, f"shift_{kind}")[i])
        torch.testing.assert_close(getattr(got, kind), want)
    with pytest.raises(ValueError, match="do not match"):
        prior(block, ids[:, :3])


def test_fits_replace_a_context_free_token_and_correct_a_shifted_one():
    """Token 0: the target's entries are one constant, Σ decodes them with noise -> replaced by that constant.
    Token 1: the target's entries are Σ's plus a fixed offset -> corrected by the shrunk offset. Token 2: seen once
    -> left alone."""
    g = torch.Generator().manual_seed(1)
    L, D, n = 2, 3, 40
    const, offset = torch.randn(L, D, generator=g), torch.randn(L, D, generator=g)
    ids = torch.tensor([[0] * n + [1] * n + [2]])  # [1, 2n+1]
    decoded = torch.randn(1, 2 * n + 1, L, D, generator=g)
    own = decoded.clone()
    own[0, :n] = const
    own[0, n:2 * n] = decoded[0, n:2 * n] + offset
    slot_of = torch.tensor([0, 1, 2])
    stats = _token_stats(slot_of, ids, KVBlock(own, own, 1), KVBlock(decoded, decoded, 1), 3)
    fitted = _fit_slots(stats, PRIOR_SHRINK)
    for kind in ("keys", "values"):
        scale, shift = fitted[f"scale_{kind}"], fitted[f"shift_{kind}"]
        assert torch.equal(scale[0], torch.zeros(L)) and torch.equal(scale[1:], torch.ones(2, L))
        torch.testing.assert_close(shift[0], const)
        torch.testing.assert_close(shift[1], offset * n / (n + PRIOR_SHRINK))
        assert torch.equal(shift[2], torch.zeros(L, D))


def _mean_nll(space, backend, bs, target, prior: bool):
    """The target's suffix NLL over every source on ``bs``, computed here path by path."""
    view = CacheView.of(space.cfg)
    k = view.sink_tokens
    total = []
    with torch.no_grad():
        for b in bs:
            own = backend.prefix_block(target, b.prefix(target))
            sink = KVBlock(own.keys[:, :k], own.values[:, :k], own.n_kv_heads)
            for src in space.names:
                z = space.encode(view.to_space(backend.prefix_block(src, b.prefix(src)), backend.rotation(src)), src)
                out = space.decode(read_along(z, b.align(src, target, k)), target,
                                   b.prefix(target)[:, k:] if prior else None)
                cache = view.to_cache(out, backend.rotation(target), sink)
                total.append(backend.suffix_nll(target, cache, b.suffix(target)).double().mean())
    return float(torch.stack(total).mean())


def test_fit_on_a_pool_keeps_a_prior_only_where_it_lowers_the_calibration_nll():
    models = {"a": tiny_model("llama", seed=0, layers=2, kv_heads=2), "b": tiny_model("gemma2", seed=2, layers=3)}
    backend = LocalBackend(models)
    members = {m: backend.summary(m) for m in models}
    calib = batches(list(models), 3)
    spaces = []
    for _ in range(2):
        torch.manual_seed(0)
        spaces.append(SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_prior=16)))
        closed_form_init(spaces[-1], backend, calib, list(models))
    ungated, gated = spaces
    fit_token_prior(ungated, backend, calib, list(models), gate=False)
    record = fit_token_prior(gated, backend, calib, list(models))
    for m in models:
        delta = _mean_nll(ungated, backend, calib, m, True) - _mean_nll(ungated, backend, calib, m, False)
        assert record[f"init/prior/{m}/nll_delta"] == pytest.approx(delta, abs=1e-5)
        assert record[f"init/prior/{m}/kept"] == float(delta < 0)
        prior = gated.adapters(m)["prior"]
        assert prior.active == (delta < 0)
        if prior.active:  # the fitted prior as is: the most frequent calibration tokens, increasing
            assert torch.equal(prior.ids, ungated.adapters(m)["prior"].ids)
            ids = prior.ids[prior.ids >= 0]
            assert torch.equal(ids, ids.sort().values) and ids.numel() == 16
        counts = torch.bincount(torch.cat([b.prefix(m)[:, 1:].reshape(-1) for b in calib]), minlength=128)
        fitted = ungated.adapters(m)["prior"].ids
        assert counts[fitted].min() >= counts[~torch.isin(torch.arange(128), fitted)].max()
    assert {record[f"init/prior/{m}/kept"] for m in models} == {0.0, 1.0}  # both branches of the gate, here


def test_prior_needs_the_closed_form_and_travels_with_the_adapters(tmp_path):
    with pytest.raises(ValueError, match="token_prior .* needs init: closed_form"):
        SpaceConfig(init="random", token_prior=8)
    with pytest.raises(ValueError, match="token_prior must be an integer >= 0"):
        SpaceConfig(token_prior=-1)
    from safetensors.torch import save_file

    model = tiny_model("llama", seed=0, layers=2, kv_heads=2)
    members = {"a": LocalBackend({"a": model}).summary("a")}
    space = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear", token_prior=3))
    space.adapters("a")["prior"].ids.copy_(torch.tensor([-1, 2, 5]))
    save_file(space.adapter_state("a"), str(tmp_path / "a.safetensors"))
    again = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear", token_prior=3))
    again.load_adapter_file("a", tmp_path / "a.safetensors")
    assert torch.equal(again.adapters("a")["prior"].ids, torch.tensor([-1, 2, 5]))
    without = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear"))
    with pytest.raises(ValueError, match="unexpected tensors"):
        without.load_adapter_file("a", tmp_path / "a.safetensors")


def test_a_handoff_reads_the_prior_at_the_targets_own_tokens():
    """``translate_block`` (a hand-off's prefix, then a continued segment) gives each position the prior of the
    target token there: against Σ's output with the shifts added position by position here."""
    from kvlingua.cache import arch_summary, extract_prefix, sink_block
    from kvlingua.generate import translate_block
    from kvlingua.view import model_rotation
    from tests.kvlingua.test_view import identity_space

    a, b = tiny_model("llama", seed=3, layers=2, kv_heads=2), tiny_model("llama", seed=3, layers=2, kv_heads=2)
    s = arch_summary(a)
    space = identity_space({"a": a, "b": b}, SpaceConfig(adapter="linear", q_dim=s.num_layers * s.width,
                                                         refresh=0, token_prior=4))
    prior = space.adapters("b")["prior"]
    g = torch.Generator().manual_seed(2)
    prior.ids.copy_(torch.tensor([5, 17, 42, 99]))
    prior.shift_keys.copy_(torch.randn(4, s.num_layers, s.width, generator=g))
    prior.shift_values.copy_(torch.randn(4, s.num_layers, s.width, generator=g))
    ids = torch.tensor([[5, 17, 99, 3, 42, 8, 77, 31, 17, 5]])  # [1, 10]: the first 5 is the sink, never shifted
    full = extract_prefix(a, ids)  # [1, 10, L, D]
    view, rot_a, rot_b = CacheView.of(space.cfg), model_rotation(a), model_rotation(b)
    slot = {5: 0, 17: 1, 42: 2, 99: 3}

    def expected(block, start, k):
        body = view.to_space(block, rot_a, start)  # identity adapters: Σ's output is the source's own body
        keys, values = body.keys.clone(), body.values.clone()
        for i in range(body.seq_len):
            t = int(ids[0, start + k + i])
            if t in slot:
                keys[0, i] += prior.shift_keys[slot[t]]
                values[0, i] += prior.shift_values[slot[t]]
        sink = sink_block(b, ids[:, :k]) if k else None
        return view.to_cache(KVBlock(keys, values, body.n_kv_heads), rot_b, sink, start)

    head = KVBlock(full.keys[:, :8], full.values[:, :8], full.n_kv_heads)  # positions 0..7
    tail = KVBlock(full.keys[:, 8:], full.values[:, 8:], full.n_kv_heads)  # positions 8..9, a continued segment
    for block, start, k in ((head, 0, 1), (tail, 8, 0)):
        got = translate_block(space, block, "a", "b", a, b, ids, start)
        want = expected(block, start, k)
        torch.testing.assert_close(got.keys, want.keys, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.values, want.values, rtol=0, atol=1e-5)
        assert not torch.allclose(got.values, translate_cache_plain(space, block, start, k, a, b, ids).values)


def translate_cache_plain(space, block, start, k, a, b, ids):
    """The same translation without the prior (no target tokens given), for the test above to differ from."""
    from kvlingua.cache import sink_block
    from kvlingua.view import model_rotation, translate_cache

    sink = sink_block(b, ids[:, :k]) if k else None
    return translate_cache(space, block, "a", "b", model_rotation(a), model_rotation(b), sink, start)
