"""A refresh recomputes the target's own keys and values at chosen positions in one masked forward: checked against
recomputing them one token per forward, in order (an independent loop over the model's plain cached forward), and
against the model's own prefill."""
from __future__ import annotations

import pytest
import torch

from kvlingua.cache import KVBlock, as_past_key_values, block_from_cache, cache_kwargs, extract_prefix, returned_cache
from kvlingua.refresh import most_attended, recompute_at, refresh_count, refresh_mask
from tests.helpers import tiny_model

VOCAB = 96


@torch.no_grad()
def one_at_a_time(model, cache: KVBlock, ids, positions: list[list[int]]) -> KVBlock:
    """The reference: each chosen position ``t`` in increasing order reads ``ids[b, t]`` after the cache's first ``t``
    positions (earlier recomputed ones included), one plain cached forward per token."""
    keys, values = cache.keys.clone(), cache.values.clone()
    for b, row in enumerate(positions):
        for t in sorted(row):
            past = as_past_key_values(KVBlock(keys[b:b + 1, :t], values[b:b + 1, :t], cache.n_kv_heads))
            out = model(input_ids=ids[b:b + 1, t:t + 1], use_cache=True, **cache_kwargs(model, past))
            new = block_from_cache(returned_cache(model, out), cache.n_kv_heads)  # [1, t+1, L, D]
            keys[b, t], values[b, t] = new.keys[0, t], new.values[0, t]
    return KVBlock(keys, values, cache.n_kv_heads)


def _noise(own: KVBlock, seed: int) -> KVBlock:
    g = torch.Generator().manual_seed(seed)
    return KVBlock(torch.randn(own.keys.shape, generator=g), torch.randn(own.values.shape, generator=g), own.n_kv_heads)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3", "qwen3", "mistral"])
def test_one_masked_forward_equals_recomputing_one_token_at_a_time(kind):
    """Gemma-2, Gemma-3 and Mistral with a window of 4 < P = 12, so the sliding rows must hide what falls out of it."""
    model = tiny_model(kind, seed=3, layers=4, kv_heads=2, sliding_window=4, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    noise = _noise(extract_prefix(model, ids), 1)
    rows = [[1, 4, 5, 9, 11], [0, 2, 3, 7, 10]]
    got = recompute_at(model, noise, ids, torch.tensor(rows))
    want = one_at_a_time(model, noise, ids, rows)
    assert torch.allclose(got.keys, want.keys, atol=1e-5) and torch.allclose(got.values, want.values, atol=1e-5)
    untouched = torch.ones(2, 12, dtype=torch.bool)
    for b, row in enumerate(rows):
        untouched[b, row] = False
    assert torch.equal(got.keys[untouched], noise.keys[untouched])  # the rest stays the translation's


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_refreshing_every_position_is_the_models_own_prefill(kind):
    model = tiny_model(kind, seed=2, layers=2, kv_heads=2, sliding_window=4, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    own = extract_prefix(model, ids)  # [2, 9, 2, D]
    got = recompute_at(model, _noise(own, 3), ids, torch.arange(9).expand(2, 9))
    assert torch.allclose(got.keys, own.keys, atol=1e-5) and torch.allclose(got.values, own.values, atol=1e-5)


def test_the_mask_hides_replaced_and_out_of_window_positions():
    m = refresh_mask(torch.tensor([[2, 5]]), cached=6, window=3, dtype=torch.float32)[0, 0] == 0  # [2, 8]
    # row p=2: cached 0, 1 (window 3: > -1); itself.  row p=5: cached 3, 4 (2 is replaced, out of window anyway), both
    # refreshed rows? p_j=2 > 5-3=2 is false, so only itself
    assert m.tolist() == [[True, True, False, False, False, False, True, False],
                          [False, False, False, True, True, False, False, True]]
    full = refresh_mask(torch.tensor([[2, 5]]), cached=6, window=None, dtype=torch.float32)[0, 0] == 0
    assert full[1].tolist() == [True, True, False, True, True, False, True, True]


def test_most_attended_picks_the_top_share_after_the_skipped_positions():
    mass = torch.zeros(1, 2, 11)
    mass[0, 0, 0] = 9.0  # the sink: skipped
    mass[0, 0, 7], mass[0, 1, 3], mass[0, 1, 9] = 0.5, 0.4, 0.1
    assert refresh_count(0.2, 10) == 2 and refresh_count(0.0, 10) == 0 and refresh_count(0.01, 10) == 1
    assert most_attended(mass, 0.2, skip=1).tolist() == [[3, 7]]


# ---------------------------------------------------------------- a space's refresh, wherever a target reads Σ

from dataclasses import replace  # noqa: E402

from kvlingua.backend import LocalBackend  # noqa: E402
from kvlingua.batch import Batch  # noqa: E402
from kvlingua.cache import arch_summary  # noqa: E402
from kvlingua.crosstext import handoff_text  # noqa: E402
from kvlingua.evaluate import evaluate  # noqa: E402
from kvlingua.generate import GenerationParams, handoff_generate  # noqa: E402
from kvlingua.refresh import attention_mass  # noqa: E402
from kvlingua.space import SharedSpace  # noqa: E402
from kvlingua.space_config import SpaceConfig  # noqa: E402
from kvlingua.view import CacheView, translate_cache  # noqa: E402
from tests.helpers import CROSS_TEXT, cross_tokenizer_pool  # noqa: E402


@pytest.fixture(scope="module")
def pool():
    models = {"a": tiny_model("gemma3", seed=0, layers=2, kv_heads=1, sliding_window=4, vocab=VOCAB),
              "c": tiny_model("llama", seed=2, layers=3, kv_heads=2, vocab=VOCAB)}
    gen = torch.Generator().manual_seed(5)
    batches = [Batch({n: torch.randint(0, VOCAB, (3, 9 + 6), generator=gen) for n in models}, 9, key=f"v/{k}")
               for k in range(2)]
    return models, LocalBackend(models), batches


def _space(models, **cfg):
    torch.manual_seed(0)
    return SharedSpace({n: arch_summary(m) for n, m in models.items()},
                       SpaceConfig(q_dim=24, init="random", **cfg)).eval().requires_grad_(False)


def test_evaluation_with_a_full_refresh_scores_the_targets_own_cache(pool):
    """Refreshing every translated position leaves nothing of the translation: the space's NLL is the base's."""
    models, backend, batches = pool
    paths = [("a", "c"), ("c", "a")]
    full = evaluate(backend, batches, paths, {"s": _space(models, refresh=1.0)}, first_tokens=2)
    none = evaluate(backend, batches, paths, {"s": _space(models)}, first_tokens=2)
    for path in paths:
        base = full.summary_for(path, "base").nll_mean
        assert full.summary_for(path, "s").nll_mean == pytest.approx(base, abs=1e-5)
        assert abs(none.summary_for(path, "s").nll_mean - base) > 1e-3  # the translation alone is not the own cache


def test_evaluation_refreshes_the_positions_the_first_suffix_token_reads_most(pool):
    models, backend, batches = pool
    space = _space(models, refresh=0.3)
    got = evaluate(backend, batches, [("a", "c")], {"s": space}, first_tokens=2).summary_for(("a", "c"), "s")
    view, nlls = CacheView.of(space.cfg), []
    for b in batches:
        src, tgt = extract_prefix(models["a"], b.prefix("a")), extract_prefix(models["c"], b.prefix("c"))
        sink = KVBlock(tgt.keys[:, :1], tgt.values[:, :1], tgt.n_kv_heads)
        rot = [backend.rotation(m) for m in ("a", "c")]
        with torch.no_grad():
            out = translate_cache(space, src, "a", "c", *rot, sink, view=view)  # [B, 9, L, D]
        chosen = most_attended(attention_mass(models["c"], out, b.suffix("c")[:, :1]), 0.3, skip=1)  # [B, 3]
        assert chosen.shape == (3, 3)
        refreshed = one_at_a_time(models["c"], out, b.prefix("c"), chosen.tolist())
        nlls.append(float(backend.suffix_nll("c", refreshed, b.suffix("c")).mean()))
    assert got.nll_mean == pytest.approx(sum(nlls) / len(nlls), abs=1e-5)


def test_a_latent_handoff_with_a_full_refresh_is_the_text_handoff(pool):
    models, _, _ = pool
    ids = torch.randint(0, VOCAB, (11,), generator=torch.Generator().manual_seed(7)).tolist()
    params = GenerationParams(max_new_tokens=8)
    text = handoff_generate(models, None, "a", "c", ids, params, handoff="text").tokens
    assert handoff_generate(models, _space(models, refresh=1.0), "a", "c", ids, params).tokens == text
    # across tokenizers: the target's own cache of its own tokens
    cross, space, toks = cross_tokenizer_pool()
    space = SharedSpace({n: arch_summary(m) for n, m in cross.items()}, replace(space.cfg, refresh=1.0))
    space.eval().requires_grad_(False)
    want = handoff_text(cross, space, "a", "b", CROSS_TEXT, params, "text", toks).tokens
    assert handoff_text(cross, space, "a", "b", CROSS_TEXT, params, "latent", toks).tokens == want


def test_refresh_must_be_a_share():
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="refresh must be a share in \\[0, 1\\]"):
            SpaceConfig(refresh=bad)
