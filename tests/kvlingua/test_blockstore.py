"""Block store: each source block is extracted once and served from disk afterwards."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from kvlingua.backend import LocalBackend
from kvlingua.blockstore import BlockStore, CachingBackend, ids_digest
from kvlingua.cache import extract_prefix
from tests.helpers import VOCAB, tiny_model


@pytest.fixture(scope="module")
def pool():
    return {"a": tiny_model("gemma2", seed=0), "b": tiny_model("llama", seed=1, layers=3)}


def _ids(seed, b=2, p=6):
    return torch.randint(0, VOCAB, (b, p), generator=torch.Generator().manual_seed(seed))


def test_extracts_once_and_serves_later_runs(tmp_path, pool):
    ids = _ids(0)
    cb = CachingBackend(LocalBackend(pool), BlockStore(tmp_path))
    first = cb.prefix_block("a", ids)
    second = cb.prefix_block("a", ids)
    assert (cb.extractions, cb.hits) == (1, 1)
    ref = extract_prefix(pool["a"], ids)
    torch.testing.assert_close(first.keys, ref.keys, rtol=0, atol=0)
    torch.testing.assert_close(second.values, ref.values, rtol=0, atol=0)
    assert second.n_kv_heads == ref.n_kv_heads

    # a later run (new backend, same directory) extracts nothing
    again = CachingBackend(LocalBackend(pool), BlockStore(tmp_path))
    again.prefix_block("a", ids)
    assert (again.extractions, again.hits) == (0, 1)


def test_keys_separate_ids_models_and_prefix_lengths(tmp_path, pool):
    store = BlockStore(tmp_path)
    cb = CachingBackend(LocalBackend(pool), store)
    x, y = _ids(1), _ids(2)
    bx, by = cb.prefix_block("a", x), cb.prefix_block("a", y)
    bxb = cb.prefix_block("b", x)
    short = cb.prefix_block("a", x[:, :4])
    assert cb.extractions == 4 and cb.hits == 0 and len(store) == 4
    assert not torch.equal(bx.keys, by.keys)
    assert bxb.num_layers == 3 and bx.num_layers == 2
    torch.testing.assert_close(short.keys, extract_prefix(pool["a"], x[:, :4]).keys, rtol=0, atol=0)
    assert ids_digest(x) != ids_digest(x.reshape(1, -1))  # same bytes, different shape


def test_mismatched_file_is_refused(tmp_path, pool):
    store = BlockStore(tmp_path)
    fp = LocalBackend(pool).fingerprint("a")
    x, y = _ids(3), _ids(4)
    store.put(fp, y, extract_prefix(pool["a"], y))
    # pretend a digest collision: y's file sits where x's should be
    store.path(fp, x).parent.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(store.path(fp, y)))
    save_file(tensors, str(store.path(fp, x)))
    with pytest.raises(ValueError, match="stored prefix ids differ"):
        store.get(fp, x)


def test_delegates_suffix_calls(tmp_path, pool):
    inner = LocalBackend(pool)
    cb = CachingBackend(inner, BlockStore(tmp_path))
    ids = _ids(5, p=10)
    block = cb.prefix_block("a", ids[:, :6])
    loss, grad = cb.suffix_loss_and_grad("a", block, ids[:, 6:])
    ref_loss, ref_grad = inner.suffix_loss_and_grad("a", block, ids[:, 6:])
    assert torch.equal(loss, ref_loss) and torch.equal(grad.keys, ref_grad.keys)
    assert torch.equal(cb.suffix_nll("a", None, ids), inner.suffix_nll("a", None, ids))
    assert cb.names() == ["a", "b"] and cb.summary("b").num_layers == 3


def test_bad_inputs(tmp_path, pool):
    store = BlockStore(tmp_path)
    with pytest.raises(ValueError, match="fingerprint"):
        store.path("../x", _ids(0))
    with pytest.raises(ValueError, match="does not match prefix ids"):
        store.put("f", _ids(0, p=5), extract_prefix(pool["a"], _ids(0)))
    with pytest.raises(ValueError, match="no fingerprint"):
        CachingBackend(LocalBackend(pool), store, fingerprints={"a": "x"})
