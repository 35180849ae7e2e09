"""The Σ context store (kvlingua.context_store), the trained limits and machine sizing: pure, no Ray."""
from __future__ import annotations

import pytest
import torch

from kvlingua.context_store import ContextKey, ContextStore, LRUBytes, StoredContext, StoreFullError, token_digest
from serve_apps.limits import TrainedLimits
from serve_apps.options import ServeOptions, fit_to_machine


def ctx(ids, source="fpA", adapters="ad1", q=4, name="a"):
    key = ContextKey(token_digest(ids), source, adapters)
    z = torch.randn(1, len(ids), q)  # [1, C, Q]
    return StoredContext(key, list(ids), name, z, z.clone())


def test_keys_separate_tokens_source_and_adapters():
    ids = [5, 6, 7]
    assert token_digest(ids) == token_digest(torch.tensor(ids)) != token_digest([5, 6, 8])
    base = ContextKey(token_digest(ids), "fpA", "ad1")
    assert len({base.id, ContextKey(token_digest(ids), "fpB", "ad1").id,
                ContextKey(token_digest(ids), "fpA", "ad2").id}) == 3
    assert base.id == ContextKey(token_digest(list(ids)), "fpA", "ad1").id


def test_lru_evicts_least_recently_used_within_the_byte_budget():
    lru = LRUBytes(100, len)
    lru.put("a", "x" * 40)
    lru.put("b", "x" * 40)
    assert lru.get("a") is not None  # a is now most recent
    assert lru.put("c", "x" * 40) == ["b"] and lru.keys() == ["a", "c"] and lru.bytes == 80
    with pytest.raises(StoreFullError):
        lru.put("d", "x" * 101)
    assert lru.keys() == ["a", "c"] and lru.bytes == 80 and lru.evictions == 1
    lru.put("a", "x" * 10)  # replacing frees the old size first
    assert lru.bytes == 50
    assert lru.pop("a") == "x" * 10 and lru.bytes == 40


def test_store_accounts_bytes_and_matches_longest_prefix_of_same_source_and_adapters():
    one = ctx([1, 2, 3])
    nbytes = 2 * 3 * 4 * 4  # keys + values, [1, 3, 4] float32
    store = ContextStore(budget=3 * nbytes)
    store.put(one)
    longer = ctx([1, 2, 3, 4])
    store.put(longer)
    assert store.bytes == one.nbytes + longer.nbytes == nbytes + 2 * 4 * 4 * 4
    assert store.match([1, 2, 3, 4, 9], "fpA", "ad1") is longer
    assert store.match([1, 2, 3, 9], "fpA", "ad1") is one
    assert store.match([1, 2, 3, 4], "fpB", "ad1") is None  # another source model's weights
    assert store.match([1, 2, 3, 4], "fpA", "ad2") is None  # retrained adapters: never a stale entry
    assert (store.hits, store.misses) == (2, 2)
    assert [c.key.id for c in store.list()] == [one.key.id, longer.key.id]  # most recent first
    store.put(ctx([7, 8, 9]))  # over budget: the least recently used (longer) goes
    assert store.peek(longer.key.id) is None and store.bytes <= store.budget
    assert store.delete(one.key.id) and not store.delete(one.key.id)
    with pytest.raises(ValueError, match="keys/values"):
        store.put(StoredContext(one.key, [1, 2], "a", one.keys, one.values))


def meta(job=None, **extra):
    return {"members": [{"name": n} for n in "abc"], **({"job": job} if job is not None else {}), **extra}


def test_trained_limits_from_pool_json():
    assert TrainedLimits.from_meta(meta()).why_not_latent("a", "c", 10_000) is None  # no job: no limit
    lim = TrainedLimits.from_meta(meta({"prefix_len": 8, "train": {"paths": [["a", "b"], ["b", "a"]]}}))
    assert lim.why_not_latent("a", "b", 8) is None
    assert "never trained the path a -> c" in lim.why_not_latent("a", "c", 4)
    assert "trained on at most 8" in lim.why_not_latent("b", "a", 9)
    ext = TrainedLimits.from_meta(meta({"prefix_len": 8, "train": {"trainable": ["c"]}}, trained_prefix_len=[4, 32]))
    assert ext.max_positions == 32  # the trained range wins over the job's prefix_len
    assert ext.why_not_latent("a", "b", 5) is None and ext.why_not_latent("c", "a", 5) is None  # frozen pair; touches c
    all_paths = {(s, t) for s in "abc" for t in "abc"}
    assert ext.paths == frozenset(all_paths)
    # un-rotated keys say nothing of positions: only a measured limit holds them back
    free = TrainedLimits.from_meta(meta({"prefix_len": 8}, trained_prefix_len=[4, 8], space={"keys": "unrotated"}))
    assert free.max_positions is None and free.why_not_latent("a", "b", 10_000) is None
    held = TrainedLimits.from_meta(meta({"prefix_len": 8}, trained_prefix_len=[4, 8], space={"keys": "unrotated"},
                                        held_prefix_len=512))
    assert held.why_not_latent("a", "b", 512) is None and "measured to hold its content up to 512" in \
        held.why_not_latent("a", "b", 513)


def test_fit_to_machine_shares_the_cpus_among_all_replicas():
    o = fit_to_machine(ServeOptions(), n_models=3, cpus=2)
    assert sum(n * each.get("CPU", 0) for _, n, each in o.requested(3)) <= 2
    assert o.num_cpus == pytest.approx(0.66)
    assert fit_to_machine(ServeOptions(num_cpus=0.5), 2, 16).num_cpus == 0.5  # already fits: unchanged
    assert fit_to_machine(ServeOptions(num_replicas=2), 2, 2).num_cpus == 0.5
