"""Σ training on Ray: hosts + Train workers, placements, faults, resume, tracking, resource checks."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.workers.conftest import make_tiny_job
from workers.driver import ClusterResourceError, RayConfig, train_distributed

pytestmark = pytest.mark.ray

STEPS = 6
CKPT = 3


@pytest.fixture(scope="module")
def job_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    make_tiny_job(root)  # corpus, tokenizer, models once
    return root


def _train_losses(result: dict) -> list[tuple[int, float]]:
    hist = json.loads(Path(result["files"]["eval_json"]).with_name("histories.json").read_text())
    return [(r["step"], r["loss"]) for r in hist["translator"] if r["kind"] == "train"]


def _alive_pids(ray, class_name: str) -> list[int]:
    from ray._private import state

    return [a["Pid"] for a in state.actors().values() if a["ActorClassName"].endswith(class_name)
            and a["State"] == "ALIVE" and a["Pid"]]


def _inject_faults(ray, storage: Path, done: threading.Event, log: list) -> None:
    """Kill a model host once training runs, then a Train worker after the first checkpoint."""
    host_killed = False
    while not done.is_set():
        if not host_killed:
            names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "-host-a" in a["name"]]
            if names and list(storage.rglob("train_state.json")) == [] and _alive_pids(ray, "RayTrainWorker"):
                handle = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
                time.sleep(1.0)
                ray.kill(handle, no_restart=False)
                log.append("host")
                host_killed = True
        elif list(storage.rglob(f"translator-{CKPT:07d}")):
            pids = _alive_pids(ray, "RayTrainWorker")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                log.append("worker")
                return
        time.sleep(0.2)


def test_hosted_with_faults_matches_colocated_and_tracks(ray_local, job_root):
    from mlflow import MlflowClient

    from kvlingua.tracking import MlflowTracker

    uri = f"sqlite:///{job_root / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "kvlingua-test", run_name="hosted")
    tracker.log_params({"placement": "hosted"})
    job = make_tiny_job(job_root, steps=STEPS, name="hosted")
    storage = job_root / "storage-hosted"
    done, log = threading.Event(), []
    injector = threading.Thread(target=_inject_faults, args=(ray_local, storage, done, log), daemon=True)
    injector.start()
    cfg = RayConfig(num_workers=2, worker_num_cpus=0.5, host_num_cpus=0.25, checkpoint_every=CKPT,
                    max_failures=2, storage_path=str(storage))
    try:
        hosted = train_distributed(job, cfg, tracker=tracker, progress=False)
    finally:
        done.set()
        tracker.close()
    assert log == ["host", "worker"], f"faults injected: {log}"

    colocated = train_distributed(make_tiny_job(job_root, steps=STEPS, name="colocated"),
                                  RayConfig(placement="colocated", num_workers=2, worker_num_cpus=0.5,
                                            checkpoint_every=CKPT, storage_path=str(job_root / "storage-col")),
                                  progress=False)

    # resume continued the step count: every step once, in order, none lost before the failure
    h, c = _train_losses(hosted), _train_losses(colocated)
    assert [s for s, _ in h] == list(range(1, STEPS + 1)) == [s for s, _ in c]
    # hosted (with a host killed and a worker restarted from step 3) == colocated, step by step
    for (_, lh), (_, lc) in zip(h, c):
        assert abs(lh - lc) < 1e-4, (h, c)
    # the loss falls
    assert sum(l for _, l in h[-2:]) < sum(l for _, l in h[:2])
    for res in (hosted, colocated):
        assert Path(res["files"]["pool_translator"], "pool.json").is_file()
        assert "translator" in res["markdown"] and res["checkpoint"]

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.params["placement"] == "hosted"
    assert {"loss", "grad_norm", "lr"} <= set(run.data.metrics)
    steps = [m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss")]
    assert set(steps) == set(range(1, STEPS + 1))
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(tracker.run_id)}
    assert {"eval.json", "eval.md", "pool"} <= artifacts


def test_missing_resources_fail_fast(ray_local, job_root):
    job = make_tiny_job(job_root, name="too-big")
    t0 = time.monotonic()
    with pytest.raises(ClusterResourceError, match=r"CPU: need 16.5, cluster has 2"):
        train_distributed(job, RayConfig(num_workers=8, worker_num_cpus=2.0, host_num_cpus=0.25), progress=False)
    with pytest.raises(ClusterResourceError, match=r"GPU: need 2"):
        train_distributed(job, RayConfig(use_gpu=True, num_workers=2, worker_num_cpus=0.5), progress=False)
    assert time.monotonic() - t0 < 10
