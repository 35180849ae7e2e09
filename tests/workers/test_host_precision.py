"""``ray.host.precision``: a ModelHost runs its frozen model as ``LocalBackend(precision=...)`` does, and a
bf16 host keeps its blocks apart from fp32 ones in a shared block store."""
import pytest
import torch

from kvlingua.backend import LocalBackend
from kvlingua.config import ConfigError, from_dict
from kvlingua.models import load_frozen
from tests.helpers import VOCAB
from workers.config import HostOptions, RayConfig
from workers.host import ModelHost, spawn_hosts
from workers.wire import block_from_wire, tensor_from_wire, tensor_to_wire


def _ids(seed, b=2, n=8):
    return torch.randint(0, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def test_host_precision_is_a_checked_config_field():
    assert HostOptions().precision == "fp32"
    assert from_dict(RayConfig, {"host": {"precision": "bf16"}}).host.precision == "bf16"
    with pytest.raises((ValueError, ConfigError), match=r"precision must be one of \['fp32', 'bf16'\], got 'fp16'"):
        from_dict(RayConfig, {"host": {"precision": "fp16"}}, where="ray")


def test_host_matches_local_backend_and_keys_its_store_by_precision(pool_dirs, tmp_path):
    """No Ray needed: the actor class is a plain class until ``ray.remote`` wraps it."""
    path = pool_dirs["b"]
    model = load_frozen(path)
    prefix, suffix = _ids(0), _ids(1, n=5)
    hosts = {p: ModelHost("b", path, "cpu", str(tmp_path), precision=p) for p in ("fp32", "bf16")}
    blocks = {p: block_from_wire(h.prefix_block(prefix)) for p, h in hosts.items()}
    for p, block in blocks.items():
        want = LocalBackend({"b": model}, precision=p).prefix_block("b", prefix)
        torch.testing.assert_close(block.keys, want.keys, rtol=0, atol=0)
        nll = tensor_from_wire(hosts[p].suffix_nll(None, suffix), copy=True)
        torch.testing.assert_close(nll, LocalBackend({"b": model}, precision=p).suffix_nll("b", None, suffix),
                                   rtol=0, atol=0)
    assert not torch.equal(blocks["fp32"].keys, blocks["bf16"].keys)
    # one store, two entries: neither host was served the other's block
    assert [h.stats()["extractions"] for h in hosts.values()] == [1, 1]
    again = ModelHost("b", path, "cpu", str(tmp_path), precision="bf16")
    torch.testing.assert_close(block_from_wire(again.prefix_block(prefix)).keys, blocks["bf16"].keys, rtol=0, atol=0)
    assert again.stats()["hits"] == 1


@pytest.mark.ray
def test_spawned_bf16_hosts_serve_bf16_blocks(ray_local, pool_dirs):
    import ray

    hosts = spawn_hosts(pool_dirs, HostOptions(num_cpus=0.25, precision="bf16"))
    try:
        ids = _ids(2)
        for name, h in hosts.items():
            got = block_from_wire(ray.get(h.prefix_block.remote(tensor_to_wire(ids))), copy=True)
            model = load_frozen(pool_dirs[name])
            want = LocalBackend({name: model}, precision="bf16").prefix_block(name, ids)
            torch.testing.assert_close(got.values, want.values, rtol=0, atol=0)
            assert not torch.equal(got.values, LocalBackend({name: model}).prefix_block(name, ids).values)
    finally:
        for h in hosts.values():
            ray.kill(h, no_restart=True)
