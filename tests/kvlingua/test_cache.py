"""KV-block I/O checked against independent full-sequence forwards."""
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from kvlingua.backend import LocalBackend, suffix_token_nll
from kvlingua.cache import (
    ArchSummary,
    CacheAPIError,
    KVBlock,
    append_block,
    arch_summary,
    as_past_key_values,
    block_from_cache,
    cache_kwargs,
    check_block_fits,
    check_same_layout,
    check_same_vocab,
    extract_prefix,
    fingerprint,
)
from kvlingua.models import load_frozen
from tests.helpers import VOCAB, tiny_model

ARCHS = ["gemma2", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("kind", ARCHS)
def test_injected_prefix_matches_full_forward(kind):
    model = tiny_model(kind, kv_heads=2, sliding_window=4)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits  # [B, 20, V], independent of any cache
        block = extract_prefix(model, ids[:, :12])
        assert block.keys.shape == (3, 12, 2, 2 * 8)  # [B, P, L, D] with D = kv_heads * head_dim
        suffix = model(ids[:, 12:], **cache_kwargs(model, as_past_key_values(block, model))).logits
    assert (suffix - full[:, 12:]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ARCHS)
def test_a_prefix_is_read_without_the_lm_head(kind):
    """A block needs the layers only: the head (a 262k-token one costs ~50 ms a row) never runs, and the block is
    the one the whole model's forward leaves in its cache."""
    model = tiny_model(kind, kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            block = extract_prefix(model, ids)
            assert calls == []
            cache = DynamicCache()
            model(ids, use_cache=True, **cache_kwargs(model, cache))
            assert calls == [1]
    finally:
        hook.remove()
    whole = block_from_cache(cache, 2)
    assert torch.equal(block.keys, whole.keys) and torch.equal(block.values, whole.values)


def test_a_prefix_is_read_without_a_graph_even_from_trainable_weights():
    model = tiny_model("llama", kv_heads=2).requires_grad_(True)
    block = extract_prefix(model, torch.randint(0, VOCAB, (1, 5)))
    assert not block.keys.requires_grad and not block.values.requires_grad


def test_sliding_window_layers_keep_full_prefix():
    model = tiny_model("gemma2", sliding_window=4)
    ids = torch.randint(0, VOCAB, (2, 16))
    block = extract_prefix(model, ids)
    assert block.seq_len == 16  # not truncated to the window on the sliding layers
    assert (block.keys[:, :12].abs().sum(dim=(0, 1, 3)) > 0).all()  # early positions present on every layer


def test_gradients_reach_injected_block():
    model = tiny_model("gemma2")
    ids = torch.randint(0, VOCAB, (2, 16))
    block = extract_prefix(model, ids[:, :8]).map(lambda t: t.requires_grad_(True))
    loss = suffix_token_nll(model, block, ids[:, 8:]).mean()
    loss.backward()
    assert block.keys.grad is not None and block.keys.grad.abs().sum() > 0
    assert block.values.grad is not None and block.values.grad.abs().sum() > 0
    # directional derivative check against a finite difference of the loss
    direction = torch.randn_like(block.values)
    eps = 1e-3
    with torch.no_grad():
        shifted = KVBlock(block.keys.detach(), block.values.detach() + eps * direction, block.n_kv_heads)
        base = KVBlock(block.keys.detach(), block.values.detach() - eps * direction, block.n_kv_heads)
        fd = (suffix_token_nll(model, shifted, ids[:, 8:]).mean() - suffix_token_nll(model, base, ids[:, 8:]).mean()) / (2 * eps)
    assert torch.allclose(fd, (block.values.grad * direction).sum(), rtol=1e-2, atol=1e-4)


def test_backend_grad_equals_direct_autograd():
    model = tiny_model("llama", layers=3)
    ids = torch.randint(0, VOCAB, (2, 14))
    block = extract_prefix(model, ids[:, :6])
    loss, grad = LocalBackend({"m": model}).suffix_loss_and_grad("m", block, ids[:, 6:])
    leaf = block.map(lambda t: t.clone().requires_grad_(True))
    direct = suffix_token_nll(model, leaf, ids[:, 6:]).mean()
    direct.backward()
    assert torch.allclose(loss, direct.detach())
    assert (grad.keys - leaf.keys.grad).abs().max() < 1e-6


def test_no_prefix_nll_equals_plain_forward():
    model = tiny_model("qwen2")
    ids = torch.randint(0, VOCAB, (2, 10))
    nll = LocalBackend({"m": model}).suffix_nll("m", None, ids)
    logits = model(ids).logits[:, :-1]
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    assert torch.allclose(nll, ref, atol=1e-6)


def test_fingerprint_and_summary_survive_save_and_load(tmp_path):
    model = tiny_model("gemma2", layers=3)
    model.save_pretrained(tmp_path / "m")
    loaded = load_frozen(tmp_path / "m")
    assert fingerprint(loaded) == fingerprint(model)
    assert arch_summary(tmp_path / "m") == arch_summary(model)
    assert arch_summary(model).num_layers == 3 and arch_summary(model).width == 8
    with torch.no_grad():
        loaded.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert fingerprint(loaded) != fingerprint(model)


def test_block_of_wrong_shape_is_refused():
    a, b = tiny_model("gemma2", layers=2), tiny_model("llama", layers=3)
    block = extract_prefix(a, torch.randint(0, VOCAB, (1, 5)))
    with pytest.raises(ValueError, match="does not fit"):
        as_past_key_values(block, b)
    with pytest.raises(ValueError, match="3 layers"):
        check_block_fits(block, arch_summary(b))


class _LegacyTupleCacheLM(nn.Module):
    """A causal LM that returns its cache as nested tuples (not the Cache API)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, cache=None, past_key_values=None, **kw):
        kv = cache if cache is not None else past_key_values
        out = self.inner(input_ids, **cache_kwargs(self.inner, kv), **kw)
        legacy = tuple((l.keys, l.values) for l in kv.layers)
        return SimpleNamespace(logits=out.logits, cache=legacy, past_key_values=legacy)


def test_non_standard_cache_api_is_refused():
    with pytest.raises(CacheAPIError, match="standard Cache API"):
        extract_prefix(_LegacyTupleCacheLM(tiny_model("llama")), torch.randint(0, VOCAB, (1, 4)))


def test_load_frozen_refuses_missing_and_pickled_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_frozen(tmp_path / "nope")
    model = tiny_model("llama")
    (tmp_path / "cfgonly").mkdir()
    model.config.to_json_file(tmp_path / "cfgonly" / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_frozen(tmp_path / "cfgonly")




def test_block_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="equal shape"):
        KVBlock(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 5), 1)
    with pytest.raises(ValueError, match="divisible"):
        KVBlock(torch.zeros(1, 2, 3, 5), torch.zeros(1, 2, 3, 5), 2)


def test_cache_kwargs_names_the_argument_the_installed_forward_takes():
    model = tiny_model("llama")
    params = inspect.signature(type(model).forward).parameters
    (name,) = cache_kwargs(model, None)
    assert name in params  # independent: the forward's own signature
    assert name == ("cache" if "cache" in params else "past_key_values")

    class OldForward(nn.Module):  # a forward from before the rename
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    assert list(cache_kwargs(OldForward(), None)) == ["past_key_values"]
    ids = torch.randint(0, VOCAB, (1, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warning from our call
        with torch.no_grad():
            model(ids[:, 3:], **cache_kwargs(model, as_past_key_values(extract_prefix(model, ids[:, :3]))))


def test_padded_prefix_is_refused_and_an_all_ones_mask_changes_nothing():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    same = extract_prefix(model, ids, mask)
    plain = extract_prefix(model, ids)
    assert torch.equal(same.keys, plain.keys) and torch.equal(same.values, plain.values)
    mask[1, :2] = 0  # left padding
    with pytest.raises(ValueError, match="padded prefix.*unpadded"):
        extract_prefix(model, ids, mask)
    with pytest.raises(ValueError, match="must match"):
        extract_prefix(model, ids, mask[:, :3])


def test_block_from_cache_and_append_block_round_trip_in_pieces():
    model = tiny_model("llama", layers=3, kv_heads=2)
    ids = torch.randint(0, VOCAB, (2, 9))
    block = extract_prefix(model, ids)  # [2, 9, 3, 16]
    cache = DynamicCache()
    append_block(cache, block.map(lambda t: t[:, :4]))
    append_block(cache, block.map(lambda t: t[:, 4:]))
    layer = cache.layers[1]
    H, hd = 2, 8
    # independent: layer 1 of the cache, [B, H, S, hd], is the block's layer-1 slice split into heads
    torch.testing.assert_close(layer.keys, block.keys[:, :, 1].reshape(2, 9, H, hd).transpose(1, 2), rtol=0, atol=0)
    back = block_from_cache(cache, 2)
    assert torch.equal(back.keys, block.keys) and torch.equal(back.values, block.values)
    with pytest.raises(CacheAPIError, match="standard Cache API"):
        block_from_cache(((block.keys, block.values),), 2)


def _summary(vocab: int, layers: int = 2, kv: int = 1, hd: int = 8) -> ArchSummary:
    return ArchSummary("llama", layers, kv, hd, vocab, 32)


def test_check_same_vocab_names_both_models_and_sizes():
    check_same_vocab({"a": _summary(128), "b": _summary(128, layers=4)})
    check_same_vocab({})
    with pytest.raises(ValueError, match=r"'a' has vocab_size 128 and 'c' has vocab_size 300"):
        check_same_vocab({"a": _summary(128), "b": _summary(128), "c": _summary(300)})
    # a backend serves models of any vocabularies (a pool may mix tokenizers; the job checks what reads what)
    backend = LocalBackend({"x": tiny_model("llama"), "y": tiny_model("gemma2", vocab=256)})
    assert backend.summary("y").vocab_size == 256


def test_check_same_layout_compares_layers_heads_and_head_width():
    check_same_layout(_summary(128), _summary(999))  # vocabulary is not part of the layout
    for other in (_summary(128, layers=3), _summary(128, kv=2, hd=4), _summary(128, hd=16)):
        with pytest.raises(ValueError, match=r"'s' has 2 layers x 1 kv heads x 8 \(D=8\), 't' has"):
            check_same_layout(_summary(128), other, "'s'", "'t'")


def test_loading_a_checkpoint_prints_nothing(tmp_path, capfd):
    """A run loads every model many times (hosts, workers, members): no per-load progress bar."""
    from kvlingua.models import load_frozen
    from transformers.utils import logging as hf_logging

    tiny_model("llama").save_pretrained(tmp_path / "m")
    capfd.readouterr()
    was = hf_logging.is_progress_bar_enabled()
    model = load_frozen(tmp_path / "m")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "") and not model.training
    assert hf_logging.is_progress_bar_enabled() == was  # the caller's setting comes back


def test_a_sink_is_computed_once_per_model_and_tokens_and_equals_the_models_own_cache_of_it(monkeypatch):
    """``sink_block``: each distinct row of sink tokens is computed once (the same storage on a later call, whatever
    the batch) and equals ``extract_prefix`` of those rows; the least recently used are dropped past the bound."""
    import kvlingua.cache as cache

    model = tiny_model("gemma2", seed=3)
    bos = torch.full((3, 1), 2)  # [B, 1]: one sink for every row (Gemma's <bos>)
    first, again = cache.sink_block(model, bos), cache.sink_block(model, bos[:1])
    ref = extract_prefix(model, bos)  # [3, 1, L, D]
    assert first.keys.shape == ref.keys.shape and again.keys.shape[0] == 1
    torch.testing.assert_close(first.keys, ref.keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(first.values, ref.values, rtol=0, atol=1e-6)
    assert again.keys.data_ptr() == first.keys.data_ptr()  # computed once, reused
    other = torch.tensor([[5, 9], [7, 9], [5, 9]])  # [B, 2]: prompts' own first tokens (SmolLM2's sink)
    a = cache.sink_block(model, other)
    want = extract_prefix(model, other)
    torch.testing.assert_close(a.keys, want.keys, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.values, want.values, rtol=0, atol=1e-6)
    calls = []
    monkeypatch.setattr(cache, "extract_prefix", lambda m, ids: calls.append(ids.tolist()) or extract_prefix(m, ids))
    b = cache.sink_block(model, other[[1, 0]])  # both rows known: no forward
    assert calls == [] and torch.equal(b.keys, a.keys[[1, 0]])
    monkeypatch.setattr(cache, "SINK_MEMO_ENTRIES", 2)
    cache.sink_block(model, torch.tensor([[4, 4]]))  # a third distinct sink pushes out the least recently used
    cache.sink_block(model, other[:2])
    assert calls == [[[4, 4]], [[7, 9]]]  # read before [5, 9] in the last call, [7, 9] was the least recent
