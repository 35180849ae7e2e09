"""The token readout (kvlingua.readout): its forward against a per-position loop, its joint fit with OUT against
squared errors and a table computed here, and its place in the space (config, adapter files, decode, training)."""
from __future__ import annotations

import pytest
import torch

from kvlingua.align import read_along
from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock
from kvlingua.closedform import closed_form_init
from kvlingua.readout import TokenReadout
from kvlingua.readout_fit import fit_token_readout
from kvlingua.space import SharedSpace
from kvlingua.space_config import SpaceConfig
from kvlingua.view import CacheView
from tests.helpers import tiny_model
from tests.kvlingua.test_closedform import batches

torch.set_num_threads(1)


def test_fresh_readout_adds_nothing_and_a_set_one_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    B, S, L, D, V, H = 2, 6, 3, 4, 10, 5
    block = KVBlock(torch.randn(B, S, L, D, generator=g), torch.randn(B, S, L, D, generator=g), 1)
    ids = torch.randint(0, V, (B, S), generator=g)
    table = torch.randn(V, H, generator=g)
    readout = TokenReadout(H, L, D)
    with pytest.raises(ValueError, match="no embedding to read"):
        readout(block, ids)
    readout.bind(lambda i: table[i])
    same = readout(block, ids)
    assert torch.equal(same.keys, block.keys) and torch.equal(same.values, block.values)
    with torch.no_grad():
        readout.center.copy_(torch.randn(H, generator=g))
        readout.keys.weight.copy_(torch.randn(L * D, 2 * H, generator=g))
        readout.values.weight.copy_(torch.randn(L * D, 2 * H, generator=g))
    got = readout(block, ids)
    for kind in ("keys", "values"):
        w = getattr(readout, kind).weight.detach()  # [L*D, 2H]
        want = getattr(block, kind).clone()
        for b in range(B):
            for s in range(S):
                prev = table[ids[b, s - 1]] - readout.center if s else torch.zeros(H)
                want[b, s] += (w[:, :H] @ (table[ids[b, s]] - readout.center) + w[:, H:] @ prev).reshape(L, D)
        torch.testing.assert_close(getattr(got, kind), want)
    with pytest.raises(ValueError, match="do not match"):
        readout(block, ids[:, :3])
    readout.bind(lambda i: table[i][..., :3])
    with pytest.raises(ValueError, match="expected width 5"):
        readout(block, ids)
    import pickle
    assert not pickle.loads(pickle.dumps(readout)).bound  # the embedding is the model's, not the adapter's


def _pool():
    models = {"a": tiny_model("llama", seed=0, layers=2, kv_heads=2), "b": tiny_model("gemma2", seed=2, layers=3)}
    backend = LocalBackend(models)
    return models, backend, {m: backend.summary(m) for m in models}


def _squared_error(space, backend, bs, target):
    """Mean over the calibration rows the fit reads (every decoded position but the first, every source) of the
    squared error of what ``target`` decodes against its own cache, per kind, computed here."""
    view = CacheView.of(space.cfg)
    k = view.sink_tokens
    err = {"keys": [], "values": []}
    with torch.no_grad():
        for b in bs:
            own = view.to_space(backend.prefix_block(target, b.prefix(target)), backend.rotation(target))
            for src in space.names:
                z = space.encode(view.to_space(backend.prefix_block(src, b.prefix(src)), backend.rotation(src)), src)
                out = space.decode(read_along(z, b.align(src, target, k)), target, b.prefix(target)[:, k:])
                for kind in err:
                    d = (getattr(out, kind) - getattr(own, kind))[:, 1:]  # [B, P-k-1, L, D]
                    err[kind].append(d.pow(2).flatten(2).sum(-1).reshape(-1))
    return {kind: float(torch.cat(v).double().mean()) for kind, v in err.items()}


def test_joint_fit_lowers_the_calibration_error_by_the_ratio_it_records():
    """The readout's joint refit of OUT decodes the calibration rows with less squared error than Σ alone (a tiny
    model's layer-0 cache is a function of its token), and the record's ratio is the ratio of the two errors
    measured here on decoded blocks; the readout centres the embeddings on their calibration mean."""
    models, backend, members = _pool()
    calib = batches(list(models), 4)
    spaces = {}
    for on in (False, True):
        torch.manual_seed(0)
        spaces[on] = SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_readout=on)).bind_tokens(backend)
        closed_form_init(spaces[on], backend, calib, list(models))
    record = fit_token_readout(spaces[True], backend, calib, list(models))
    for m in models:
        alone, joint = _squared_error(spaces[False], backend, calib, m), _squared_error(spaces[True], backend, calib, m)
        for kind in ("keys", "values"):
            assert joint[kind] < 0.9 * alone[kind]
            assert record[f"init/readout/{m}/{kind}/error_ratio"] == pytest.approx(joint[kind] / alone[kind], rel=0.02)
        emb = torch.cat([backend.token_embeddings(m, bt.prefix(m))[:, 2:] for bt in calib])  # [.., P-2, H]
        torch.testing.assert_close(spaces[True].adapters(m)["readout"].center, emb.reshape(-1, emb.shape[-1]).mean(0),
                                   rtol=0, atol=1e-4)  # the embeddings' mean where the fit reads them


def test_readout_config_is_checked_and_travels_with_the_adapters(tmp_path):
    with pytest.raises(ValueError, match="token_readout .* needs init: closed_form"):
        SpaceConfig(init="random", token_readout=True)
    with pytest.raises(ValueError, match="out_weights: uniform"):
        SpaceConfig(token_readout=True, out_weights="attention")
    with pytest.raises(ValueError, match="token_readout must be true or false"):
        SpaceConfig(token_readout=2)
    from safetensors.torch import save_file

    model = tiny_model("llama", seed=0, layers=2, kv_heads=2)
    members = {"a": LocalBackend({"a": model}).summary("a")}
    space = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear", token_readout=True))
    with torch.no_grad():
        space.adapters("a")["readout"].center.normal_()
        space.adapters("a")["readout"].keys.weight.normal_()
    save_file(space.adapter_state("a"), str(tmp_path / "a.safetensors"))
    again = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear", token_readout=True))
    again.load_adapter_file("a", tmp_path / "a.safetensors")
    for name in ("center", "keys.weight"):
        assert torch.equal(again.adapters("a")["readout"].state_dict()[name], space.adapters("a")["readout"].state_dict()[name])
    without = SharedSpace(members, SpaceConfig(q_dim=4, adapter="linear"))
    with pytest.raises(ValueError, match="unexpected tensors"):
        without.load_adapter_file("a", tmp_path / "a.safetensors")


def test_start_adapters_fits_the_readout_before_the_prior_and_training_moves_it():
    """``init: closed_form`` with a readout and a prior: the readout is fitted (its record), the prior's gate compares
    with and without the prior over the readout's decode, and the readout's maps are trained parameters."""
    from kvlingua.train import start_adapters

    models, backend, members = _pool()
    calib = batches(list(models), 3)
    torch.manual_seed(0)
    space = SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_readout=True, token_prior=8))
    record, _ = start_adapters(space, backend, iter(calib), list(models), list(models))
    assert {f"init/readout/{m}/keys/error_ratio" for m in models} <= set(record)
    assert {f"init/prior/{m}/kept" for m in models} <= set(record)
    params = {id(p) for p in space.parameters_of(["b"])}
    readout = space.adapters("b")["readout"]
    assert id(readout.keys.weight) in params and id(readout.values.weight) in params
    assert readout.keys.weight.abs().max() > 0


def test_the_fit_reads_the_same_whatever_the_embeddings_scale():
    """Gemma multiplies its embeddings by √H, SmolLM2 does not: the joint fit standardizes the tokens against Σ, so
    a target whose embeddings were 10⁵× larger decodes the same cache (were the ridge scaled wrong, Σ's weights would
    be shrunk to nothing beside the tokens')."""
    models, backend, members = _pool()

    class Scaled(LocalBackend):
        def token_embeddings(self, model, input_ids):
            return super().token_embeddings(model, input_ids) * 1e5

    scaled = Scaled(models)
    calib = batches(list(models), 3)
    outs = []
    for bk in (backend, scaled):
        torch.manual_seed(0)
        space = SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_readout=True)).bind_tokens(bk)
        closed_form_init(space, bk, calib, list(models))
        fit_token_readout(space, bk, calib, list(models))
        view = CacheView.of(space.cfg)
        b = calib[0]
        with torch.no_grad():
            z = space.encode(view.to_space(bk.prefix_block("a", b.prefix("a")), bk.rotation("a")), "a")
            outs.append(space.decode(read_along(z, b.align("a", "b", 1)), "b", b.prefix("b")[:, 1:]))
    torch.testing.assert_close(outs[1].keys, outs[0].keys, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(outs[1].values, outs[0].values, rtol=1e-3, atol=1e-3)


def test_the_joint_fit_is_a_ridge_on_standardized_rows_computed_here():
    """OUT's short path and the readout's maps equal a ridge regression solved here from the rows themselves: every
    source's Σ at the target's decoded positions but the first, beside the target's centred embeddings there and one
    position before, the embeddings scaled so their mean variance is Σ's, ``λ = ridge ·`` the mean variance."""
    from kvlingua.closedform import short_maps

    models, backend, members = _pool()
    calib = batches(list(models), 3)
    torch.manual_seed(0)
    space = SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_readout=True)).bind_tokens(backend)
    closed_form_init(space, backend, calib, list(models))
    view = CacheView.of(space.cfg)
    xs, ys = {"keys": [], "values": []}, {"keys": [], "values": []}
    with torch.no_grad():
        for b in calib:
            own = view.to_space(backend.prefix_block("b", b.prefix("b")), backend.rotation("b"))
            e = backend.token_embeddings("b", b.prefix("b")).double()  # [B, P, H]
            for src in models:
                z = read_along(space.encode(view.to_space(backend.prefix_block(src, b.prefix(src)),
                                                          backend.rotation(src)), src), b.align(src, "b", 1))
                for kind in xs:
                    x = torch.cat([getattr(z, kind)[:, 1:].double(), e[:, 2:], e[:, 1:-1]], -1)  # [B, P-2, Q+2H]
                    xs[kind].append(x.reshape(-1, x.shape[-1]))
                    ys[kind].append(getattr(own, kind)[:, 1:].reshape(x.shape[0] * x.shape[1], -1).double())
    fit_token_readout(space, backend, calib, ["b"])
    q = space.cfg.q_dim
    for i, kind in enumerate(("keys", "values")):
        x, y = torch.cat(xs[kind]), torch.cat(ys[kind])
        xc, yc = x - x.mean(0), y - y.mean(0)
        var = xc.pow(2).mean(0)  # [F]
        s = torch.ones(x.shape[1], dtype=x.dtype)
        s[q:] = (var[:q].mean() / var[q:].mean()).sqrt()
        xs_ = xc * s
        lam = space.cfg.ridge * xs_.pow(2).mean(0).mean()
        w = torch.linalg.solve(xs_.T @ xs_ / len(x) + lam * torch.eye(x.shape[1], dtype=x.dtype),
                               xs_.T @ yc / len(x)).T * s  # [d, F]
        got_out = short_maps(space.adapters("b")["out"])[i].weight.double()
        got_tok = getattr(space.adapters("b")["readout"], kind).weight.double()
        torch.testing.assert_close(got_out, w[:, :q], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(got_tok, w[:, q:], rtol=1e-3, atol=1e-4)


def test_a_prior_fitted_over_a_readout_corrects_what_the_readout_decodes():
    """The token prior is fitted after the readout: a token it corrects gets the shrunk mean of (own − decoded with
    the readout), computed here from the decoded blocks; not of what Σ alone decodes."""
    from kvlingua.prior_fit import PRIOR_SHRINK, fit_token_prior

    models, backend, members = _pool()
    calib = batches(list(models), 3)
    torch.manual_seed(0)
    space = SharedSpace(members, SpaceConfig(q_dim=6, adapter="linear", token_readout=True, token_prior=8))
    space.bind_tokens(backend)
    closed_form_init(space, backend, calib, list(models))
    fit_token_readout(space, backend, calib, list(models))
    fit_token_prior(space, backend, calib, list(models), gate=False)
    view = CacheView.of(space.cfg)
    prior = space.adapters("b")["prior"]
    res = {int(t): [] for t in prior.ids if t >= 0}
    with torch.no_grad():
        for b in calib:
            own = view.to_space(backend.prefix_block("b", b.prefix("b")), backend.rotation("b"))
            body = b.prefix("b")[:, 1:]
            for src in models:
                z = space.encode(view.to_space(backend.prefix_block(src, b.prefix(src)), backend.rotation(src)), src)
                out = space.decode(read_along(z, b.align(src, "b", 1)), "b", body, prior=False)
                for t in res:
                    res[t].append((own.keys - out.keys)[body == t])  # [n, L, D]
    checked = 0
    for slot, t in enumerate(prior.ids.tolist()):
        if t < 0:
            continue
        r = torch.cat(res[t])
        for layer in range(r.shape[1]):
            if prior.scale_keys[slot, layer] == 1:
                want = r[:, layer].mean(0) * len(r) / (len(r) + PRIOR_SHRINK)
                torch.testing.assert_close(prior.shift_keys[slot, layer], want, rtol=1e-3, atol=1e-4)
                checked += 1
    assert checked > 0
