"""ModelHost actors and RayBackend against the in-process LocalBackend; the tensor wire format."""
import contextlib
import warnings

import numpy as np
import pytest
import torch

from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock, extract_prefix
from kvlingua.models import load_frozen
from tests.helpers import VOCAB
from workers.backend import RayBackend
from workers.config import HostOptions
from workers.host import ModelHost, spawn_hosts
from workers.wire import block_from_wire, block_to_wire, tensor_from_wire, tensor_to_wire
from workers.streaming import BlockPrefetcher

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def block_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("blocks")


@pytest.fixture(scope="module")
def hosts(ray_local, pool_dirs, block_dir):
    return spawn_hosts(pool_dirs, HostOptions(num_cpus=0.25, block_dir=str(block_dir)))


@pytest.fixture(scope="module")
def local(pool_dirs):
    return LocalBackend({n: load_frozen(p) for n, p in pool_dirs.items()})


def _ids(seed, b=2, n=10):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def test_remote_blocks_losses_and_gradients_match_local(hosts, local):
    remote = RayBackend(hosts)
    assert remote.names() == ["a", "b"] and remote.summary("b") == local.summary("b")
    assert remote.fingerprint("a") == local.fingerprint("a")
    ids = _ids(0)
    src_r, src_l = remote.prefix_block("a", ids[:, :6]), local.prefix_block("a", ids[:, :6])
    assert (src_r.keys - src_l.keys).abs().max() < 1e-6 and src_r.n_kv_heads == src_l.n_kv_heads

    # a linear a->b translator trained through either backend gets the same gradient
    sa, sb = local.summary("a"), local.summary("b")
    torch.manual_seed(0)
    adapter = torch.nn.Linear(sa.num_layers * sa.width, sb.num_layers * sb.width)
    grads = []
    for backend in (remote, local):
        adapter.zero_grad()
        src = backend.prefix_block("a", ids[:, :6])
        B, P = ids.shape[0], 6
        k = adapter(src.keys.reshape(B, P, -1)).reshape(B, P, sb.num_layers, sb.width)  # [B, P, L_b, D_b]
        v = adapter(src.values.reshape(B, P, -1)).reshape(B, P, sb.num_layers, sb.width)
        loss, g = backend.suffix_loss_and_grad("b", KVBlock(k, v, sb.n_kv_heads), ids[:, 6:])
        torch.autograd.backward([k, v], [g.keys, g.values])
        grads.append((loss, adapter.weight.grad.clone(), g))
    (lr, wr, gr), (ll, wl, gl) = grads
    assert abs(float(lr) - float(ll)) < 1e-5
    assert (gr.keys - gl.keys).abs().max() < 1e-5 and (gr.values - gl.values).abs().max() < 1e-5
    assert (wr - wl).abs().max() < 1e-5 and wl.abs().max() > 0

    nll_r = remote.suffix_nll("a", src_r, ids[:, 6:])
    assert nll_r.shape == (2, 3) and (nll_r - local.suffix_nll("a", src_l, ids[:, 6:])).abs().max() < 1e-5
    assert (remote.suffix_nll("b", None, ids) - local.suffix_nll("b", None, ids)).abs().max() < 1e-5
    mass_r = remote.attention_received("a", src_r, ids[:, 6:])  # [B, L, P]: the host's own attention over the wire
    mass_l = local.attention_received("a", src_l, ids[:, 6:])
    assert mass_r.shape == (2, src_l.num_layers, 6) and (mass_r - mass_l).abs().max() < 1e-6
    assert mass_l.sum(-1).max() <= 1 + 1e-5 and mass_l.min() >= 0
    noise = KVBlock(torch.randn_like(src_l.keys), torch.randn_like(src_l.values), src_l.n_kv_heads)
    fresh_r = remote.refresh("a", noise, ids[:, :6], ids[:, 6:7], 0.5, 1)  # the host recomputes 3 of 5 positions
    fresh_l = local.refresh("a", noise, ids[:, :6], ids[:, 6:7], 0.5, 1)
    assert (fresh_r.keys - fresh_l.keys).abs().max() < 1e-5 and (fresh_r.values - fresh_l.values).abs().max() < 1e-5
    changed = (fresh_l.keys != noise.keys).any(-1).any(-1)  # [B, P]
    assert changed.sum(-1).tolist() == [3, 3] and not changed[:, 0].any()  # never the sink
    for m in ("a", "b"):  # a token readout's inputs: what the model's first layer reads, from its host as here
        emb_r, emb_l = remote.token_embeddings(m, ids), local.token_embeddings(m, ids)  # [B, n, H]
        with torch.no_grad():
            first = local.models[m](input_ids=ids, output_hidden_states=True).hidden_states[0]
        assert emb_r.shape == (2, 10, local.summary(m).hidden_size) and torch.equal(emb_r, emb_l)
        torch.testing.assert_close(emb_l, first.float(), rtol=0, atol=1e-6)


def test_bad_requests_are_refused(hosts, local):
    remote = RayBackend(hosts)
    with pytest.raises(KeyError, match="unknown pool model 'c'"):
        remote.prefix_block("c", _ids(0))
    wrong = local.prefix_block("a", _ids(0)[:, :4])  # 2 layers; b has 3
    with pytest.raises(ValueError, match="does not fit b"):
        remote.suffix_loss_and_grad("b", wrong, _ids(0)[:, 4:])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        spawn_hosts({"x": "/nonexistent"})


class _Batch:
    def __init__(self, ids, prefix_len):
        self.ids, self.prefix_len = ids, prefix_len


def test_prefetcher_bounds_requests_and_reuses_them(hosts, local):
    remote = RayBackend(hosts)
    before = remote.stats()
    batches = [_Batch({"a": _ids(i), "b": _ids(100 + i)}, 6) for i in range(5)]
    pf = BlockPrefetcher(remote, batches, depth=3, sources=lambda step: ["a"] if step % 2 else ["a", "b"])
    seen = 0
    for step, batch in enumerate(pf):
        assert pf.in_flight() <= 3 and remote.pending() <= 3
        blk = remote.prefix_block("a", batch.ids["a"][:, :6])  # the loop uses only a's block
        torch.testing.assert_close(blk.keys, local.prefix_block("a", batch.ids["a"][:, :6]).keys)
        seen += 1
    assert seen == 5 and remote.pending() == 0
    after = remote.stats()
    # a's blocks came from the prefetched requests (one host call per step); b's were requested
    # for even steps only and then dropped unused
    assert after["a"]["prefix_block"] - before["a"]["prefix_block"] == 5
    assert after["b"]["prefix_block"] - before["b"]["prefix_block"] == 3


def test_killed_host_restarts_and_call_is_retried(ray_local, hosts, pool_dirs):
    import ray

    remote = RayBackend(hosts)
    pid = ray.get(hosts["a"].info.remote())["pid"]
    refs = [remote.submit_prefix("a", _ids(200 + i)[:, :6])[1] for i in range(6)]
    ray.kill(hosts["a"], no_restart=False)
    blocks = [block_from_wire(w) for w in ray.get(refs)]
    model = load_frozen(pool_dirs["a"])
    for i, block in enumerate(blocks):
        torch.testing.assert_close(block.keys, extract_prefix(model, _ids(200 + i)[:, :6]).keys)
    assert ray.get(hosts["a"].info.remote())["pid"] != pid


def test_host_block_store_extracts_once(hosts, block_dir):
    remote = RayBackend(hosts)
    ids = _ids(7)[:, :6]
    before = remote.stats()["b"]
    first, second = remote.prefix_block("b", ids), remote.prefix_block("b", ids)
    assert torch.equal(first.keys, second.keys)
    after = remote.stats()["b"]
    assert after["extractions"] - before["extractions"] == 1 and after["hits"] - before["hits"] == 1
    assert (block_dir / remote.fingerprint("b") / "p6").is_dir()


# -- the wire: zero-copy, exact, silent, and nothing writes into the object store -------------
@contextlib.contextmanager
def transport_warnings_are_errors():
    """Ray's ZeroCopyTensorsWarning and torch's read-only-array warning raise inside the block.

    torch reports the read-only warning once per process; ``set_warn_always`` makes it report
    every time, so an earlier test cannot have used it up.
    """
    from ray._private.tensor_serialization_utils import ZeroCopyTensorsWarning

    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=ZeroCopyTensorsWarning)
            warnings.filterwarnings("error", message="The given (NumPy array|buffer) is not writable")
            yield
    finally:
        torch.set_warn_always(always)


def _through_store(ray, obj):
    """``obj`` as a receiver on this node gets it: out of the object store, numpy buffers read-only."""
    return ray.get(ray.put(obj))


def test_the_readonly_warning_would_be_caught():
    """The guard is live: torch over a read-only array raises inside it (so the tests below can fail)."""
    ro = np.zeros(4, dtype=np.float32)
    ro.flags.writeable = False
    with pytest.raises(UserWarning, match="not writable"), transport_warnings_are_errors():
        torch.from_numpy(ro)


def test_wire_round_trip_is_exact_zero_copy_and_silent(ray_local):
    g = torch.Generator().manual_seed(0)
    sent = [torch.randn(2, 70, 3, 96, generator=g),  # 161 KB: goes through the object store, not inline
            torch.randn(2, 5, 2, 8, generator=g).bfloat16(), torch.randint(0, VOCAB, (2, 9), generator=g),
            torch.tensor(2.5), torch.zeros(0, 3), torch.rand(4, 4, generator=g) > 0.5,
            torch.randn(6, 4, generator=g).t()]  # non-contiguous: sent as a contiguous copy
    with transport_warnings_are_errors():
        wires = _through_store(ray_local, [tensor_to_wire(t) for t in sent])
        views = [tensor_from_wire(w, copy=False) for w in wires]
        copies = [tensor_from_wire(w, copy=True) for w in wires]
    for t, w, view, own in zip(sent, wires, views, copies):
        assert view.dtype == own.dtype == t.dtype and view.shape == own.shape == t.shape
        assert torch.equal(view, t) and torch.equal(own, t)
    big = wires[0].data
    assert not big.flags.writeable  # the read-only object-store buffer the test is about
    assert views[0].data_ptr() == big.ctypes.data  # a view of the stored bytes, no copy
    assert copies[0].data_ptr() != big.ctypes.data
    copies[0].add_(1.0)  # a private copy is the caller's to write
    assert torch.equal(views[0], sent[0])


def test_host_round_trip_is_silent_and_never_writes_the_store(ray_local, hosts, local, pool_dirs):
    """Host code over read-only store buffers (in process, where warnings are visible), then the real
    actors: no transport warning, results equal to the in-process backend, stored bytes unchanged."""
    ids = _ids(3)
    src = local.prefix_block("b", ids[:, :6])
    block = src.map(lambda t: t * 0.9)  # a "translated" block [B, 6, L_b, D_b]
    host = ModelHost("b", pool_dirs["b"])
    with transport_warnings_are_errors():
        wire = _through_store(ray_local, block_to_wire(block))
        suffix = _through_store(ray_local, tensor_to_wire(ids[:, 6:]))
        loss, gk, gv = _through_store(ray_local, host.suffix_loss_and_grad(wire, suffix))
        nll = _through_store(ray_local, host.suffix_nll(wire, suffix))
        got = block_from_wire(_through_store(ray_local, host.prefix_block(tensor_to_wire(ids[:, :6]))))
    assert not wire.keys.data.flags.writeable
    assert torch.equal(block_from_wire(wire).keys, block.keys) and torch.equal(block_from_wire(wire).values, block.values)
    ref_loss, ref_grad = local.suffix_loss_and_grad("b", block, ids[:, 6:])
    assert torch.equal(tensor_from_wire(loss, copy=True), ref_loss)
    assert torch.equal(tensor_from_wire(gk, copy=True), ref_grad.keys)
    assert torch.equal(tensor_from_wire(gv, copy=True), ref_grad.values)
    assert torch.equal(tensor_from_wire(nll, copy=True), local.suffix_nll("b", block, ids[:, 6:]))
    assert torch.equal(got.keys, src.keys) and torch.equal(got.values, src.values)

    remote = RayBackend(hosts)
    ref = ray_local.put(block_to_wire(block))
    with transport_warnings_are_errors():
        loss, gk, gv = ray_local.get(hosts["b"].suffix_loss_and_grad.remote(ref, tensor_to_wire(ids[:, 6:])))
        r_loss, r_grad = remote.suffix_loss_and_grad("b", block, ids[:, 6:])
        r_nll = remote.suffix_nll("b", block, ids[:, 6:])
        r_src = remote.prefix_block("b", ids[:, :6])
    stored = block_from_wire(ray_local.get(ref))
    assert torch.equal(stored.keys, block.keys) and torch.equal(stored.values, block.values)  # the host wrote nothing
    assert (tensor_from_wire(gk, copy=True) - ref_grad.keys).abs().max() < 1e-5
    assert abs(float(r_loss) - float(ref_loss)) < 1e-5 and (r_grad.values - ref_grad.values).abs().max() < 1e-5
    assert (r_nll - local.suffix_nll("b", block, ids[:, 6:])).abs().max() < 1e-5
    assert (r_src.keys - src.keys).abs().max() < 1e-6


def test_training_never_writes_the_source_blocks_it_reads_in_place(ray_local, hosts, local):
    """Source blocks are zero-copy views of the store: after Σ steps through them, their version
    counters (bumped by any in-place write, also through views) and their values are unchanged."""
    from kvlingua.space import SharedSpace
    from kvlingua.batch import Batch
    from kvlingua.train import fit
    from kvlingua.train_config import TrainConfig
    from kvlingua.space_config import SpaceConfig

    class Recording(RayBackend):
        def __init__(self, hosts):
            super().__init__(hosts)
            self.sources = []

        def prefix_block(self, model, input_ids):
            block = super().prefix_block(model, input_ids)
            self.sources.append((model, input_ids.clone(), block, block.keys._version, block.values._version))
            return block

    backend = Recording(hosts)
    torch.manual_seed(0)
    space = SharedSpace({n: backend.summary(n) for n in backend.names()}, SpaceConfig(q_dim=12, n_heads=2))
    batches = (Batch.same_text(_ids(300 + i, b=2, n=12), backend.names(), 6) for i in range(2))
    with transport_warnings_are_errors():
        state = fit(space, backend, batches, TrainConfig(steps=2, lr=1e-2, warmup_frac=0.0, log_every=1))
    assert state.step == 2 and len(backend.sources) >= 2
    for model, ids, block, kv, vv in backend.sources:
        assert not block.keys.is_inference() and (block.keys._version, block.values._version) == (kv, vv)
        assert (block.keys - local.prefix_block(model, ids).keys).abs().max() < 1e-6


def test_remote_suffix_kl_matches_local_and_the_host_keeps_its_teacher(hosts, local):
    """The KL objective over Ray: only the block and ids cross, the host computes its own-cache teacher once per
    recurring ids, and loss and block gradient equal the in-process backend's."""
    remote = RayBackend(hosts)
    ids = _ids(4)
    block = local.prefix_block("b", ids.roll(1, dims=0)[:, :6]).map(lambda t: t * 0.9)  # another text's cache
    before = remote.stats()["b"]
    r_loss, r_grad = remote.suffix_kl_and_grad("b", block, ids[:, 6:], ids[:, :6])
    again = remote.suffix_kl_and_grad("b", block, ids[:, 6:], ids[:, :6])
    after = remote.stats()["b"]
    l_loss, l_grad = local.suffix_kl_and_grad("b", block, ids[:, 6:], ids[:, :6])
    assert float(r_loss) > 0 and abs(float(r_loss) - float(l_loss)) < 1e-6 and torch.equal(again[0], r_loss)
    assert (r_grad.keys - l_grad.keys).abs().max() < 1e-8 and (r_grad.values - l_grad.values).abs().max() < 1e-8
    assert after["suffix_kl_and_grad"] - before["suffix_kl_and_grad"] == 2
    assert after["teacher_misses"] - before["teacher_misses"] == 1  # the second call found its teacher
    assert after["teacher_hits"] - before["teacher_hits"] == 1
