"""``docs/results/paper.md``, generated from a results directory of ``kvlingua paper`` (never hand edited).

Each experiment's folder ``<results>/<section>/`` holds ``result.json`` (written when the
experiment finished): its wall time, its evaluations on the test split (label -> ``eval.json``),
its training histories, for sweeps the group chosen per swept value on validation, and what the
sliding window hides. :func:`write_paper_report` turns them into one Markdown page with,
per experiment, the paper's numbers beside ours, every paired comparison (difference ± standard
error over held-out batches, and whether no prefix or the control would have passed it), the verdict that
follows (:mod:`experiments.paper.claims`), the wall
time, the exact command to rerun it, and its plot beside the page.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

from experiments.paper.claims import FAILS, HOLDS, UNSURE, mean_over_paths, run_check, verdict
from experiments.paper.suite import PaperExperiment
from experiments.toolkit.pools import pool_table
from experiments.toolkit.provenance import provenance_line
from experiments.toolkit.stats import paired_difference
from kvlingua.eval_result import EvalResult
from kvlingua.report import agg_figure, fmt, plot_history

RESULT_FILE = "result.json"


def read_result(results: Path, section: str) -> tuple[dict, dict[str, EvalResult], dict[str, list]] | None:
    """``(result.json, evaluations, histories)`` of a finished experiment; None when it has not finished."""
    f = results / section / RESULT_FILE
    if not f.is_file():
        return None
    res = json.loads(f.read_text())
    evals = {k: EvalResult.from_dict(json.loads((results / section / v).read_text())) for k, v in res["evals"].items()}
    hists = {k: json.loads((results / section / v).read_text()) for k, v in res.get("histories", {}).items()}
    return res, evals, hists


def _step(x: float) -> str:
    """A curve step at which a path first reached base, or ``never``."""
    return "never" if math.isinf(x) else f"step {x:.0f}"


def _group_nll(result: EvalResult, main: str) -> tuple[list[float], list[float]]:
    """Per-batch NLL of a sweep group's space and of base, each averaged over paths (plot and table)."""
    return mean_over_paths(result, main), mean_over_paths(result, "base")


def _plot(exp: PaperExperiment, res: dict, evals: dict[str, EvalResult], hists: dict[str, list], png: Path) -> Path | None:
    if exp.kind == "train":
        main = res.get("main_space", "translator")
        hist = {name: h for name, h in hists.get("run", {}).items() if name == main} or hists.get("run", {})
        if not hist:
            return None
        zero = [f"{p[0]}->{p[1]}" for p in evals["run"].paths if not evals["run"].is_trained(p)]
        return plot_history(hist, png, references=evals["run"], zero_shot=zero,
                            title=f"§{exp.section} ({exp.figure}): held-out (validation) suffix NLL per path")
    labels = list(res["groups"])
    main = res.get("main_space", "translator")
    fig = agg_figure(figsize=(6, 4), constrained_layout=True)
    ax = fig.subplots()
    means, ses = [], []
    for lab in labels:
        series, _ = _group_nll(evals[lab], main)
        m, se = paired_difference(series, [0.0] * len(series))
        means.append(m)
        ses.append(0.0 if math.isnan(se) else se)
    ax.errorbar(range(len(labels)), means, yerr=[2 * s for s in ses], marker="o", capsize=4, label="Σ (test, ± 2 se)")
    _, base = _group_nll(evals[labels[0]], main)
    ax.axhline(sum(base) / len(base), color="black", linestyle="--", label="base (own cache), mean over targets")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(exp.group_by)
    ax.set_ylabel("suffix NLL per token, mean over paths")
    ax.set_title(f"§{exp.section} ({exp.figure})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return png


def _numbers(exp: PaperExperiment, res: dict, evals: dict[str, EvalResult]) -> list[str]:
    """Our numbers in full: every path under every condition (train), or each group of a sweep against base."""
    if exp.kind == "train":
        return ["<details><summary>Every path under every condition (test split)</summary>\n",
                evals["run"].to_markdown(), "</details>\n"]
    main = res.get("main_space", "translator")
    rows = [f"| {exp.group_by} | validation NLL (selects lr) | Σ test NLL, mean over paths | base | Σ − base ± se |",
            "|---|---|---|---|---|"]
    for label in res["groups"]:
        sigma, base = _group_nll(evals[label], main)
        diff, se = paired_difference(sigma, base)
        rows.append(f"| {label} | {fmt(res['validation'][label])} | {fmt(sum(sigma) / len(sigma))} | "
                    f"{fmt(sum(base) / len(base))} | {fmt(diff)} ± {fmt(se)} |")
    return rows + [""]


def _read_run(results: Path, section: str) -> dict | None:
    """The run config an experiment wrote beside its results (``<section>/run.yaml``), None before it ran."""
    f = results / section / "run.yaml"
    if not f.is_file():
        return None
    import yaml

    return yaml.safe_load(f.read_text())


def _settings(run: dict | None) -> str:
    """One line of the training settings the experiment ran with."""
    if run is None:
        return ""
    train, ev = run.get("train", {}), run.get("eval", {})
    spaces = ", ".join(f"{n} ({s.get('adapter', 'translator')}, Q = {s.get('q_dim')})" for n, s in run.get("spaces", {}).items())
    return (f"Training: {train.get('steps')} steps of batch {run.get('batch_size')}, prefix {run.get('prefix_len')} + "
            f"suffix {run.get('suffix_len')} tokens, lr {train.get('lr')}, members {', '.join(run.get('pool_members') or [])}; "
            f"spaces {spaces}; test: {ev.get('batches')} batches of {ev.get('batch_size')} rows.\n")


def _spaces(run_dir: Path) -> str:
    """Per trained space of a train experiment: its adapter parameters (IN + OUT, summed over members), steps and
    training minutes (``timing.json``), so size comparisons (§7.1) read against what each space cost."""
    from kvlingua.pool import load_pool
    from kvlingua.rundir import read_run_pools

    timing_file = run_dir / "timing.json"
    if not timing_file.is_file():
        return ""
    timing = json.loads(timing_file.read_text())
    parts = []
    for name, pool in read_run_pools(run_dir).items():
        counts = load_pool(pool, load_models=False, verify=False).space.param_counts()
        params = sum(c["in"] + c["out"] for c in counts.values())
        t = timing.get(name, {})
        parts.append(f"{name} {params / 1e6:.2f}M adapter parameters, {t.get('steps')} steps in "
                     f"{fmt(t.get('train_wall_s', math.nan) / 60, '.1f')} min")
    return "Spaces: " + "; ".join(parts) + ".\n"


class Section(NamedTuple):
    """One experiment's part of the report and what the summary table and pool table read from it."""

    text: str
    """Its Markdown."""
    verdict: str
    """``reproduced``, ``partly``, ``not reproduced``, ``no data`` or ``not run``."""
    counts: dict[str, int]
    """How many comparisons hold, are inconclusive, fail (empty when it has not run)."""
    wall_min: float
    """Its wall time in minutes (NaN when it has not run)."""
    run: dict | None
    """The run config it ran with (None when it has not run)."""


def _needs(check, c) -> str:
    """The relation and the tolerance applied (nats; with ``tol_share``, the share of the gap it came from)."""
    if check.tol_share is None:
        return f"{check.relation} {check.tol:g}"
    return f"{check.relation} {c.tol:.3f} ({check.tol_share:g} of no-prefix − base)"


def _floors(c) -> str:
    """``no-prefix: yes, control: no`` for the floors measured on the row's path; ``—`` where none applies."""
    return ", ".join(f"{f}: {'**yes**' if ok else 'no'}" for f, ok in c.floors.items()) or "—"


def experiment_section(exp: PaperExperiment, results: Path, plot_dir: Path | None, md_dir: Path) -> Section:
    """The Markdown of one experiment, its overall verdict and how many comparisons hold, are inconclusive, fail."""
    got = read_result(results, exp.section)
    cmd = f"kvlingua paper --only {exp.section}"
    head = [f"## §{exp.section} — {exp.title} ({exp.figure})\n", f"**Claim (paper).** {exp.claim}\n",
            f"**Paper's numbers.** {exp.paper}\n"]
    if got is None:
        text = "\n".join(head + [f"**Not run yet.** Run `{cmd}` (estimated {exp.estimate_min:.0f} min on 2 cores).\n"])
        return Section(text, "not run", {}, math.nan, None)
    res, evals, hists = got
    best_of = {"best": res["best"]} if res.get("best") else None
    curves = {"run": hists.get("run", {}).get(res.get("main_space", "translator"), [])}
    rows, comparisons = [], []
    for check in exp.checks:
        cs = run_check(check, evals, curves, best_of)
        comparisons += cs
        for c in cs:
            if check.kind == "steps":  # curve steps to reach base, not NLL: no standard error
                cells = f"{_step(c.a)} | {_step(c.b)} | {fmt(c.diff, '.0f') if math.isfinite(c.diff) else '—'} | fewer"
            else:
                cells = f"{fmt(c.a)} | {fmt(c.b)} | {fmt(c.diff)} ± {fmt(c.se)} | {_needs(check, c)}"
            rows.append(f"| {check.label} | {c.what} | {cells} | {_floors(c)} | {c.outcome} |")
    v = verdict(comparisons)
    n = next(iter(evals.values())).num_batches
    lines = head + [f"**Verdict: {v}.** Each row is a paired comparison over the same {n} held-out batches of the "
                    f"test split (difference a − b ± its standard error); a row holds when the difference is within "
                    f"the tolerance by 2 standard errors, fails when it is outside by 2 standard errors. *Would a floor pass*: "
                    f"whether no prefix at all, or the control (another passage's cache), in place of a would have "
                    f"passed the same row; a row a floor passes is no evidence and counts as inconclusive.\n",
                    "| claim | comparison | a (NLL) | b (NLL) | a − b ± se | needs | would a floor pass | outcome |",
                    "|---|---|---|---|---|---|---|---|",
                    *rows, ""]
    lines += _numbers(exp, res, evals)
    if res.get("best"):
        lines.append("Sweep groups (each the best lr on the validation curve): " +
                     ", ".join(f"{g} → trial {t}" for g, t in res["groups"].items()) +
                     f"; best {exp.group_by} on validation: {res['best']}.\n")
    if res.get("window"):
        hidden = {m: w for m, w in res["window"].items() if w["hidden"] > 0}
        lines.append("Sliding window: every suffix token sees the whole prefix on every layer.\n" if not hidden else
                     "Sliding window hides " + ", ".join(f"{w['hidden']:.0%} of (suffix, prefix) token pairs on "
                                                         f"{m}'s sliding layers (window {w['window']})"
                                                         for m, w in hidden.items()) + ".\n")
    run = _read_run(results, exp.section)
    lines.append(_settings(run))
    if exp.kind == "train":
        lines.append(_spaces(results / exp.section / "run"))
    lines.append(f"Wall time: {res['wall_s'] / 60:.1f} min (estimated {exp.estimate_min:.0f} min). "
                 f"Rerun alone: `{cmd}`" + (" (smoke sizes: these numbers test the code path, not the claim)"
                                            if res.get("smoke") else "") + "\n")
    if plot_dir is not None:
        png = _plot(exp, res, evals, hists, plot_dir / f"{exp.section}.png")
        if png is not None:
            lines.append(f"![§{exp.section}]({png.relative_to(md_dir).as_posix()})\n")
    counts = {o: sum(c.outcome == o for c in comparisons) for o in (HOLDS, UNSURE, FAILS)}
    return Section("\n".join(lines), v, counts, res["wall_s"] / 60, run)


def write_paper_report(experiments: dict[str, PaperExperiment], results: str | Path, out_md: str | Path,
                       command: str = "kvlingua paper") -> Path:
    """Generate the report of every experiment (finished or not) into ``out_md``; plots in ``<out_md stem>/``."""
    results, out_md = Path(results), Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot_dir = out_md.parent / out_md.stem
    done = {sec: experiment_section(exp, results, plot_dir, out_md.parent) for sec, exp in experiments.items()}
    summary = []
    for sec, exp in experiments.items():
        part = done[sec]
        tally = " / ".join(str(part.counts[o]) for o in (HOLDS, UNSURE, FAILS)) if part.counts else "—"
        summary.append(f"| §{sec} | {exp.figure} | {exp.title} | {tally} | {part.verdict} | {fmt(part.wall_min, '.1f')} | "
                       f"{exp.estimate_min:.0f} |")
    total = sum(p.wall_min for p in done.values() if not math.isnan(p.wall_min))
    parts = ["# The paper, reproduced at CPU scale\n",
             f"{provenance_line(command)} Results read from `{results}`. Every number is measured on the "
             "**test** split; curves and selection use the validation split. Verdicts follow from the paired "
             "differences (see `experiments/paper/claims.py`).\n",
             "| section | paper | experiment | comparisons: hold / inconclusive / fail | verdict | wall (min) | "
             "estimate (min) |", "|---|---|---|---|---|---|---|",
             *summary, "", f"Total wall time of the finished experiments: {total:.1f} min.\n",
             *pool_table(sorted({p.run.get('pool') for p in done.values() if p.run is not None} - {None})), *(p.text for p in done.values())]
    out_md.write_text("\n".join(parts))
    return out_md
