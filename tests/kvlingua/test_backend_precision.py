"""``LocalBackend(precision=...)``: fp32 is the model as loaded, bit for bit; bf16 autocasts the frozen passes
and still hands back fp32 blocks, gradients and NLLs, close to fp32's but rounded through bf16."""
import pytest
import torch

from kvlingua.backend import LocalBackend, suffix_token_nll
from kvlingua.cache import KVBlock, extract_prefix
from tests.helpers import VOCAB, tiny_model

P, S = 6, 5


@pytest.fixture(scope="module")
def pool():
    return {"a": tiny_model("gemma2", seed=0), "b": tiny_model("llama", seed=1, layers=3, kv_heads=2)}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, P + S), generator=torch.Generator().manual_seed(0))  # [B, P+S]


def reference(model, prefix, suffix, cast: bool):
    """Independent of the backend: the block, the suffix loss, its gradient w.r.t. the block and the
    per-token NLL, computed directly on the model (under bf16 autocast when ``cast``)."""
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cast else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        block = extract_prefix(model, prefix).map(lambda t: t.float())  # [B, P, L, D]
    leaf = block.map(lambda t: t.clone().requires_grad_(True))
    with ctx:
        loss = suffix_token_nll(model, leaf, suffix).mean()
    gk, gv = torch.autograd.grad(loss, [leaf.keys, leaf.values])
    with torch.no_grad(), ctx:
        nll = suffix_token_nll(model, block, suffix).float()  # [B, S-1]
    return block, loss.detach().float(), KVBlock(gk, gv, block.n_kv_heads), nll


def flat(results) -> list[torch.Tensor]:
    """Every tensor of (block, loss, grad, nll), blocks as keys then values."""
    return [t for r in results for t in ((r.keys, r.values) if isinstance(r, KVBlock) else (r,))]


def backend_results(backend, name, prefix, suffix):
    block = backend.prefix_block(name, prefix)
    loss, grad = backend.suffix_loss_and_grad(name, block, suffix)
    return block, loss, grad, backend.suffix_nll(name, block, suffix)


@pytest.mark.parametrize("name", ["a", "b"])
def test_fp32_default_is_the_model_as_loaded_bit_for_bit(pool, ids, name):
    prefix, suffix = ids[:, :P], ids[:, P:]
    want = reference(pool[name], prefix, suffix, cast=False)
    for backend in (LocalBackend(pool), LocalBackend(pool, precision="fp32")):
        got = backend_results(backend, name, prefix, suffix)
        for g, w in zip(flat(got), flat(want), strict=True):
            assert g.dtype == torch.float32
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["a", "b"])
def test_bf16_returns_fp32_close_to_fp32_but_rounded(pool, ids, name):
    prefix, suffix = ids[:, :P], ids[:, P:]
    block32, loss32, grad32, nll32 = reference(pool[name], prefix, suffix, cast=False)
    bf16 = LocalBackend(pool, precision="bf16")
    block, loss, grad, nll = backend_results(bf16, name, prefix, suffix)
    for t in (block.keys, block.values, loss, grad.keys, grad.values, nll):
        assert t.dtype == torch.float32
    for got, want in ((block.keys, block32.keys), (block.values, block32.values)):
        assert not torch.equal(got, want)  # really computed in bf16 ...
        scale = want.abs().max()
        assert (got - want).abs().max() <= 0.05 * scale  # ... and still the same block (bf16: 8 mantissa bits)
    assert not torch.equal(nll, nll32)
    assert (nll - nll32).abs().max() < 0.05 and abs(float(loss) - float(loss32)) < 0.05  # nats
    for got, want in ((grad.keys, grad32.keys), (grad.values, grad32.values)):
        assert not torch.equal(got, want)
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos > 0.99


def test_bf16_is_autocast_of_the_same_model(pool, ids):
    """The bf16 backend is exactly the frozen model under CPU bf16 autocast (weights untouched)."""
    prefix, suffix = ids[:, :P], ids[:, P:]
    before = {k: v.clone() for k, v in pool["b"].state_dict().items()}
    want = reference(pool["b"], prefix, suffix, cast=True)
    got = backend_results(LocalBackend(pool, precision="bf16"), "b", prefix, suffix)
    torch.testing.assert_close(got[0].keys, want[0].keys, rtol=0, atol=0)
    torch.testing.assert_close(got[2].values, want[2].values, rtol=0, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=0, atol=0)
    after = pool["b"].state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_unknown_precision_is_refused_in_one_line(pool):
    with pytest.raises(ValueError, match=r"^precision must be one of \['fp32', 'bf16'\], got 'fp16'$") as e:
        LocalBackend(pool, precision="fp16")
    assert "\n" not in str(e.value)
