"""ModelHost actors and RayBackend against the in-process LocalBackend."""
import pytest
import torch

from kvlingua.backend import LocalBackend
from kvlingua.cache import KVBlock, extract_prefix
from kvlingua.models import load_frozen
from tests.helpers import VOCAB
from workers.backend import RayBackend
from workers.host import HostOptions, spawn_hosts
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
    blocks = ray.get(refs)
    model = load_frozen(pool_dirs["a"])
    for i, (k, v, h) in enumerate(blocks):
        torch.testing.assert_close(k, extract_prefix(model, _ids(200 + i)[:, :6]).keys)
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
