"""Σ training on Ray: hosts + Train workers, placements, faults, resume, tracking, resource checks."""
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.workers.conftest import make_tiny_job
from workers.config import HostOptions, RayConfig
from workers.driver import ClusterResourceError, train_distributed

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


def _kill_host_when_training(ray, storage: Path, done: threading.Event, log: list) -> None:
    """Kill model host ``a`` (Ray restarts it) once the Train workers are up, before the first checkpoint."""
    while not done.is_set():
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-host-a")]
        if names and _alive_pids(ray, "RayTrainWorker") and not list(storage.rglob("train_state.json")):
            time.sleep(1.0)
            ray.kill(ray.get_actor(names[0]["name"], namespace=names[0]["namespace"]), no_restart=False)
            log.append("host")
            return
        time.sleep(0.2)


def _kill_worker_after_checkpoint(ray, storage: Path, done: threading.Event, log: list) -> None:
    """SIGKILL a Train worker once the step-CKPT checkpoint is stored (Ray Train restarts the group)."""
    while not done.is_set():
        if list(storage.rglob(f"translator-{CKPT:07d}")):
            pids = _alive_pids(ray, "RayTrainWorker")
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                log.append("worker")
                return
        time.sleep(0.2)


def _run_with(fault, ray, job, cfg: RayConfig, **kwargs) -> tuple[dict, list]:
    done, log = threading.Event(), []
    t = threading.Thread(target=fault, args=(ray, Path(cfg.storage_path), done, log), daemon=True)
    t.start()
    try:
        return train_distributed(job, cfg, progress=False, **kwargs), log
    finally:
        done.set()
        t.join()


@pytest.fixture(scope="module")
def colocated(ray_local, job_root):
    """The reference: colocated placement, 2 ranks, no faults."""
    return train_distributed(make_tiny_job(job_root, steps=STEPS, name="colocated", checkpoint_every=CKPT),
                             RayConfig(placement="colocated", num_workers=2, worker_num_cpus=0.5,
                                       storage_path=str(job_root / "storage-col")),
                             progress=False)


def _check_same_losses(result: dict, reference: dict) -> list[tuple[int, float]]:
    h, c = _train_losses(result), _train_losses(reference)
    # every step exactly once and in order (a resumed run continues the step count)
    assert [s for s, _ in h] == list(range(1, STEPS + 1)) == [s for s, _ in c]
    for (_, lh), (_, lc) in zip(h, c):
        assert abs(lh - lc) < 1e-4, (h, c)
    return h


def test_hosted_with_host_killed_matches_colocated_and_tracks(ray_local, job_root, colocated):
    from mlflow import MlflowClient

    from kvlingua.tracking import MlflowTracker, NewRun

    uri = f"sqlite:///{job_root / 'mlflow.db'}"
    tracker = MlflowTracker(uri, NewRun("kvlingua-test", name="hosted"))
    tracker.log_params({"placement": "hosted"})
    cfg = RayConfig(num_workers=2, worker_num_cpus=0.5, host=HostOptions(num_cpus=0.25), max_failures=0,
                    storage_path=str(job_root / "storage-hosted"))
    try:
        hosted, log = _run_with(_kill_host_when_training, ray_local,
                                make_tiny_job(job_root, steps=STEPS, name="hosted", checkpoint_every=CKPT), cfg,
                                tracker=tracker)
    finally:
        tracker.close()
    assert log == ["host"]  # the host died mid-run; the run did not fail (max_failures=0)
    h = _check_same_losses(hosted, colocated)  # hosted == colocated, step by step
    assert sum(l for _, l in h[-2:]) < sum(l for _, l in h[:2])  # the loss falls
    for res in (hosted, colocated):
        assert Path(res["files"]["pool_translator"], "pool.json").is_file()
        assert "translator" in res["markdown"] and res["checkpoint"]

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params["placement"] == "hosted"
    assert {"loss", "grad_norm", "lr"} <= set(run.data.metrics)
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "loss")) == list(range(1, STEPS + 1))
    assert {"eval.json", "eval.md", "pool"} <= {a.path for a in client.list_artifacts(tracker.run_id)}


@pytest.mark.slow
def test_worker_failure_resumes_from_checkpoint(ray_local, job_root, colocated):
    cfg = RayConfig(num_workers=2, worker_num_cpus=0.5, host=HostOptions(num_cpus=0.25), max_failures=1,
                    storage_path=str(job_root / "storage-resume"))
    resumed, log = _run_with(_kill_worker_after_checkpoint, ray_local,
                             make_tiny_job(job_root, steps=STEPS, name="resumed", checkpoint_every=CKPT), cfg)
    assert log == ["worker"]
    _check_same_losses(resumed, colocated)  # nothing lost before the failure, same losses after it


def test_a_driver_restarted_after_a_stop_resumes_from_the_last_checkpoint(ray_local, job_root, colocated):
    """A run stopped after its step-CKPT checkpoint (its worker killed, no retries: the driver raises, as a session's
    end or a refused evaluation would stop it) and started again resumes there: the second driver trains (and
    tracks) only steps CKPT+1..STEPS, losses equal to an uninterrupted run's, even with a final table of fewer
    batches (what only the final table reads is not part of the training it resumes). Another training (another
    lr) in the same storage starts from step 0."""
    from dataclasses import replace

    from mlflow import MlflowClient

    from kvlingua.tracking import MlflowTracker, NewRun

    cfg = RayConfig(num_workers=2, worker_num_cpus=0.5, max_failures=0, storage_path=str(job_root / "storage-stop"))
    job = make_tiny_job(job_root, steps=STEPS, name="stopped", checkpoint_every=CKPT)
    with pytest.raises(Exception, match="Training failed"):
        _run_with(_kill_worker_after_checkpoint, ray_local, job, cfg)
    from workers.driver import earlier_checkpoint

    last = earlier_checkpoint(Path(cfg.storage_path), job)
    assert last is not None and last.name != "final"
    done = int(last.name.rsplit("-", 1)[1])  # the step the stopped run last checkpointed
    uri = f"sqlite:///{job_root / 'mlflow-stop.db'}"
    tracker = MlflowTracker(uri, NewRun("kvlingua-test", name="restarted"))
    try:
        again = train_distributed(replace(job, eval=replace(job.eval, batches=job.eval.batches - 1)), cfg,
                                  tracker=tracker, progress=False)
    finally:
        tracker.close()
    _check_same_losses(again, colocated)  # every step once, in order, as the uninterrupted run
    steps = sorted(m.step for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss"))
    assert done >= CKPT and steps == list(range(done + 1, STEPS + 1))
    other = replace(job, train=replace(job.train, lr=job.train.lr / 2))
    assert earlier_checkpoint(Path(cfg.storage_path), other) is None
    assert earlier_checkpoint(Path(cfg.storage_path), job) is not None


def test_missing_resources_fail_fast(ray_local, job_root):
    job = make_tiny_job(job_root, name="too-big")
    t0 = time.monotonic()
    with pytest.raises(ClusterResourceError, match=r"CPU: need 16.5, cluster has 2"):
        train_distributed(job, RayConfig(num_workers=8, worker_num_cpus=2.0, host=HostOptions(num_cpus=0.25)),
                          progress=False)
    with pytest.raises(ClusterResourceError, match=r"GPU: need 2"):
        train_distributed(job, RayConfig(use_gpu=True, num_workers=2, worker_num_cpus=0.5), progress=False)
    assert time.monotonic() - t0 < 10


def test_in_process_equals_ray_train_step_by_step(ray_local, job_root):
    """The same job through ``run_local`` and through Ray Train (colocated, one worker): the same route,
    so the same losses at every step and the same final table."""
    from kvlingua.run import run_local

    local = run_local(make_tiny_job(job_root, steps=STEPS, name="inproc", checkpoint_every=CKPT), progress=False)
    on_ray = train_distributed(make_tiny_job(job_root, steps=STEPS, name="one-rank", checkpoint_every=CKPT),
                               RayConfig(placement="colocated", num_workers=1, worker_num_cpus=1.0,
                                         storage_path=str(job_root / "storage-one")), progress=False)
    a, b = _train_losses(local), _train_losses(on_ray)
    assert [s for s, _ in a] == list(range(1, STEPS + 1)) == [s for s, _ in b]
    assert all(abs(la - lb) < 1e-6 for (_, la), (_, lb) in zip(a, b)), (a, b)
    ea = json.loads(Path(local["files"]["eval_json"]).read_text())["paths"]
    eb = json.loads(Path(on_ray["files"]["eval_json"]).read_text())["paths"]
    assert ea.keys() == eb.keys()
    for path in ea:
        assert ea[path]["translator"]["nll_mean"] == pytest.approx(eb[path]["translator"]["nll_mean"], abs=1e-5)
    # in process, the checkpoints of the job are kept for a rerun to resume from
    assert Path(local["files"]["eval_json"]).with_name("checkpoints").joinpath("translator", "train_state.json").is_file()
