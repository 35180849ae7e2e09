"""The training loop: config checks, schedule, clipping, frozen weights, seam gradients, resume, quality."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from kvlingua.backend import LocalBackend
from kvlingua.cache import as_past_key_values, cache_kwargs, extract_prefix, fingerprint
from kvlingua.space import SharedSpace
from kvlingua.runtime import Runtime
from kvlingua.checkpoint import load_checkpoint, save_checkpoint
from kvlingua.outinit import match_init
from kvlingua.batch import Batch
from kvlingua.space_config import SpaceConfig
from kvlingua.train import fit, train_step
from kvlingua.train_config import TrainConfig, TrainState
from tests.helpers import VOCAB, paper_space as make_space, tiny_model

QUIET = Runtime(progress=False)

P, S, B = 6, 6, 4


def random_batches(names, seed=0, batch=B, length=P + S):
    g = torch.Generator().manual_seed(seed)
    step = 0
    while True:
        yield Batch.same_text(torch.randint(0, VOCAB, (batch, length), generator=g), names, P, key=f"r/{step}")
        step += 1




@pytest.fixture(scope="module")
def pool2():
    return LocalBackend({"a": tiny_model("gemma2", seed=0), "c": tiny_model("llama", seed=2, layers=3, kv_heads=2)})


@pytest.fixture(scope="module")
def pool3():
    return LocalBackend({"a": tiny_model("gemma2", seed=0), "b": tiny_model("gemma2", seed=1),
                         "c": tiny_model("llama", seed=2, layers=3, kv_heads=2)})


def params_of(space, name):
    return {k: p.detach().clone() for k, p in space.adapters(name).named_parameters()}


# -- configs and batches ---------------------------------------------------------------------
def test_batch_slices_and_checks():
    src, tgt = torch.arange(20).view(2, 10), torch.arange(100, 120).view(2, 10)
    b = Batch({"en": src, "es": tgt}, prefix_len=4)
    assert torch.equal(b.prefix("en"), src[:, :4]) and torch.equal(b.suffix("es"), tgt[:, 4:])
    with pytest.raises(KeyError, match="no ids for model 'ru'"):
        b.prefix("ru")
    with pytest.raises(ValueError, match="batch size"):
        Batch({"a": src, "b": tgt[:1]}, 4)
    with pytest.raises(ValueError, match="at least 2 more"):
        Batch({"a": src}, 9)
    with pytest.raises(ValueError, match="integer tensor"):
        Batch({"a": src.float()}, 4)
    with pytest.raises(ValueError, match="prefix_len"):
        Batch({"a": src}, 0)


# -- optimiser (the schedule and parameter groups: test_train_config.py) -------------------------
def test_gradients_are_clipped_to_one(pool2):
    space = make_space(pool2, adapter="linear")
    seen = {}

    def inflate(params):  # runs after backward, before clipping (where the ranks average their gradients)
        for p in params:
            p.grad.mul_(1e3)
        seen["pre"] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        seen["dir"] = torch.cat([p.grad.flatten() for p in params]).clone()

    def pre_hook(opt, args, kwargs):
        grads = torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])
        seen["post"], seen["post_dir"] = grads.norm().item(), grads.clone()

    handle = register_optimizer_step_pre_hook(pre_hook)
    try:
        state = fit(space, pool2, random_batches(pool2.names()), TrainConfig(steps=1, log_every=1),
                    runtime=Runtime(grad_sync=inflate, progress=False))
    finally:
        handle.remove()
    assert seen["pre"] > 10
    assert seen["post"] == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(seen["post_dir"], seen["dir"] / seen["pre"], atol=1e-7)
    assert state.history[-1]["grad_norm"] == pytest.approx(seen["pre"], rel=1e-5)


# -- what moves ---------------------------------------------------------------------------------
def test_frozen_models_stay_bit_identical_and_only_adapters_move(pool2):
    prints = {n: fingerprint(m) for n, m in pool2.models.items()}
    space = make_space(pool2, adapter="linear")
    before = {n: params_of(space, n) for n in pool2.names()}
    fit(space, pool2, random_batches(pool2.names()), TrainConfig(steps=2, lr=1e-2), runtime=QUIET)
    assert {n: fingerprint(m) for n, m in pool2.models.items()} == prints
    assert all(not p.requires_grad for m in pool2.models.values() for p in m.parameters())
    for n in pool2.names():
        after = params_of(space, n)
        assert all(not torch.equal(before[n][k], after[k]) for k in after), n


def test_only_trainable_adapters_move(pool3):
    space = make_space(pool3)
    before = {n: params_of(space, n) for n in pool3.names()}
    cfg = TrainConfig(steps=2, lr=1e-2, trainable=("c",), paths_per_step=2)
    state = fit(space, pool3, random_batches(pool3.names()), cfg, runtime=QUIET)
    for n in ("a", "b"):
        after = params_of(space, n)
        assert all(torch.equal(before[n][k], after[k]) for k in after), n
    after = params_of(space, "c")
    assert sum(not torch.equal(before["c"][k], after[k]) for k in after) > len(after) // 2
    trained_paths = {k.split("/", 1)[1] for h in state.history for k in h if k.startswith("suffix/")}
    assert trained_paths and all("c" in p.split("->") for p in trained_paths)


# -- gradients through the seam -----------------------------------------------------------------
def test_train_step_gradients_equal_direct_autograd(pool3):
    space = make_space(pool3)
    names = pool3.names()
    gen = torch.Generator().manual_seed(3)
    ids = {n: torch.randint(0, VOCAB, (B, P + S), generator=gen) for n in names}  # parallel-text batch
    batch = Batch(ids, P)
    # llama -> gemma2, gemma2 -> llama twice (one encoding of c feeds two decoders), cyclic
    paths = [("a", "c"), ("c", "b"), ("c", "a"), ("b", "b")]
    cfg = TrainConfig(steps=1, recon_weight=0.5)
    metrics = train_step(space, pool3, batch, paths, cfg)
    seam = {k: p.grad.clone() for k, p in space.named_parameters() if p.grad is not None}
    space.zero_grad(set_to_none=True)

    models = pool3.models
    total = 0.0
    for i, j in paths:
        out = space.translate(extract_prefix(models[i], ids[i][:, :P]), i, j)
        own = extract_prefix(models[j], ids[j][:, :P])
        logits = models[j](input_ids=ids[j][:, P:], use_cache=True, **cache_kwargs(models[j], as_past_key_values(out))).logits
        lm = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[j][:, P + 1:].reshape(-1))
        tokens = out.keys.shape[0] * out.keys.shape[1]  # the paper's ||OUT_j(IN_i(KV_i)) - KV_j||² per token
        recon = (((out.keys - own.keys) ** 2).sum() + ((out.values - own.values) ** 2).sum()) / tokens
        total = total + (lm + 0.5 * recon) / len(paths)
        assert metrics[f"suffix/{i}->{j}"] == pytest.approx(float(lm.detach()), abs=1e-5)
    total.backward()
    direct = {k: p.grad for k, p in space.named_parameters() if p.grad is not None}
    assert metrics["loss"] == pytest.approx(float(total.detach()), abs=1e-5)
    assert set(seam) == set(direct)
    assert max((seam[k] - direct[k]).abs().max().item() for k in seam) < 1e-5
    assert max(g.abs().max().item() for g in direct.values()) > 1e-4


def test_bf16_precision_trains_like_fp32(pool2):
    batch = next(random_batches(pool2.names(), seed=5))
    cfg = TrainConfig(steps=2, lr=1e-2, log_every=1)
    fp32 = make_space(pool2, seed=3)
    bf16 = make_space(pool2, seed=3)
    before = {k: v.clone() for k, v in bf16.state_dict().items()}
    ref = fit(fp32, pool2, iter([batch, batch]), cfg, runtime=QUIET)
    state = fit(bf16, pool2, iter([batch, batch]), replace(cfg, precision="bf16"), runtime=QUIET)
    # the same first-step loss up to bf16 rounding of the adapters' matmuls (fp32 computes it independently)
    assert state.history[0]["loss"] == pytest.approx(ref.history[0]["loss"], rel=2e-2)
    assert all(math.isfinite(h["loss"]) for h in state.history)
    moved = [k for k, v in bf16.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) > len(before) // 2, "bf16 training must update the adapters"
    assert all(p.dtype == torch.float32 for p in bf16.parameters()), "master weights stay fp32"
    assert not torch.is_autocast_enabled("cpu"), "autocast must not leak out of the loop"


def test_adapters_no_sampled_path_used_do_not_move(pool3):
    """A step that trains only a->b runs IN_a and OUT_b: every other adapter stays bit-identical
    (no AdamW momentum or weight decay on adapters without a gradient)."""
    space = make_space(pool3, seed=2)
    before = {k: v.clone() for k, v in space.state_dict().items()}
    cfg = TrainConfig(steps=2, lr=1e-2, weight_decay=0.5, paths=(("a", "b"),))
    fit(space, pool3, random_batches(pool3.names()), cfg, runtime=QUIET)
    after = space.state_dict()
    changed = {".".join(k.split(".")[1:3]) for k in after if not torch.equal(after[k], before[k])}  # _adapters.a.in...
    assert changed == {"a.in", "b.out"}


# -- hooks, checkpoints, resume -----------------------------------------------------------------
class RecordingTracker:
    def __init__(self):
        self.metrics = []

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path):
        pass

    def handle(self):
        return None

    def close(self, status="FINISHED"):
        pass


def test_hooks_eval_log_and_checkpoint(pool2):
    space = make_space(pool2, adapter="linear")
    calls, ckpts, tracker = [], [], RecordingTracker()

    def eval_fn(step):
        assert not space.training and not torch.is_grad_enabled()
        calls.append(step)
        return {"eval/nll/a->b": 1.0 / (step + 1)}

    cfg = TrainConfig(steps=7, eval_every=3, log_every=2, checkpoint_every=4, paths_per_step=1)
    state = fit(space, pool2, random_batches(pool2.names()), cfg, eval_fn=eval_fn,
                checkpoint_fn=lambda s: ckpts.append((s.step, s.optimizer_state is not None)),
                runtime=Runtime(tracker=tracker, progress=False))
    assert calls == [0, 3, 6, 7]
    assert ckpts == [(4, True), (7, True)]
    train = [h["step"] for h in state.history if h["kind"] == "train"]
    evals = [(h["step"], h["eval/nll/a->b"]) for h in state.history if h["kind"] == "eval"]
    assert train == [2, 4, 6, 7] and evals == [(s, 1.0 / (s + 1)) for s in (0, 3, 6, 7)]
    assert [s for s, _ in tracker.metrics] == [0, 2, 3, 4, 6, 6, 7, 7]
    assert {"loss", "lr", "grad_norm"} <= set(tracker.metrics[1][1])
    quiet = RecordingTracker()
    fit(make_space(pool2, adapter="linear"), pool2, random_batches(pool2.names()),
        TrainConfig(steps=3, eval_every=1, log_every=1, paths_per_step=1),
        runtime=Runtime.for_rank(1, 2, quiet, grad_sync=None), eval_fn=lambda s: {"x": 1.0})
    assert quiet.metrics == []


def test_batches_running_out_is_an_error(pool2):
    space = make_space(pool2, adapter="linear")
    batches = [next(random_batches(pool2.names()))] * 2
    with pytest.raises(ValueError, match="ran out at step 2 of 3"):
        fit(space, pool2, iter(batches), TrainConfig(steps=3), runtime=QUIET)


def test_checkpoint_resume_equals_uninterrupted_run(pool2, tmp_path):
    cfg = TrainConfig(steps=5, lr=5e-3, paths_per_step=2, log_every=1, recon_weight=0.1)
    gen = random_batches(pool2.names(), seed=11)
    batches = [next(gen) for _ in range(cfg.steps)]

    full = make_space(pool2, seed=4)
    full_state = fit(full, pool2, iter(batches), cfg, runtime=QUIET)

    part = make_space(pool2, seed=4)
    cut = TrainConfig(**{**cfg.__dict__, "checkpoint_every": 3})
    saved = {}

    def checkpoint(state):
        if state.step == 3:
            saved["dir"] = save_checkpoint(tmp_path / "ckpt", part, state)
            raise KeyboardInterrupt  # the run dies right after its checkpoint

    with pytest.raises(KeyboardInterrupt):
        fit(part, pool2, iter(batches), cut, checkpoint_fn=checkpoint, runtime=QUIET)

    resumed = make_space(pool2, seed=99)  # different init: everything must come from the checkpoint
    state = load_checkpoint(saved["dir"], resumed)
    assert state.step == 3 and [h["step"] for h in state.history] == [1, 2, 3]
    state = fit(resumed, pool2, iter(batches[state.step:]), cfg, state=state, runtime=QUIET)
    assert state.step == 5
    for (k, p), (k2, q) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert k == k2 and torch.equal(p, q), k
    assert state.history == full_state.history


def test_load_checkpoint_errors(pool2, tmp_path):
    space = make_space(pool2, adapter="linear")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_checkpoint(tmp_path, space)
    save_checkpoint(tmp_path / "c", space, TrainState())
    other = SharedSpace({"a": pool2.summary("a")}, SpaceConfig(q_dim=24, adapter="linear"))
    with pytest.raises(ValueError, match="does not match this space"):
        load_checkpoint(tmp_path / "c", other)


# -- a short run that learns ---------------------------------------------------------------------
def group_language(n: int, length: int, seed: int, groups: int = 8, p_group: float = 0.6) -> torch.Tensor:
    """Synthetic text with long-range structure: ``[n, length]`` ids.

    Each sequence has a hidden topic (one of ``groups`` blocks of the vocabulary); every token
    is drawn from its topic's block with probability ``p_group``, else uniformly from the whole
    vocabulary. A model that has read the prefix knows the topic; without it, the early suffix
    tokens are much harder to predict.
    """
    g = torch.Generator().manual_seed(seed)
    size = VOCAB // groups
    topic = torch.randint(0, groups, (n, 1), generator=g)
    ids = topic * size + torch.randint(0, size, (n, length), generator=g)
    noise = torch.rand(n, length, generator=g) > p_group
    return torch.where(noise, torch.randint(0, VOCAB, (n, length), generator=g), ids)


def pretrain_on_group_language(model, seed: int, steps: int = 60, lr: float = 1e-2, length: int = 32):
    """Train a frozen tiny model on :func:`group_language` for a few dozen steps, then freeze it again."""
    torch.manual_seed(seed)
    model.requires_grad_(True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        ids = group_language(32, length, seed=1000 * seed + step)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def test_short_run_transfers_content_between_two_pretrained_models():
    from kvlingua.evaluate import evaluate

    P16 = 16
    backend = LocalBackend({"m0": pretrain_on_group_language(tiny_model("gemma2", seed=10), seed=1),
                            "m1": pretrain_on_group_language(tiny_model("gemma2", seed=11), seed=2)})
    held_out = [Batch.same_text(group_language(32, 2 * P16, seed=900 + k), backend.names(), P16) for k in range(2)]
    before = evaluate(backend, held_out, [("m0", "m1")], {}, first_tokens=4)
    base, nopre = before.summary_for(("m0", "m1"), "base"), before.summary_for(("m0", "m1"), "no-prefix")
    assert base.first_mean < nopre.first_mean - 0.2, "the pretrained target must use its prefix"

    def batches():
        step = 0
        while True:
            yield Batch.same_text(group_language(16, 2 * P16, seed=5000 + step), backend.names(), P16)
            step += 1

    space = make_space(backend, q_dim=32)
    fit(space, backend, batches(), TrainConfig(steps=30, lr=1e-2), runtime=QUIET)
    res = evaluate(backend, held_out, [("m0", "m1"), ("m1", "m0")], {"translator": space},
                   first_tokens=4)
    for path in res.paths:
        t, ident = res.summary_for(path, "translator"), res.summary_for(path, "identity")
        nopre, base = res.summary_for(path, "no-prefix"), res.summary_for(path, "base")
        assert t.nll_mean < ident.nll_mean - 0.3, path
        assert t.nll_mean < nopre.nll_mean - 0.05, path
        assert t.first_mean < nopre.first_mean - 0.2, path
        assert t.content_first > 0.6 and ident.content_first < 0.2, path


# -- out_init: match -------------------------------------------------------------------------
def _channel_moments(t):
    flat = t.reshape(-1, t.shape[-2] * t.shape[-1]) if t.dim() == 4 else t.reshape(-1, t.shape[-1])
    return flat.mean(0), flat.std(0, unbiased=False)


def test_match_init_standardizes_sigma_and_gives_out_its_targets_statistics(pool3):
    space = make_space(pool3, init="match")
    batch = next(random_batches(pool3.names(), seed=5))
    frozen = params_of(space, "b")
    record = match_init(space, pool3, batch, trainable=["a", "c"], targets=["a", "c"])
    assert set(record) == {"init/out_shift/a", "init/out_shift/c"}
    with torch.no_grad():
        own = {m: pool3.prefix_block(m, batch.prefix(m)) for m in pool3.names()}
        for i in ("a", "c"):
            z = space.encode(own[i], i)  # [B, P, Q]
            for t in (z.keys, z.values):
                mean, std = _channel_moments(t)
                torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
                torch.testing.assert_close(std, torch.ones_like(std), atol=1e-3, rtol=0)
        for j in ("a", "c"):
            outs = [space.decode(space.encode(own[m], m), j) for m in pool3.names()]  # each [B, P, L_j, D_j]
            for got, want in ((torch.cat([o.keys for o in outs]), own[j].keys),
                              (torch.cat([o.values for o in outs]), own[j].values)):
                (gm, gs), (wm, ws) = _channel_moments(got), _channel_moments(want)
                torch.testing.assert_close(gm, wm, atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(gs, ws, atol=1e-4, rtol=1e-3)
    after = params_of(space, "b")
    assert all(torch.equal(after[k], frozen[k]) for k in after)  # b is frozen: neither of its adapters moved


def test_fit_matches_once_at_a_fresh_start_and_resume_equals_uninterrupted(pool2, tmp_path):
    cfg = TrainConfig(steps=4, lr=5e-3, log_every=1)
    gen = random_batches(pool2.names(), seed=2)
    batches = [next(gen) for _ in range(cfg.steps)]
    full = make_space(pool2, seed=1, init="match")
    at_start = {}

    def eval_fn(step):  # the evaluation at step 0 sees the space right after the init
        if step == 0:
            at_start.update({k: p.clone() for k, p in full.state_dict().items()})
        return {}

    state = fit(full, pool2, iter(batches), replace(cfg, eval_every=10), eval_fn=eval_fn, runtime=QUIET)
    assert [h["kind"] for h in state.history[:2]] == ["init", "eval"] and state.step == 4
    reference = make_space(pool2, seed=1, init="match")
    match_init(reference, pool2, batches[0], ["a", "c"], ["a", "c"])  # on the first batch, every adapter
    assert at_start.keys() == reference.state_dict().keys()
    for k, p in reference.state_dict().items():
        assert torch.equal(at_start[k], p), k
    unmatched = make_space(pool2, seed=1)
    assert any(not torch.equal(unmatched.state_dict()[k], p) for k, p in at_start.items())

    part = make_space(pool2, seed=1, init="match")
    saved = {}

    def checkpoint(s):
        if s.step == 2:
            saved["dir"] = save_checkpoint(tmp_path / "ckpt", part, s)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(part, pool2, iter(batches), replace(cfg, eval_every=10, checkpoint_every=2), checkpoint_fn=checkpoint,
            runtime=QUIET)
    resumed = make_space(pool2, seed=7, init="match")
    st = load_checkpoint(saved["dir"], resumed)
    st = fit(resumed, pool2, iter(batches[st.step:]), replace(cfg, eval_every=10), state=st, runtime=QUIET)  # no re-init
    for p, q in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(p, q)
    assert [h for h in st.history if h["kind"] != "eval"] == [h for h in state.history if h["kind"] != "eval"]
