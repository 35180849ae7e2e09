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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

_BAD_CHARS = re.compile(r"[^/\w.\- :]")
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


TrackerHandle = dict
"""What another process needs to write into the same run (picklable): ``{"uri", "run_id", "prefix"}``."""


class Tracker(Protocol):
    """Where a run's config, metrics and files go."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the run's configuration (nested mappings are flattened to ``a.b`` keys)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at training step ``step``."""

    def log_artifact(self, path: str | Path) -> None:
        """Attach a file (a report, a plot) to the run."""

    def handle(self) -> TrackerHandle | None:
        """How another process (a Ray Train rank) writes into this run (:func:`attach`); None: it can't."""

    def close(self, status: str = "FINISHED") -> None:
        """Finish the run (``FINISHED``, ``FAILED`` or ``KILLED``) if this tracker owns it."""


class NullTracker:
    """A tracker that records nothing."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path) -> None:
        pass

    def handle(self) -> TrackerHandle | None:
        return None

    def close(self, status: str = "FINISHED") -> None:
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

    def handle(self) -> TrackerHandle | None:
        inner = self.inner.handle()
        return None if inner is None else {**inner, "prefix": "/".join(filter(None, [inner.get("prefix"), self.prefix]))}

    def close(self, status: str = "FINISHED") -> None:
        self.inner.close(status)


@contextmanager
def tracked(tracker: Tracker) -> Iterator[Tracker]:
    """The one lifecycle of a tracked run: yields ``tracker`` and closes it when the block ends, ``FINISHED`` when
    the block ran through and ``FAILED`` when it raised (an interrupt included)."""
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.close(status)


def space_tracker(tracker: Tracker, space: str, main: str) -> Tracker:
    """The tracker a space's training logs to: the run's own for the main space, prefixed for the others."""
    return tracker if space == main else PrefixedTracker(tracker, space)


def attach(handle: TrackerHandle | None) -> Tracker:
    """A tracker writing into the run ``handle`` names (from :meth:`Tracker.handle`), without owning it:
    ``close`` leaves the run open for its owner. ``None``: a :class:`NullTracker`."""
    if handle is None:
        return NullTracker()
    tracker = MlflowTracker(handle["uri"], ExistingRun(handle["run_id"]))
    return PrefixedTracker(tracker, handle["prefix"]) if handle.get("prefix") else tracker


def open_tracker(enabled: bool, uri: str | None, experiment: str, run_dir: str | Path, run_name: str,
                 parent: TrackerHandle | None = None, tags: Mapping[str, str] | None = None) -> Tracker:
    """The tracker of a new run: an MLflow run (``uri``, default :func:`default_tracking_uri` of ``run_dir``),
    nested under ``parent`` if given, or a :class:`NullTracker` when tracking is off."""
    if not enabled:
        return NullTracker()
    run = NewRun(experiment, name=run_name, parent_run_id=parent["run_id"] if parent else None, tags=tags)
    return MlflowTracker(uri or default_tracking_uri(run_dir), run)


def reopen_tracker(handle: TrackerHandle) -> Tracker | None:
    """The tracker of the existing run ``handle`` names, marked running again and ended by its ``close``.

    A resumed suite (``kvlingua paper`` after an interruption, or ``--only`` later) keeps one
    parent run this way. None when the store no longer has that run (a new one is opened then).
    """
    from mlflow.exceptions import MlflowException

    try:
        return MlflowTracker(handle["uri"], ExistingRun(handle["run_id"], reopen=True))
    except MlflowException:
        return None


def end_if_running(handle: TrackerHandle, status: str = "KILLED") -> None:
    """End the run ``handle`` names if it is still running (a Tune trial that ASHA cut off)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=handle["uri"])
    if client.get_run(handle["run_id"]).info.status == "RUNNING":
        client.set_terminated(handle["run_id"], status=status)


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


@dataclass(frozen=True)
class NewRun:
    """An MLflow run to create."""

    experiment: str
    """Experiment name; created if missing."""
    name: str | None = None
    """Display name of the run."""
    parent_run_id: str | None = None
    """Make this a nested run under that run (Tune trials under a sweep)."""
    tags: Mapping[str, str] | None = None
    """Extra run tags."""
    artifact_location: str | None = None
    """Where a newly created experiment stores artifacts; default ``<db dir>/mlartifacts`` for a SQLite
    store, else the server's default."""

    def __post_init__(self):
        if not self.experiment:
            raise ValueError("MlflowTracker needs a non-empty experiment name")


@dataclass(frozen=True)
class ExistingRun:
    """An MLflow run that exists already."""

    run_id: str
    """Write into this run instead of creating one (a Ray Train rank writing into the driver's run);
    ``close`` then leaves the run open for its owner."""
    reopen: bool = False
    """Take the run over instead: mark it running again and end it on ``close`` (a resumed suite's
    parent run)."""


class MlflowTracker:
    """Track one MLflow run through ``mlflow.MlflowClient`` (no global fluent state).

    Args:
        tracking_uri: MLflow store, e.g. ``default_tracking_uri(run_dir)`` or ``http://127.0.0.1:5000``.
        run: a run to create (:class:`NewRun`) or one that exists (:class:`ExistingRun`).
    """

    def __init__(self, tracking_uri: str, run: NewRun | ExistingRun):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._owner = isinstance(run, NewRun) or run.reopen
        if isinstance(run, ExistingRun):
            self.run_id: str = self.client.get_run(run.run_id).info.run_id  # raises if the run does not exist
            if run.reopen:
                self.client.update_run(self.run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(run.experiment)
        if exp is None:
            location = run.artifact_location or _default_artifact_location(tracking_uri)
            experiment_id = self.client.create_experiment(run.experiment, artifact_location=location)
        else:
            experiment_id = exp.experiment_id
        run_tags = {str(k): str(v) for k, v in (run.tags or {}).items()}
        if run.parent_run_id is not None:
            run_tags["mlflow.parentRunId"] = run.parent_run_id
        self.run_id = self.client.create_run(experiment_id, tags=run_tags, run_name=run.name).info.run_id

    def handle(self) -> TrackerHandle:
        return {"uri": self.tracking_uri, "run_id": self.run_id, "prefix": ""}

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
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) if this tracker created it; twice is harmless."""
        if self._owner:
            self.client.set_terminated(self.run_id, status=status)
            self._owner = False
