"""Reports of a Σ run: a Figure-3 style training curve and a Markdown/JSON evaluation report.

:func:`plot_history` draws the held-out suffix NLL of every path against the training
step (the paper's Figure 3), one panel per target model, with the target's *base*
(own cache) and *control* (own cache of another sequence) NLL as dashed and dotted
reference lines. It reads the ``kind="eval"`` records that :func:`kvlingua.train.fit`
appends to ``TrainState.history``, with keys ``eval/nll/i->j`` (the trained space),
``eval/nll/i->j/<condition>`` (other conditions; ``base``/``control``/``no-prefix`` are
references). Matplotlib is used object-oriented on the Agg canvas (:func:`agg_figure`): no
pyplot, no global backend switch, no display needed. :func:`fmt` is the one number format of
every generated report.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kvlingua.eval_result import TARGET_ONLY, EvalResult
from kvlingua.metric_names import NllKey


def fmt(x: Any, spec: str = ".3f", missing: str = "—") -> str:
    """A number of a generated report: ``format(x, spec)``; ``missing`` for None or NaN, ``never`` for an
    infinite step count; anything that is not a number as ``str``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float) and math.isinf(x):
        return "never"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def agg_figure(**kwargs: Any):
    """A matplotlib ``Figure`` drawn on its own Agg canvas (``kwargs`` to ``Figure``): no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _curve_key(key: str) -> NllKey | None:
    """The NLL a curve record's key names (``eval/nll/i->j[/cond]``), else None."""
    return NllKey.parse(key) if key.startswith("eval/nll/") else None


def _parse_curves(history: Sequence[dict]) -> tuple[dict[tuple[str, str, str | None], list[tuple[int, float]]],
                                                      dict[tuple[str, str], float]]:
    """History -> curves ``(source, target, condition|None) -> [(step, nll)]``, references ``(target, ref) -> nll``."""
    curves: dict[tuple[str, str, str | None], list[tuple[int, float]]] = {}
    refs: dict[tuple[str, str], float] = {}
    for rec in history:
        for name, value in rec.items():
            key = _curve_key(name)
            if key is None:
                continue
            if key.condition in TARGET_ONLY:
                refs[(key.target, key.condition)] = float(value)
            else:
                curves.setdefault((key.source, key.target, key.condition), []).append((int(rec["step"]), float(value)))
    return curves, refs


def plot_history(
    history: Sequence[dict] | Mapping[str, Sequence[dict]],
    out_png: str | Path,
    references: EvalResult | None = None,
    title: str = "Held-out suffix NLL during Σ training",
    zero_shot: Sequence[str] = (),
) -> Path:
    """Plot eval NLL per path against training step, one panel per target model.

    Args:
        history: ``TrainState.history`` of one run, or ``{space name: history}`` of several
            runs over the same pool (e.g. translator and linear) drawn in the same panels.
        out_png: where to write the PNG.
        references: an :class:`EvalResult` to take base/control lines from when the
            history holds none.
        title: figure title.
        zero_shot: names ``i->j`` of paths no training step used: drawn solid and thick, labelled
            "(zero-shot)" (the paper's Figure 4), the trained paths thin and dashed.

    Returns:
        ``out_png`` as a Path. Raises ``ValueError`` if no history holds ``eval/nll/...``.
    """
    runs = dict(history) if isinstance(history, Mapping) else {"": history}
    curves: dict[tuple[str, tuple[str, str, str | None]], list[tuple[int, float]]] = {}
    refs: dict[tuple[str, str], float] = {}
    for run, hist in runs.items():
        c, r = _parse_curves(hist)
        curves.update({(run, k): v for k, v in c.items()})
        refs.update(r)
    if not curves:
        raise ValueError("history has no eval records with eval/nll/<source>-><target> metrics to plot "
                         "(train with eval_every > 0 and an eval_fn)")
    if references is not None:
        for src, tgt in references.paths:
            for ref in ("base", "control"):
                if ref in references.conditions_of((src, tgt)):
                    refs.setdefault((tgt, ref), references.summary_for((src, tgt), ref).nll_mean)
    targets = list(dict.fromkeys(key[1][1] for key in curves))
    sources = list(dict.fromkeys(key[1][0] for key in curves))
    styles = ["-", "--", "-.", ":"]
    run_style = {run: styles[i % len(styles)] for i, run in enumerate(runs)}
    colors = {s: f"C{i % 10}" for i, s in enumerate(sources)}

    fig = agg_figure(figsize=(5.0 * len(targets), 4.0), constrained_layout=True)
    axes = fig.subplots(1, len(targets), squeeze=False)[0]
    for ax, tgt in zip(axes, targets):
        for (run, (src, t, cond)), points in curves.items():
            if t != tgt:
                continue
            points = sorted(points)
            unseen = f"{src}->{t}" in set(zero_shot)
            label = " ".join(x for x in (run, f"{src}->{t}", cond, "(zero-shot)" if unseen else "") if x)
            style = "-" if unseen else ("--" if zero_shot else run_style[run])
            ax.plot([p[0] for p in points], [p[1] for p in points], style, color=colors[src],
                    linewidth=2.5 if unseen else 1.2, marker="o", markersize=3, label=label)
        if (tgt, "base") in refs:
            ax.axhline(refs[(tgt, "base")], color="black", linestyle="--", linewidth=1, label=f"base ({tgt} own cache)")
        if (tgt, "control") in refs:
            ax.axhline(refs[(tgt, "control")], color="gray", linestyle=":", linewidth=1,
                       label=f"control ({tgt}, wrong prefix)")
        ax.set_title(f"target {tgt}")
        ax.set_xlabel("training step")
        ax.set_ylabel("suffix NLL per token")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def write_report(
    out_dir: str | Path,
    result: EvalResult,
    history: Sequence[dict] | Mapping[str, Sequence[dict]] | None = None,
    *,
    title: str = "kvlingua evaluation",
    config: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md`` (config, tables, curve) and ``eval_nll.png`` into ``out_dir``.

    The plot is written only when ``history`` holds eval records. Returns name -> path of
    the files written (``json``, ``markdown`` and possibly ``plot``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": result.to_json(out / "eval.json")}
    parts = [f"# {title}\n"]
    if config is not None:
        parts += ["## Configuration\n", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```\n"]
    parts += ["## Held-out suffix NLL\n", result.to_markdown()]
    if history is not None:
        runs = history.values() if isinstance(history, Mapping) else [history]
        if any(_curve_key(k) is not None for h in runs for rec in h for k in rec):
            files["plot"] = plot_history(history, out / "eval_nll.png", references=result)
            parts += ["## Training curve\n", f"![held-out suffix NLL per path against step]({files['plot'].name})\n"]
    md = out / "eval.md"
    md.write_text("\n".join(parts))
    files["markdown"] = md
    return files
