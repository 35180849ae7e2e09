"""One tracking interface for every run: MLflow or nothing.

The training loop calls a :class:`Tracker` unconditionally (``log_params`` once with
the full config, ``log_metrics`` every ``log_every`` steps, ``log_artifact`` for
reports); it never asks whether tracking is on. :class:`NullTracker` does nothing;
:class:`MlflowTracker` writes to an MLflow store (a SQLite file per run directory by
default: MLflow 3.17 refuses a plain ``file:`` store). ``mlflow`` is imported only
when an :class:`MlflowTracker` is built. Nested runs (``parent_run_id``) group the
trials of a Tune sweep under one parent run.
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

_BAD_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


class Tracker(Protocol):
    """Where a run's config, metrics and files go."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's configuration (nested mappings are flattened to ``a.b`` keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at training step ``step``."""

    def log_artifact(self, path: str | Path) -> None:
        """Attach a file (a report, a plot) to the run."""

    def close(self) -> None:
        """Finish the run."""


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def close(self) -> None:
        pass


class PrefixedTracker:
    """Prefixes metric names (``linear/loss``) so several shared spaces can log into one run."""

    def __init__(self, inner: Tracker, prefix: str):
        self.inner, self.prefix = inner, prefix

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics({f"{self.prefix}/{k}": v for k, v in metrics.items()}, step)

    def log_artifact(self, path: str | Path) -> None:
        self.inner.log_artifact(path)

    def close(self) -> None:
        self.inner.close()


def space_tracker(tracker: Tracker, space: str, main: str) -> Tracker:
    """The tracker a space's training logs to: the run's own for the main space, prefixed for the others."""
    return tracker if space == main else PrefixedTracker(tracker, space)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-3}} -> {"train.lr": "0.001"}``; lists and tuples become their ``str``."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)[:_MAX_PARAM_CHARS]
    return flat


def metric_key(name: str) -> str:
    """An MLflow-legal metric or param name: ``loss/a->b`` becomes ``loss/a_to_b``."""
    return _BAD_CHARS.sub("_", name.replace("->", "_to_"))


def default_tracking_uri(run_dir: str | Path) -> str:
    """``sqlite:///<abs run_dir>/mlflow.db``: the MLflow store of one run directory."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store go next to the database, not into the working directory."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


class MlflowTracker:
    """Track one MLflow run through ``mlflow.MlflowClient`` (no global fluent state).

    Args:
        tracking_uri: MLflow store, e.g. ``default_tracking_uri(run_dir)`` or ``http://127.0.0.1:5000``.
        experiment: experiment name; created if missing.
        run_name: display name of the run.
        parent_run_id: make this a nested run under that run (Tune trials under a sweep).
        tags: extra run tags.
        artifact_location: where a newly created experiment stores artifacts; default
            ``<db dir>/mlartifacts`` for a SQLite store, else the server's default.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
    ):
        if not experiment:
            raise ValueError("MlflowTracker needs a non-empty experiment name")
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_location or _default_artifact_location(tracking_uri)
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if parent_run_id is not None:
            run_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, tags=run_tags, run_name=run_name)
        self.run_id: str = run.info.run_id
        self._closed = False

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> "MlflowTracker":
        """Write into an existing run that someone else owns (e.g. the driver's run, from a Ray Train rank).

        ``close`` on the returned tracker leaves the run open: its owner ends it.
        """
        from mlflow import MlflowClient

        self = cls.__new__(cls)
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        run = self.client.get_run(run_id)  # raises if the run does not exist
        self.experiment_id = run.info.experiment_id
        self.run_id = run_id
        self._closed = True
        return self

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(metric_key(k), v) for k, v in flatten_params(params).items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), now, int(step)) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: str | Path) -> None:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {p}")
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
        else:
            self.client.log_artifact(self.run_id, str(p))

    def close(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``); closing twice is harmless."""
        if not self._closed:
            self.client.set_terminated(self.run_id, status=status)
            self._closed = True
