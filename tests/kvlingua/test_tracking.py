"""Tracking: MLflow runs in a SQLite store read back with MlflowClient; the null tracker."""
from __future__ import annotations

import pytest

from kvlingua.tracking import (MlflowTracker, NewRun, NullTracker, PrefixedTracker, attach, default_tracking_uri,
                               flatten_params, metric_key, open_tracker)


def test_flatten_params_nests_with_dots():
    flat = flatten_params({"train": {"lr": 1e-3, "paths": [["a", "b"]]}, "seed": 3})
    assert flat == {"train.lr": "0.001", "train.paths": "[['a', 'b']]", "seed": "3"}


def test_metric_key_is_mlflow_legal():
    assert metric_key("loss/a->b") == "loss/a_to_b"
    assert metric_key("nll/x y:z") == "nll/x y:z"
    assert metric_key("c>d(e)") == "c_d_e_"


def test_open_tracker_writes_into_the_run_dirs_sqlite_store(tmp_path, monkeypatch):
    """The default store is ``<run_dir>/mlflow.db``, whatever the working directory; off gives no run."""
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    t = open_tracker(True, None, "kvl-test", "runs/r1", "r1")
    t.log_metrics({"loss": 1.5}, step=3)
    t.close()
    assert (run_dir / "mlflow.db").is_file()
    run = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}").get_run(t.handle()["run_id"])
    assert run.data.metrics == {"loss": 1.5} and run.info.run_name == "r1"
    off = open_tracker(False, None, "kvl-test", tmp_path / "other", "r2")
    off.log_metrics({"loss": 1.0}, step=0)
    assert off.handle() is None and not (tmp_path / "other").exists()


def test_attached_tracker_writes_into_the_owners_run_and_leaves_it_open(tmp_path):
    """What a Ray Train rank does with the driver's handle: same run, prefix kept, never closes it."""
    from mlflow import MlflowClient

    uri = default_tracking_uri(tmp_path)
    owner = MlflowTracker(uri, NewRun("kvl-test", name="driver"))
    rank0 = attach(PrefixedTracker(owner, "linear").handle())
    rank0.log_metrics({"loss/a->b": 2.0}, step=4)
    rank0.close("FAILED")
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(owner.run_id)
    assert run.info.status == "RUNNING"
    assert run.data.metrics == {"linear/loss/a_to_b": 2.0}
    owner.close()
    assert client.get_run(owner.run_id).info.status == "FINISHED"
    assert isinstance(attach(NullTracker().handle()), NullTracker)
    with pytest.raises(Exception):
        attach({"uri": uri, "run_id": "0" * 32, "prefix": ""})  # no such run


def test_mlflow_tracker_writes_params_metrics_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here
    from mlflow import MlflowClient

    uri = default_tracking_uri(tmp_path / "run")
    (tmp_path / "run").mkdir()
    parent = MlflowTracker(uri, NewRun("kvl-test", name="sweep"))
    t = MlflowTracker(uri, NewRun("kvl-test", name="trial-0", parent_run_id=parent.run_id, tags={"kind": "trial"}))
    t.log_params({"train": {"lr": 0.001, "steps": 5}, "pool": "tiny"})
    t.log_metrics({"loss": 2.5, "loss/a->b": 3.0}, step=1)
    t.log_metrics({"loss": 2.0, "loss/a->b": 2.75}, step=2)
    report = tmp_path / "report.md"
    report.write_text("# hello\n")
    t.log_artifact(report)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        t.log_artifact(tmp_path / "missing.png")
    t.close()
    t.close()
    parent.close()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(t.run_id)
    assert run.data.params == {"train.lr": "0.001", "train.steps": "5", "pool": "tiny"}
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["kind"] == "trial"
    assert run.info.run_name == "trial-0"
    assert run.info.status == "FINISHED"
    hist = client.get_metric_history(t.run_id, "loss/a_to_b")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(1, 3.0), (2, 2.75)]
    assert run.data.metrics["loss"] == 2.0
    assert [a.path for a in client.list_artifacts(t.run_id)] == ["report.md"]
    local = client.download_artifacts(t.run_id, "report.md", str(tmp_path / "dl"))
    assert open(local).read() == "# hello\n"
    # artifacts live beside the database, not in the working directory
    assert (tmp_path / "run" / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    # a second tracker on the same experiment reuses it
    again = MlflowTracker(uri, NewRun("kvl-test"))
    assert client.get_run(again.run_id).info.experiment_id == run.info.experiment_id
    assert len(client.search_experiments()) == 2  # "Default" and kvl-test
    again.close()


def test_mlflow_tracker_rejects_empty_experiment(tmp_path):
    with pytest.raises(ValueError, match="experiment"):
        MlflowTracker(default_tracking_uri(tmp_path), NewRun(""))


class _Closes:
    """A tracker that remembers how it was closed."""

    def __init__(self):
        self.closed = []

    def close(self, status: str = "FINISHED") -> None:
        self.closed.append(status)


def test_tracked_closes_finished_or_failed_once():
    from kvlingua.tracking import tracked

    ok, bad, interrupted = _Closes(), _Closes(), _Closes()
    with tracked(ok) as t:
        assert t is ok and ok.closed == []
    with pytest.raises(ValueError):
        with tracked(bad):
            raise ValueError("boom")
    with pytest.raises(KeyboardInterrupt):
        with tracked(interrupted):
            raise KeyboardInterrupt
    assert (ok.closed, bad.closed, interrupted.closed) == (["FINISHED"], ["FAILED"], ["FAILED"])
