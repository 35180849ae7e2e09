"""The sink study's recomputation, checked against the model's own prefill."""
from __future__ import annotations

import pytest
import torch

from experiments.realmodel.sinks import recompute_at
from kvlingua.cache import KVBlock, extract_prefix
from tests.helpers import tiny_model

VOCAB = 96


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_recomputing_every_position_in_order_is_the_models_own_prefill(kind):
    """Recomputing all positions of a cache of noise, in order, reads each token after the positions already
    recomputed: exactly a prefill, so it gives the model's own cache (Gemma-3: sliding layers of window 4 < P)."""
    model = tiny_model(kind, seed=2, layers=2, kv_heads=2, sliding_window=4, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    own = extract_prefix(model, ids)  # [2, 9, 2, D]
    noise = KVBlock(torch.randn_like(own.keys), torch.randn_like(own.values), own.n_kv_heads)
    got = recompute_at(model, noise, ids, [list(range(9)), list(range(9))])
    assert torch.allclose(got.keys, own.keys, atol=1e-5) and torch.allclose(got.values, own.values, atol=1e-5)


def test_recomputing_some_positions_of_the_own_cache_changes_nothing_and_leaves_the_rest():
    model = tiny_model("llama", seed=4, layers=2, kv_heads=2, vocab=VOCAB)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    own = extract_prefix(model, ids)
    assert torch.allclose(recompute_at(model, own, ids, [[3, 7], [0]]).keys, own.keys, atol=1e-5)
    noise = KVBlock(torch.randn_like(own.keys), torch.randn_like(own.values), own.n_kv_heads)
    got = recompute_at(model, noise, ids, [[5], []])
    untouched = torch.ones(2, 9, dtype=torch.bool)
    untouched[0, 5] = False
    assert torch.equal(got.keys[untouched], noise.keys[untouched])
    assert not torch.allclose(got.keys[0, 5], noise.keys[0, 5])
