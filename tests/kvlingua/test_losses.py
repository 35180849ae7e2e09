"""Losses through the backend seam: values against full forwards, gradients against direct autograd."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock, as_past_key_values, cache_kwargs, extract_prefix
from kvlingua.losses import reconstruction_loss, suffix_lm_loss
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from tests.helpers import VOCAB, tiny_model

P, S, B = 6, 7, 3


@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    models = {"a": tiny_model("gemma2", seed=1), "b": tiny_model("llama", seed=2, layers=3, kv_heads=2)}
    backend = LocalBackend(models)
    ids = torch.randint(0, VOCAB, (B, P + S), generator=torch.Generator().manual_seed(5))
    return models, backend, ids


def test_suffix_loss_of_own_cache_equals_full_sequence_forward(pool):
    models, backend, ids = pool
    for name, model in models.items():
        block = backend.prefix_block(name, ids[:, :P])
        loss, grad = suffix_lm_loss(backend, block, name, ids[:, P:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # [B, P+S, V]
        # suffix tokens P+1 .. P+S-1 are predicted from positions P .. P+S-2
        ref = F.cross_entropy(logits[:, P:-1].reshape(-1, VOCAB), ids[:, P + 1:].reshape(-1))
        assert loss.shape == () and not loss.requires_grad
        assert abs(float(loss) - float(ref)) < 1e-5
        assert grad.keys.shape == block.keys.shape and grad.values.abs().sum() > 0


def test_gradient_through_seam_equals_direct_autograd(pool):
    models, backend, ids = pool
    torch.manual_seed(0)
    space = SharedSpace({n: backend.summary(n) for n in models}, SpaceConfig(q_dim=24))
    src = backend.prefix_block("a", ids[:, :P])
    # through the seam
    out = space.translate(src, "a", "b")
    loss, g = suffix_lm_loss(backend, out, "b", ids[:, P:])
    torch.autograd.backward([out.keys, out.values], [g.keys, g.values])
    seam = {k: p.grad.clone() for k, p in space.named_parameters() if p.grad is not None}
    space.zero_grad(set_to_none=True)
    # direct: one autograd graph through adapters and the frozen model
    out = space.translate(extract_prefix(models["a"], ids[:, :P]), "a", "b")
    logits = models["b"](input_ids=ids[:, P:], **cache_kwargs(models["b"], as_past_key_values(out)), use_cache=True).logits
    direct_loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, P + 1:].reshape(-1))
    direct_loss.backward()
    direct = {k: p.grad for k, p in space.named_parameters() if p.grad is not None}
    assert abs(float(loss) - float(direct_loss.detach())) < 1e-5
    assert set(seam) == set(direct) and any(k.startswith("_adapters.a.in") for k in seam)
    assert max((seam[k] - direct[k]).abs().max().item() for k in seam) < 1e-5
    assert max(d.abs().max().item() for d in direct.values()) > 1e-4  # the comparison is not vacuous


def test_reconstruction_loss_is_the_papers_squared_norm_per_token():
    g = torch.Generator().manual_seed(0)
    a = KVBlock(torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g), 1)
    b = KVBlock(torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g), 1)
    a.map(lambda t: t.requires_grad_(True))
    loss = reconstruction_loss(a, b)
    # ‖OUT_j(IN_i(KV_i)) − KV_j‖² of each position's whole cache entry (2 × L × D numbers), mean over B × P
    dk, dv = (a.keys - b.keys).detach(), (a.values - b.values).detach()
    per_token = [float(torch.linalg.vector_norm(torch.cat([dk[i, t].flatten(), dv[i, t].flatten()]))) ** 2
                 for i in range(2) for t in range(3)]
    assert loss.item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    loss.backward()
    assert torch.allclose(a.keys.grad, 2 * (a.keys - b.keys).detach() / 6)
    assert float(reconstruction_loss(b, b)) == 0.0
    with pytest.raises(ValueError, match="equal shape"):
        reconstruction_loss(a, KVBlock(torch.zeros(2, 3, 2, 8), torch.zeros(2, 3, 2, 8), 1))


def test_backend_gradient_of_wrong_shape_is_refused(pool):
    _, backend, ids = pool

    class Broken:
        def suffix_loss_and_grad(self, model, block, suffix_ids):
            loss, grad = backend.suffix_loss_and_grad(model, block, suffix_ids)
            return loss, grad.map(lambda t: t[:1])

    block = backend.prefix_block("a", ids[:, :P])
    with pytest.raises(ValueError, match="gradient of shape"):
        suffix_lm_loss(Broken(), block, "a", ids[:, P:])
