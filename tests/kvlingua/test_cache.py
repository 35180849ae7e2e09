"""KV-block I/O checked against independent full-sequence forwards."""
import pytest
import torch
from torch import nn

from kvlingua.backend import LocalBackend, suffix_token_nll
from kvlingua.cache import (
    CacheAPIError,
    KVBlock,
    arch_summary,
    as_past_key_values,
    check_block_fits,
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
        suffix = model(ids[:, 12:], past_key_values=as_past_key_values(block, model)).logits
    assert (suffix - full[:, 12:]).abs().max() < 1e-4


def test_sliding_window_layers_keep_full_prefix():
    model = tiny_model("gemma2", sliding_window=4)
    ids = torch.randint(0, VOCAB, (2, 16))
    block = extract_prefix(model, ids)
    assert block.seq_len == 16  # not truncated to the window on the sliding layers
    assert (block.keys[:, :12].abs().sum(dim=(0, 1, 3)) > 0).all()  # early positions present on every layer


def test_gradients_reach_injected_block():
    model = tiny_model("gemma2")
    ids = torch.randint(0, VOCAB, (2, 16))
    block = extract_prefix(model, ids[:, :8]).requires_grad_(True)
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

    def forward(self, input_ids, past_key_values=None, **kw):
        out = self.inner(input_ids, past_key_values=past_key_values, **kw)
        out.past_key_values = tuple((l.keys, l.values) for l in out.past_key_values.layers)
        return out


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
