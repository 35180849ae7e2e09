"""The one run function of every experiment that trains a run config: resolve, track, train, finish.

:func:`train_run` is what ``kvlingua train`` does and what the quickstart, the paper's train experiments and
the real-model run call: the run's models are fetched or pre-trained, its MLflow run is opened (nested under
``parent`` when given) and closed by :func:`kvlingua.tracking.tracked`, the full config is logged once, and
the job trains on Ray Train (``workers.driver``) or in this process (``kvlingua.run.run_local``).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from kvlingua.config import to_dict
from kvlingua.tracking import TrackerHandle, tracked


@dataclass(frozen=True)
class Placement:
    """Where a run trains."""

    address: str | None = None
    """Ray cluster address (None: the run config's, else an embedded local Ray)."""
    in_process: bool = False
    """Train in this process, without Ray (the reference loop)."""
    progress: bool = True
    """Show progress bars."""


def train_run(cfg, placement: Placement = Placement(), *, run_dir: Path | None = None,
              parent: TrackerHandle | None = None, tags: Mapping[str, str] | None = None) -> dict:
    """Train a validated :class:`~workers.run_config.RunConfig` end to end.

    Args:
        cfg: the run config.
        placement: Ray (at ``address``) or in process, and progress bars.
        run_dir: where the MLflow store goes (default the run's own directory).
        parent: an MLflow run to nest this run under (a suite's parent run).
        tags: extra MLflow run tags.

    Returns:
        :func:`kvlingua.run.finish`'s dict (``markdown``, ``timing``, ``eval``, ``files``) and ``tracking_uri``.
    """
    from kvlingua.job import check_held_out
    from workers.run_config import resolve_models, run_dir_of, to_job

    run_dir = run_dir or run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = to_job(cfg, resolve_models(cfg, progress=placement.progress))
    check_held_out(job)  # before any compute: a final evaluation that cannot fit would fail after training
    with tracked(cfg.tracking.open(run_dir, cfg.name, parent=parent, tags=tags)) as tracker:
        tracker.log_params(to_dict(cfg))
        if placement.in_process:
            from kvlingua.run import run_local

            result = run_local(job, tracker=tracker, progress=placement.progress)
        else:
            from workers.driver import train_distributed

            ray_cfg = cfg.ray if placement.address is None else replace(cfg.ray, address=placement.address)
            result = train_distributed(job, ray_cfg, tracker=tracker, progress=placement.progress)
    result["tracking_uri"] = (tracker.handle() or {}).get("uri")
    result["main_space"] = job.main_space
    result["models"] = dict(job.models)
    result["prefix_len"], result["suffix_len"] = job.prefix_len, job.suffix_len
    return result


def result_lines(result: dict) -> list[str]:
    """What a finished run prints: the table, each space's steps and time, the files, the MLflow command."""
    lines = [result["markdown"], ""]
    lines += [f"{name:>16}: {t['steps']} steps in {t['train_wall_s']:.0f} s" for name, t in result["timing"].items()]
    lines += [f"{name:>16}: {path}" for name, path in result["files"].items()]
    if result.get("tracking_uri"):
        lines.append(f"\nMLflow: mlflow ui --backend-store-uri {result['tracking_uri']}")
    return lines
