"""The closed-form start of Σ, checked against an independent PCA, and training that never ends below it."""
from __future__ import annotations

import torch

from kvlingua.backend import LocalBackend
from kvlingua.closedform import closed_form_init
from kvlingua.space import SharedSpace
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig
from kvlingua.train import fit
from kvlingua.train_config import TrainConfig
from kvlingua.view import CacheView
from tests.helpers import tiny_model

torch.set_num_threads(1)
P, S = 9, 5


def batches(names, n, seed=0, size=6):
    g = torch.Generator().manual_seed(seed)
    return [Batch.same_text(torch.randint(0, 128, (size, P + S), generator=g), names, P, f"b{i}") for i in range(n)]


def flat_views(backend, space, model, bs):
    """Σ's view of ``model``'s caches on ``bs``, flattened per position: keys and values ``[N, L*D]``."""
    view = CacheView.of(space.cfg)
    rot = backend.rotation(model)
    blocks = [view.to_space(backend.prefix_block(model, b.prefix(model)), rot) for b in bs]
    return [torch.cat([getattr(x, k).flatten(2).flatten(0, 1) for x in blocks]) for k in ("keys", "values")]


def cyclic(space, backend, model, bs):
    view = CacheView.of(space.cfg)
    rot = backend.rotation(model)
    outs = []
    with torch.no_grad():
        for b in bs:
            body = view.to_space(backend.prefix_block(model, b.prefix(model)), rot)
            outs.append(space.translate(body, model, model))
    return [torch.cat([getattr(x, k).flatten(2).flatten(0, 1) for x in outs]) for k in ("keys", "values")]


def test_full_width_sigma_reproduces_the_cache():
    backend = LocalBackend({"a": tiny_model("llama", seed=0, layers=2, kv_heads=2)})
    s = backend.summary("a")
    space = SharedSpace({"a": s}, SpaceConfig(adapter="linear", q_dim=s.num_layers * s.width, ridge=1e-8))
    calib = batches(["a"], 4)
    closed_form_init(space, backend, calib, ["a"])
    for got, want in zip(cyclic(space, backend, "a", calib), flat_views(backend, space, "a", calib)):
        assert (got - want).norm() / want.norm() < 1e-3


def test_narrow_sigma_loses_exactly_what_pca_discards():
    """One member, Q < L*D: the cyclic path is the rank-Q PCA reconstruction (SVD computed here, independently)."""
    backend = LocalBackend({"a": tiny_model("gemma2", seed=1, layers=2, kv_heads=2)})
    s = backend.summary("a")
    q = 8  # of L*D = 32
    space = SharedSpace({"a": s}, SpaceConfig(adapter="linear", q_dim=q, ridge=1e-8))
    calib = batches(["a"], 10)  # more than FLUSH_BATCHES: fp32 products summed in two flushes
    closed_form_init(space, backend, calib, ["a"])
    for got, x in zip(cyclic(space, backend, "a", calib), flat_views(backend, space, "a", calib)):
        xc = (x - x.mean(0)).double()
        u, sv, vt = torch.linalg.svd(xc, full_matrices=False)
        best = (sv[q:] ** 2).sum()  # squared error of the best rank-q reconstruction
        err = ((got.double() - x.double()) ** 2).sum()
        assert err >= best * (1 - 1e-6)
        assert err <= best * 1.02


def test_translator_starts_as_its_linear_closed_form():
    """The stack's last projection starts at zero, so a translator's start is the linear closed form exactly."""
    models = {"a": tiny_model("llama", seed=0, layers=2, kv_heads=2), "b": tiny_model("gemma2", seed=2, layers=3)}
    backend = LocalBackend(models)
    members = {m: backend.summary(m) for m in models}
    calib = batches(list(models), 4)
    torch.manual_seed(0)
    translator = SharedSpace(members, SpaceConfig(q_dim=12))
    linear = SharedSpace(members, SpaceConfig(q_dim=12, adapter="linear"))
    for sp in (translator, linear):
        closed_form_init(sp, backend, calib, list(models))
    view = CacheView.of(translator.cfg)
    with torch.no_grad():
        body = view.to_space(backend.prefix_block("a", calib[0].prefix("a")), backend.rotation("a"))
        for target in models:
            t, l = translator.translate(body, "a", target), linear.translate(body, "a", target)
            torch.testing.assert_close(t.keys, l.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(t.values, l.values, atol=1e-5, rtol=1e-4)


def test_training_keeps_its_best_evaluation_and_never_ends_below_its_start():
    backend = LocalBackend({"a": tiny_model("llama", seed=0, layers=2, kv_heads=2)})
    torch.manual_seed(0)
    space = SharedSpace({"a": backend.summary("a")}, SpaceConfig(adapter="linear", q_dim=16, init_batches=2))
    train = batches(["a"], 12)
    scores = iter([1.0, 2.0, 3.0])  # the start is the best evaluation: training must end there
    start = {}

    def eval_fn(step):
        if step == 0:
            start.update({k: v.clone() for k, v in space.state_dict().items()})
        return {"eval/nll/a->a": next(scores)}

    state = fit(space, backend, iter(train), TrainConfig(steps=10, lr=1e-2, eval_every=5), eval_fn=eval_fn)
    kinds = [h["kind"] for h in state.history]
    assert kinds[0] == "init" and kinds[-1] == "select" and state.history[-1]["best_step"] == 0
    for k, v in space.state_dict().items():
        assert torch.equal(v, start[k]), k
    assert 0 < state.history[0]["init/energy/keys"] <= 1


def test_attention_weighted_out_is_the_weighted_least_squares_fit_per_target_layer():
    """``out_weights: attention``: each OUT layer is the least-squares map from what OUT reads (both sources' Σ,
    pooled) to the target's cache with every position weighted by the mass the target's suffix puts on it, mixed with
    a uniform share, solved here independently by ``lstsq`` on √w-scaled rows; IN is left as the closed form set it."""
    from kvlingua.closedform import ATTENTION_MIX, attention_weighted_out, short_maps

    backend = LocalBackend({"a": tiny_model("llama", seed=0, layers=2, kv_heads=2),
                            "b": tiny_model("gemma2", seed=1, layers=2, kv_heads=1)})
    members = {m: backend.summary(m) for m in ("a", "b")}
    space = SharedSpace(members, SpaceConfig(adapter="linear", q_dim=8, ridge=1e-9, out_weights="attention"))
    calib = batches(["a", "b"], 3)
    closed_form_init(space, backend, calib, ["a", "b"])
    ins = [p.clone() for p in space.adapters("a")["in"].parameters()]
    record = attention_weighted_out(space, backend, calib, ["a", "b"])
    assert all(torch.equal(p, q) for p, q in zip(space.adapters("a")["in"].parameters(), ins))
    assert 0 < record["init/attention/top_share"] <= 1
    view = CacheView.of(space.cfg)
    for target in ("a", "b"):
        L, D = members[target].num_layers, members[target].width
        rows, weights, wants = {k: [] for k in ("keys", "values")}, [], {k: [] for k in ("keys", "values")}
        with torch.no_grad():
            for b in calib:
                own = backend.prefix_block(target, b.prefix(target))
                mass = backend.attention_received(target, own, b.suffix(target))[:, :, 1:]  # [B, L, P-1]
                share = mass / mass.sum(-1, keepdim=True)
                w = (1 - ATTENTION_MIX) + ATTENTION_MIX * share * share.shape[-1]
                x = view.to_space(own, backend.rotation(target))  # [B, P-1, L, D]
                for source in ("a", "b"):
                    src = view.to_space(backend.prefix_block(source, b.prefix(source)), backend.rotation(source))
                    z = space.encode(src, source)
                    weights.append(w.permute(0, 2, 1).reshape(-1, L))
                    for kind in ("keys", "values"):
                        rows[kind].append(getattr(z, kind).reshape(-1, 8))
                        wants[kind].append(getattr(x, kind).reshape(-1, L, D))
        w = torch.cat(weights).double()  # [N, L]
        for kind_i, kind in enumerate(("keys", "values")):
            z1 = torch.cat([torch.cat(rows[kind]).double(), torch.ones(w.shape[0], 1, dtype=torch.float64)], 1)
            x = torch.cat(wants[kind]).double()  # [N, L, D]
            lin = short_maps(space.adapters(target)["out"])[kind_i]
            for layer in range(L):
                root = w[:, layer, None].sqrt()
                sol = torch.linalg.lstsq(z1 * root, x[:, layer] * root).solution  # [Q+1, D]
                got_w = lin.weight[layer * D:(layer + 1) * D].double()  # [D, Q]
                got_b = lin.bias[layer * D:(layer + 1) * D].double()
                assert torch.allclose(got_w, sol[:8].T, atol=2e-4, rtol=1e-3), (target, kind, layer)
                assert torch.allclose(got_b, sol[8], atol=2e-4, rtol=1e-3), (target, kind, layer)
