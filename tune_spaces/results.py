"""The sweep's results table (CSV and Markdown) and its best config as a run YAML.

One row per trial: its status, its searched values, the sweep metric, and from its
``eval.json`` (:class:`kvlingua.eval_result.EvalResult`) the held-out NLL of every path
under every condition (``nll/<condition>/<src>-><tgt>``: base, control, no-prefix,
identity where layouts match, then each trained space) and the content transferred
(``content/<condition>/<src>-><tgt>``). The Markdown table keeps the main space's
NLL and content per path; the CSV keeps everything.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kvlingua.metric_names import NllKey

STATUSES = ("finished", "stopped", "error", "unfinished")
"""finished: full evaluation done; stopped: ended early by ASHA; error: raised; unfinished: interrupted."""


def eval_columns(eval_dict: Mapping[str, Any]) -> dict[str, float]:
    """``EvalResult.to_dict()`` -> ``{"nll/<cond>/<path>": ..., "content/<cond>/<path>": ...}``."""
    out: dict[str, float] = {}
    for name, row in eval_dict["paths"].items():
        for cond in eval_dict["conditions"]:
            if cond not in row:
                continue
            summary = row[cond]
            out[NllKey.of_path(name, cond).column()] = summary["nll_mean"]
            if cond not in ("base", "control"):
                content = summary["content"]
                out[f"content/{cond}/{name}"] = math.nan if content is None else content
    return out


def column_paths(rows: Sequence[Mapping[str, Any]], condition: str) -> list[str]:
    """The paths ``i->j`` that have an NLL column of ``condition`` (``nll/<condition>/i->j``) in any row, sorted."""
    return sorted({key.path for r in rows for c in r
                   if (key := NllKey.parse(c)) is not None and key.condition == condition and c == key.column()})


def trial_row(trial_id: str, status: str, params: Mapping[str, Any], metric: str, value: float | None,
              trial_dir: Path) -> dict[str, Any]:
    """A table row; the evaluation columns come from ``<trial_dir>/eval.json`` when it exists."""
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, **params,
                           metric: math.nan if value is None else float(value)}
    eval_file = trial_dir / "eval.json"
    if status == "finished" and eval_file.is_file():
        row.update(eval_columns(json.loads(eval_file.read_text())))
    return row


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """All columns of all rows (a missing value is empty)."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Rows of :func:`write_csv`, numbers parsed back (empty cells dropped)."""

    def parse(v: str) -> Any:
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    with Path(path).open() as f:
        return [{k: parse(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def to_markdown(rows: Sequence[Mapping[str, Any]], params: Sequence[str], metric: str, main: str,
                header: str = "") -> str:
    """Per trial: searched values, the metric, then per path the main space's NLL and content transferred."""
    paths = column_paths(rows, main)
    cols = ["trial", "status", *params, metric, *[f"NLL {p}" for p in paths], *[f"content {p}" for p in paths]]
    lines = [header] if header else []
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    ordered = sorted(rows, key=lambda r: (r["status"] != "finished", _sort_key(r.get(metric))))
    for r in ordered:
        cells = [r["trial_id"], r["status"], *[_fmt(r.get(p, "")) for p in params], _fmt(r.get(metric, math.nan))]
        cells += [_fmt(r.get(NllKey.of_path(p, main).column(), math.nan)) for p in paths]
        cells += [_fmt(r.get(f"content/{main}/{p}", math.nan)) for p in paths]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"NLL: held-out suffix NLL per token of the `{main}` space per path (source->target). Content "
                 "transferred = (NLL_control − NLL) / (NLL_control − NLL_base). All conditions are in the CSV.")
    return "\n".join(lines) + "\n"


def _sort_key(v: Any) -> float:
    return math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def best_row(rows: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The finished trial with the lowest metric (None if no trial finished)."""
    done = [r for r in rows if r["status"] == "finished" and math.isfinite(_sort_key(r.get(metric)))]
    return min(done, key=lambda r: _sort_key(r.get(metric))) if done else None


def write_best_config(run_dict: Mapping[str, Any], path: Path) -> Path:
    """The best trial's full run config as YAML (``kvlingua train <path>`` runs it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(run_dict), sort_keys=False))
    return path
