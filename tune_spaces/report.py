"""Ablation reports like the paper's, from a finished sweep's ``results.csv``.

For every searched key with more than one value (paths per step, reconstruction
weight, adapter size factors, lr, batch size) one plot and one table: held-out NLL
per translation direction (path source->target) of the main space against the key's
value. As in the paper's Fig. 6, each point is the best (lowest) NLL over the other
searched keys. Reference NLLs per path that do not depend on the key are drawn as
dashed lines and listed in the table: the target's own cache (``base``), the content
control, the ``identity`` map (where layouts match) and the ``linear`` space.

Output: ``ablation_<key>.png`` (:func:`kvlingua.report.agg_figure`: no pyplot) and ``ablations.md`` in the sweep
directory (or ``out_dir``).
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvlingua.metric_names import NllKey
from kvlingua.report import agg_figure
from tune_spaces.results import column_paths, read_csv

DASHED = ("base", "control", "identity", "linear")
"""Conditions drawn as dashed lines beside the main space's curve when present in the table."""
LOG_KEYS = ("train.lr",)


def _mean(values: list[float]) -> float:
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def ablation_table(rows: Sequence[Mapping[str, Any]], key: str, main: str) -> dict[str, Any]:
    """``{"x": values, "paths": {path: [best NLL at each x]}, "refs": {cond: {path: mean NLL}}}``."""
    done = [r for r in rows if r.get("status") == "finished"]
    xs = sorted({r[key] for r in done if key in r})
    paths = column_paths(done, main)
    curves = {}
    for p in paths:
        col = NllKey.of_path(p, main).column()
        curves[p] = [min((r[col] for r in done if r.get(key) == x and col in r), default=math.nan) for x in xs]
    refs = {}
    for cond in DASHED:
        if cond == main:
            continue
        per_path = {p: _mean([r.get(NllKey.of_path(p, cond).column(), math.nan) for r in done]) for p in paths}
        if any(not math.isnan(v) for v in per_path.values()):
            refs[cond] = per_path
    return {"x": xs, "paths": curves, "refs": refs}


def plot_ablation(table: Mapping[str, Any], key: str, main: str, out: Path) -> Path:
    """NLL per path against ``key`` (one colour per path), dashed reference lines in the same colour."""
    fig = agg_figure(figsize=(6.4, 4.2), constrained_layout=True)
    ax = fig.add_subplot()
    styles = {"base": ":", "control": "--", "identity": "-.", "linear": (0, (5, 1))}
    for i, (path, ys) in enumerate(table["paths"].items()):
        color = f"C{i % 10}"
        ax.plot(table["x"], ys, marker="o", color=color, label=f"{main} {path}")
        for cond, per_path in table["refs"].items():
            value = per_path.get(path, math.nan)
            if not math.isnan(value):
                ax.axhline(value, color=color, linestyle=styles[cond], linewidth=0.9, alpha=0.7,
                           label=f"{cond} {path}")
    if key in LOG_KEYS:
        ax.set_xscale("log")
    ax.set_xticks(table["x"])
    ax.set_xticklabels([f"{x:g}" if isinstance(x, float) else str(x) for x in table["x"]])
    ax.set_xlabel(key)
    ax.set_ylabel("held-out suffix NLL per token")
    ax.set_title(f"NLL per translation direction vs {key}")
    ax.legend(fontsize=7, ncol=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def table_markdown(table: Mapping[str, Any], key: str, main: str, plot_name: str) -> str:
    """Rows: each value of ``key`` then each reference; columns: paths."""
    paths = list(table["paths"])
    lines = [f"### NLL per translation direction vs `{key}` ({main}; best over the other searched keys)\n",
             f"![{key}]({plot_name})\n", "| " + " | ".join([key, *paths]) + " |", "|" + "---|" * (len(paths) + 1)]
    for i, x in enumerate(table["x"]):
        lines.append("| " + " | ".join([f"{x:g}" if isinstance(x, float) else str(x),
                                        *[f"{table['paths'][p][i]:.4f}" for p in paths]]) + " |")
    for cond, per_path in table["refs"].items():
        cells = ["—" if math.isnan(per_path[p]) else f"{per_path[p]:.4f}" for p in paths]
        lines.append("| " + " | ".join([f"*{cond}*", *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_ablation_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, str]:
    """Plots and Markdown for every multi-valued searched key of the sweep in ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    out = Path(out_dir) if out_dir is not None else sweep_dir
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    rows = read_csv(sweep_dir / "results.csv")
    main = summary["main_space"]
    keys = [k for k, values in summary["grid"].items() if len(values) > 1]
    parts = [f"## Ablations of sweep `{summary['name']}` (space `{summary['space']}`)\n",
             f"{sum(r.get('status') == 'finished' for r in rows)} finished trials; source KV blocks extracted "
             f"once: {summary['extractions']}.\n"]
    files = {}
    for key in keys:
        table = ablation_table(rows, key, main)
        name = "ablation_" + re.sub(r"[^\w.]+", "_", key) + ".png"
        files[f"plot_{key}"] = str(plot_ablation(table, key, main, out / name))
        parts.append(table_markdown(table, key, main, name))
    md = out / "ablations.md"
    md.write_text("\n".join(parts))
    files["ablations"] = str(md)
    return files
