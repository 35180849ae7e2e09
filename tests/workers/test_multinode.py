"""Across nodes: a two-node Ray cluster on this machine, a model host pinned to the second node.

Every other distributed test runs on one Ray node, so KV blocks never leave one object
store. Here ``ray start --head`` and a second ``ray start --address`` each run their own
raylet and object store; host ``a`` is pinned to the head and host ``b`` to the second
node by custom resources (``HostOptions.resources``), so source blocks, translated blocks
and gradients cross between the two stores. Σ training through them must give the
losses of the in-process loop.

The cluster is this module's own (a free port, a temp dir of its own, no auth) and is
stopped by killing exactly the processes it started: those whose command line names its
temp dir, and their children. ``ray stop`` would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import workers  # noqa: F401  (Ray environment before ``import ray``)
from tests.helpers import VOCAB
from tests.workers.conftest import save_tiny_pool

pytestmark = [pytest.mark.slow, pytest.mark.ray]

START_TIMEOUT_S = 180
"""Most seconds one ``ray start`` may take on a loaded 2-core machine."""
CLUSTER_DEADLINE_S = 900
"""The cluster is killed after this long even if the test hangs (a ``ray.get`` then fails)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> set[int]:
    """Processes whose command line names ``temp_dir`` (gcs, raylets, monitors) and all their children."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (ppid, cmd)
    ours = {pid for pid, (_, cmd) in table.items() if temp_dir in cmd} - {os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in table.items() if ppid in ours} - ours - {os.getpid()}
        ours |= children
        grew = bool(children)
    return ours


def _kill_cluster(temp_dir: str, grace_s: float = 10.0) -> None:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s``."""
    pids = _cluster_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids | _cluster_pids(temp_dir) if Path(f"/proc/{p}").exists()}


@pytest.fixture(scope="module")
def two_nodes():
    """``(address, temp_dir)`` of a running two-node cluster; the head has ``{"head": 1}``, node 2 ``{"node2": 1}``."""
    temp_dir = tempfile.mkdtemp(prefix="kvr2n", dir="/tmp")  # short: Ray's socket paths live under it
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--temp-dir", temp_dir,
              "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"]
    watchdog = threading.Timer(CLUSTER_DEADLINE_S, _kill_cluster, args=(temp_dir,))
    watchdog.daemon = True
    watchdog.start()
    try:
        subprocess.run([ray_cli, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--resources", json.dumps({"head": 1}), *common],
                       env=env, check=True, capture_output=True, timeout=START_TIMEOUT_S)
        subprocess.run([ray_cli, "start", "--address", f"127.0.0.1:{port}", "--resources", json.dumps({"node2": 1}),
                        *common], env=env, check=True, capture_output=True, timeout=START_TIMEOUT_S)
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        watchdog.cancel()
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_two_nodes(two_nodes, tmp_path_factory):
    """This process connected to the two-node cluster (auth disabled for the connection only)."""
    import ray

    address, _ = two_nodes
    if ray.is_initialized():
        pytest.fail("Ray is already initialised in this process; the two-node test needs its own connection")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 60
        while ray.cluster_resources().get("node2", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ray.cluster_resources().get("node2", 0) == 1 and len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def test_sigma_training_through_a_host_on_another_node_matches_in_process(ray_two_nodes, tmp_path_factory):
    from kvlingua.backend import LocalBackend
    from kvlingua.models import load_frozen
    from kvlingua.space import SharedSpace
    from kvlingua.batch import Batch
    from kvlingua.train import fit
    from kvlingua.train_config import TrainConfig
    from kvlingua.space_config import SpaceConfig
    from workers.backend import RayBackend
    from workers.config import HostOptions
    from workers.host import spawn_hosts

    ray = ray_two_nodes
    pool = save_tiny_pool(tmp_path_factory.mktemp("pool2n"))  # a: Gemma-2 (2 layers), b: Llama (3 layers)
    hosts = {**spawn_hosts({"a": pool["a"]}, HostOptions(num_cpus=0.25, resources={"head": 1})),
             **spawn_hosts({"b": pool["b"]}, HostOptions(num_cpus=0.25, resources={"node2": 1}))}
    node2 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("node2"))
    where = {m: ray.get(h.info.remote())["node_id"] for m, h in hosts.items()}
    assert where["b"] == node2 and where["a"] != node2  # two hosts, two object stores

    local = LocalBackend({m: load_frozen(p) for m, p in pool.items()})
    remote = RayBackend(hosts)
    cfg = TrainConfig(steps=4, lr=1e-2, warmup_frac=0.0, log_every=1, seed=0)

    def run(backend):
        torch.manual_seed(0)
        space = SharedSpace({n: backend.summary(n) for n in backend.names()}, SpaceConfig(q_dim=12, n_heads=2))
        ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))  # [B, P+S]
        batches = (Batch.same_text(ids, backend.names(), 6, key=f"b{i}") for i in range(cfg.steps))  # one text
        state = fit(space, backend, batches, cfg)
        return [h for h in state.history if h["kind"] == "train"]

    before = remote.stats()
    ray_hist, local_hist = run(remote), run(local)
    after = remote.stats()
    assert [h["step"] for h in ray_hist] == [h["step"] for h in local_hist] and len(ray_hist) == cfg.steps
    for r, l in zip(ray_hist, local_hist):
        assert r.keys() == l.keys()
        for k in r:
            if k.startswith(("loss", "suffix/")):
                assert r[k] == pytest.approx(l[k], rel=1e-5, abs=1e-6), (r["step"], k)
    assert local_hist[-1]["loss"] < local_hist[0]["loss"]  # the steps trained (on one repeated batch)
    for m in hosts:  # and went through both hosts, across the two stores
        assert after[m]["suffix_loss_and_grad"] > before[m]["suffix_loss_and_grad"]
        assert after[m]["prefix_block"] > before[m]["prefix_block"]
