"""The suffix-KL objective: the loss and its block gradient against direct computations, the teacher cache, and
the objective switch of the training loop (the default suffix cross-entropy unchanged)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvlingua.backend import LocalBackend, TeacherCache
from kvlingua.cache import KVBlock, as_past_key_values, cache_kwargs
from kvlingua.config import ConfigError, from_dict
from kvlingua.losses import suffix_kl_loss, suffix_lm_loss
from kvlingua.runtime import Runtime
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig
from kvlingua.train import fit, train_step
from kvlingua.train_config import TrainConfig
from tests.helpers import VOCAB, tiny_model

P, S, B = 6, 7, 3


@pytest.fixture(scope="module")
def models():
    return {"a": tiny_model("gemma2", seed=1), "b": tiny_model("llama", seed=2, layers=3, kv_heads=2)}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (B, P + S), generator=torch.Generator().manual_seed(5))


def student_block(backend, model, ids):
    """Another text's cache of ``model`` with noise: a block unlike the teacher's own."""
    other = backend.prefix_block(model, ids.roll(1, dims=0)[:, :P])
    g = torch.Generator().manual_seed(3)
    return other.map(lambda t: t + 0.3 * torch.randn(t.shape, generator=g))


def direct_kl(model, block_keys, block_values, n_kv_heads, ids):
    """KL(p_teacher ‖ p_student) per suffix token, written out: teacher = the model over the whole text."""
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=ids).logits[:, P:-1].float(), dim=-1)  # [B, S-1, V]
    cache = as_past_key_values(KVBlock(block_keys, block_values, n_kv_heads))
    logits = model(input_ids=ids[:, P:], use_cache=True, **cache_kwargs(model, cache)).logits
    student = F.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, S-1, V]
    return F.kl_div(student.reshape(-1, VOCAB), teacher.reshape(-1, VOCAB), reduction="batchmean", log_target=True)


@pytest.mark.parametrize("name", ["a", "b"])
def test_kl_loss_and_gradient_equal_direct_autograd_through_the_model(models, ids, name):
    backend = LocalBackend(models)
    block = student_block(backend, name, ids)
    loss, grad = suffix_kl_loss(backend, block, name, ids[:, P:], ids[:, :P])
    leaf_k, leaf_v = block.keys.clone().requires_grad_(True), block.values.clone().requires_grad_(True)
    ref = direct_kl(models[name], leaf_k, leaf_v, block.n_kv_heads, ids)
    ref.backward()
    assert loss.shape == () and not loss.requires_grad and float(loss) > 1e-3
    # the KL (~3e-3) is a difference of log-probabilities of order 5 nats, so fp32 rounds it in absolute terms (5e-8
    # apart in one full-suite run, where another test had set torch's thread count): an absolute bound, ~6,000x below
    # the loss itself
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5, abs=5e-7)
    # tiny random models have small gradients (keys ~1e-5, values ~1e-4): compare far below their scale
    torch.testing.assert_close(grad.keys, leaf_k.grad, atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(grad.values, leaf_v.grad, atol=1e-9, rtol=1e-4)
    assert leaf_k.grad.abs().max() > 1e-6 and leaf_v.grad.abs().max() > 1e-5  # the comparison is not vacuous


def test_kl_gradient_matches_a_finite_difference(models, ids):
    backend = LocalBackend({"a": models["a"]})
    block = student_block(backend, "a", ids)
    _, grad = backend.suffix_kl_and_grad("a", block, ids[:, P:], ids[:, :P])
    g = torch.Generator().manual_seed(7)
    dk, dv = torch.randn(block.keys.shape, generator=g), torch.randn(block.values.shape, generator=g)
    eps = 1e-3
    loss_at = [float(backend.suffix_kl_and_grad("a", KVBlock(block.keys + s * eps * dk, block.values + s * eps * dv,
                                                             block.n_kv_heads), ids[:, P:], ids[:, :P])[0])
               for s in (1, -1)]
    numeric = (loss_at[0] - loss_at[1]) / (2 * eps)
    analytic = float((grad.keys * dk).sum() + (grad.values * dv).sum())
    assert abs(analytic) > 1e-4 and numeric == pytest.approx(analytic, rel=2e-2)


def test_kl_of_the_teachers_own_cache_is_zero_and_flat(models, ids):
    backend = LocalBackend(models)
    for name in models:
        own = backend.prefix_block(name, ids[:, :P])
        loss, grad = backend.suffix_kl_and_grad(name, own, ids[:, P:], ids[:, :P])
        assert abs(float(loss)) < 1e-7
        assert grad.keys.abs().max() < 1e-9 and grad.values.abs().max() < 1e-9


def test_teacher_is_computed_once_per_recurring_ids(models, ids):
    backend = LocalBackend(models)
    block = student_block(backend, "b", ids)
    first = backend.suffix_kl_and_grad("b", block, ids[:, P:], ids[:, :P])
    assert (backend.teacher_misses, backend.teacher_hits) == (1, 0)
    second = backend.suffix_kl_and_grad("b", block.map(lambda t: t * 1.01), ids[:, P:], ids[:, :P])
    assert (backend.teacher_misses, backend.teacher_hits) == (1, 1)  # another student, the same teacher
    assert float(second[0]) != float(first[0])
    backend.suffix_kl_and_grad("b", block, ids[:, P:].flip(1), ids[:, :P])  # another suffix: another teacher
    backend.suffix_kl_and_grad("a", student_block(backend, "a", ids), ids[:, P:], ids[:, :P])  # another model
    assert (backend.teacher_misses, backend.teacher_hits) == (3, 1)
    with pytest.raises(ValueError, match="batch size"):
        backend.suffix_kl_and_grad("b", block, ids[:, P:], ids[:2, :P])


def test_teacher_cache_is_a_bounded_lru():
    cache = TeacherCache(max_bytes=3 * 16)  # three 4-float entries
    calls = []

    def make(i):
        return lambda: calls.append(i) or torch.full((4,), float(i))

    for i in (0, 1, 2, 0, 3):  # 0 was used again before 3 arrived: 1 is the least recently used
        cache.get(i, make(i))
    assert calls == [0, 1, 2, 3]
    cache.get(1, make(1))
    cache.get(0, make(0))
    assert calls == [0, 1, 2, 3, 1] and (cache.hits, cache.misses) == (2, 5)
    cache.get("big", lambda: torch.zeros(100))  # larger than the cache: computed, not kept
    cache.get(0, make(0))
    assert calls[-1] == 1 and cache.hits == 3


def test_objective_config_and_yaml_mirror():
    assert TrainConfig(steps=1).objective == "suffix"
    assert from_dict(TrainConfig, {"steps": 1, "objective": "kl"}).objective == "kl"
    with pytest.raises(ValueError, match=r"objective must be one of \['suffix', 'kl'\], got 'mse'"):
        TrainConfig(steps=1, objective="mse")
    with pytest.raises(ConfigError, match="objective"):
        from_dict(TrainConfig, {"steps": 1, "objective": "mse"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(TrainConfig, {"steps": 1, "objectiv": "kl"})


def _space(backend, seed=0):
    torch.manual_seed(seed)
    return SharedSpace({n: backend.summary(n) for n in backend.names()},
                       SpaceConfig(q_dim=24, init="random", sink_tokens=1, keys="unrotated"))


def _grads(space):
    return {k: p.grad.clone() for k, p in space.named_parameters() if p.grad is not None}


def test_train_step_objectives(models, ids):
    backend = LocalBackend(models)
    batch = Batch.same_text(ids, list(models), P)
    paths = [("a", "b"), ("b", "a"), ("b", "b")]
    # suffix (the default) is the cross-entropy through suffix_lm_loss, exactly: the same step twice, bit for bit
    runs = []
    for cfg in (TrainConfig(steps=1), TrainConfig(steps=1, objective="suffix")):
        space = _space(backend)
        runs.append((train_step(space, backend, batch, paths, cfg), _grads(space)))
    (m1, g1), (m2, g2) = runs
    assert m1 == m2 and set(g1) == set(g2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert set(m1) == {"loss"} | {f"{kind}/{p}" for kind in ("suffix", "loss") for p in ("a->b", "b->a", "b->b")}
    # kl: kl/i->j is the path's loss, the gradient reaches both adapters of every path
    space = _space(backend)
    m = train_step(space, backend, batch, paths, TrainConfig(steps=1, objective="kl"))
    assert set(m) == {"loss"} | {f"{kind}/{p}" for kind in ("kl", "loss") for p in ("a->b", "b->a", "b->b")}
    assert all(m[f"kl/{p}"] > 0 and m[f"kl/{p}"] == m[f"loss/{p}"] for p in ("a->b", "b->a", "b->b"))
    g = _grads(space)
    assert any(k.startswith("_adapters.a.in") for k in g) and any(k.startswith("_adapters.a.out") for k in g)
    assert all(torch.isfinite(t).all() for t in g.values()) and max(t.abs().max() for t in g.values()) > 0
    assert backend.teacher_misses == 2 and backend.teacher_hits == 1  # b's teacher serves a->b and b->b


def test_a_backend_without_the_teacher_is_refused(models, ids):
    class CrossEntropyOnly:
        def suffix_loss_and_grad(self, model, block, suffix_ids):
            raise AssertionError("not reached")

    block = LocalBackend(models).prefix_block("a", ids[:, :P])
    with pytest.raises(TypeError, match="no suffix_kl_and_grad"):
        suffix_kl_loss(CrossEntropyOnly(), block, "a", ids[:, P:], ids[:, :P])
    assert suffix_lm_loss(LocalBackend(models), block, "a", ids[:, P:])[0] > 0


def test_fit_stops_when_the_wall_time_budget_is_spent(models, ids):
    backend = LocalBackend(models)
    space = _space(backend)

    def batches():
        while True:
            yield Batch.same_text(ids, list(models), P)

    evals = []
    cfg = TrainConfig(steps=1000, eval_every=500, objective="kl")
    state = fit(space, backend, batches(), cfg, runtime=Runtime(progress=False), budget_s=0.0,
                eval_fn=lambda step: evals.append(step) or {"eval/nll/a->b": 1.0})
    assert state.step == 1 and evals == [0, 1]  # the first step spends the budget and ends as the last one would
    assert [r["step"] for r in state.history if r["kind"] == "train"] == [1]
