"""End to end: ``ray job submit --working-dir . -- kvlingua train CONFIG`` on a cluster this test starts.

The head node runs on non-default ports with its own temp dir and authentication off
(``RAY_AUTH_MODE=disabled``). ``ray stop`` would stop every Ray on the machine, so
the test stops only its own cluster: ``ray start --block`` runs in a new process
group that the test terminates, and any process whose command line names the
cluster's temp dir is ended by pid.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.workers.conftest import make_tiny_job

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_naming(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def head_cluster():
    temp = tempfile.mkdtemp(prefix="/tmp/kvr-")  # short: Ray's socket paths must stay under ~107 chars
    gcs, dash, client, nm, om, agent, grpc, metrics, renv = _free_ports(9)
    wmin = 20000 + (os.getpid() % 200) * 100
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.2", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
         f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--ray-client-server-port={client}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
         f"--min-worker-port={wmin}", f"--max-worker-port={wmin + 99}", f"--temp-dir={temp}",
         "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                                   env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"test Ray head did not come up: {head.stdout.read().decode()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        time.sleep(2)
        for pid in _pids_naming(temp):  # anything of this cluster that left the process group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_kvlingua_train(head_cluster, tmp_path):
    address, env = head_cluster
    job = make_tiny_job(tmp_path, steps=4)
    run_dir = tmp_path / "run"
    config = {
        "name": "e2e", "models": job.models, "tokenizer": job.tokenizer, "run_dir": str(run_dir),
        "data": {"source": job.data.source, "view": "text"}, "prefix_len": 8, "suffix_len": 8, "batch_size": 4,
        "spaces": {"translator": {"q_dim": 24, "n_heads": 2, "embed_dim_factor": 1.0}},
        "train": {"steps": 4, "lr": 3e-3, "warmup_frac": 0.0, "log_every": 1, "eval_every": 4, "checkpoint_every": 2},
        "eval": {"batches": 2, "first_tokens": 4},
        "ray": {"num_workers": 1, "worker_num_cpus": 0.5, "host": {"num_cpus": 0.25}},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "e2e"},
    }
    cfg_file = tmp_path / "e2e.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = dict(env, KVLINGUA_HOME=str(tmp_path / "home"))
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", f'{{"env_vars": {{"KVLINGUA_HOME": "{tmp_path / "home"}"}}}}',
         "--", "kvlingua", "train", str(cfg_file), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "succeeded" in out.stdout
    assert (run_dir / "pool" / "pool.json").is_file() and (run_dir / "eval.md").is_file()
    assert "translator" in (run_dir / "eval.md").read_text()
