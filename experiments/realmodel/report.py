"""The real-model report (``docs/results/real-model.md``), generated from a run's files only.

Reads what ``kvlingua real-model`` left in the run directory -- ``eval.json`` (the final table, test
split), ``timing.json``, ``pool/pool.json``, ``positions/eval-test-P<P>.json``,
``bench_handoff.json`` -- and the public model shapes of ``configs/shapes/`` (planned on the meta
device), and writes one Markdown file. Every verdict follows from the numbers by
:func:`experiments.toolkit.stats.outcome` (a paired difference ± 2 standard errors against a tolerance);
nothing in it is typed by hand. The sections that read the levers, training arms, benchmarks and public shapes
are in :mod:`experiments.realmodel.sections`.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from experiments.realmodel.sections import (BENCH_FILES, _fmt, bench_section, compare, content_cell,
                                            context_bytes_section, continuations_section, handoff_targets,
                                            length_targets, levers_section, read_bench, refresh_section,
                                            refresh_targets, sizes_section)
from experiments.realmodel.sinks import sinks_section
from experiments.toolkit.pools import deep_and_shallow, pool_table, pretraining_seconds
from experiments.toolkit.stats import FAILS, HOLDS
from kvlingua.eval_result import EvalResult
from kvlingua.metric_names import NllKey
from kvlingua.paths import path_name

DEPTH_LINEAR = "translator"
"""The space that holds the depth-linear adapter in the real-model run config."""
PAPER = "dense"
"""The space that holds the paper's adapter (dense output) in the real-model run config."""


@dataclass(frozen=True)
class ReportRun:
    """What the report says about the command that made the run, beside the run's own files."""

    command: str
    """The command line, as the report's first line names it."""
    positions: tuple[int, ...]
    """Prefix lengths of the position table."""
    shapes_dir: Path
    """``configs/shapes``: the public shapes of the size table."""
    machine: str
    """:func:`experiments.toolkit.provenance.machine` at the end of the run."""
    stages: dict = field(default_factory=dict)
    """Stage -> wall seconds (``real_model_stages.json``)."""
    commit: str = "unknown"
    """The code's commit."""
    pool: str | None = None
    """The run's pool YAML, whose members (how each was made, pre-training minutes, context use) are tabulated."""
    stage_commits: dict = field(default_factory=dict)
    """Stage -> the commit it ran at (``real_model_commits.json``; absent for stages run before it was kept)."""

    def provenance(self) -> str:
        """``code at commit `X` `` and, where stages ran at other commits (a resumed run) or without a record, which."""
        text = f"code at commit `{self.commit}`"
        by_commit: dict[str, list[str]] = {}
        for stage in self.stages:
            by_commit.setdefault(self.stage_commits.get(stage, ""), []).append(stage)
        if set(by_commit) <= {self.commit}:
            return text
        parts = [f"{', '.join(stages)} at `{c}`" for c, stages in by_commit.items() if c]
        parts += [f"{', '.join(by_commit[''])} at a commit not recorded"] if "" in by_commit else []
        return text + "; by stage: " + "; ".join(parts)


def claims_section(result: EvalResult, deep: str, shallow: str) -> list[str]:
    """The two questions of the experiment, each as a paired comparison with its outcome."""
    lines = ["## What the numbers say (test split)", ""]
    have = result.conditions_of((deep, shallow))
    space = DEPTH_LINEAR if DEPTH_LINEAR in have else next(c for c in have if c not in ("base", "control", "no-prefix"))
    diff, se, oc = compare(result, (deep, shallow), space, "base")
    s = result.summary_for((deep, shallow), space)
    base = result.summary_for((deep, shallow), "base")
    lines += [
        f"1. **Does {shallow} predict better after reading {deep}'s translated cache than after its own?** "
        f"(the paper's §4.4 claim: the shallower model reads the deeper one's). {shallow} reading {deep}'s cache through Σ "
        f"({space}): NLL {s.nll_mean:.3f}; after its own cache (base): {base.nll_mean:.3f}; paired difference "
        f"{diff:+.3f} ± {se:.3f} (SE over {result.num_batches} batches): **{oc}** "
        f"({'better' if oc == HOLDS else 'not better' if oc == FAILS else 'no clear difference'} "
        "at 2 standard errors).",
    ]
    s2 = result.summary_for((shallow, deep), space)
    base2 = result.summary_for((shallow, deep), "base")
    diff2, se2, _ = compare(result, (shallow, deep), space, "base")
    lines += [
        f"2. **How much of {deep}'s own context does {shallow}'s cache give it?** {deep} reading {shallow}'s "
        f"translated cache: NLL {s2.nll_mean:.3f} against {base2.nll_mean:.3f} after its own cache "
        f"(difference {diff2:+.3f} ± {se2:.3f}) and {result.summary_for((shallow, deep), 'control').nll_mean:.3f} "
        f"after another passage's cache (control): content transferred {content_cell(result, (shallow, deep), space)} "
        "(1 = all of its own context's value, 0 = none).",
        "",
    ]
    return lines


def adapters_section(result: EvalResult, timing: dict, deep: str, shallow: str) -> list[str]:
    """The depth-linear adapter against the paper's, path by path, with the training wall time each took."""
    if PAPER not in result.conditions or DEPTH_LINEAR not in result.conditions:
        return []
    lines = ["## The depth-linear adapter against the paper's", "",
             f"`{DEPTH_LINEAR}` is the depth-linear adapter (`output: per_layer`), `{PAPER}` the paper's (`output: "
             "dense`); both over the same Σ width, data and evaluation rows. Training (from `timing.json`): "
             + ", ".join(f"`{n}` {t['steps']} steps in {t['train_wall_s']:.0f} s" for n, t in timing.items()
                         if n in (DEPTH_LINEAR, PAPER)) + ".", "",
             f"| path | NLL {DEPTH_LINEAR} | NLL {PAPER} | {DEPTH_LINEAR} − {PAPER} (± SE) | outcome (≤ 0) "
             f"| content {DEPTH_LINEAR} | content {PAPER} |", "|---|---|---|---|---|---|---|"]
    for path in ((deep, shallow), (shallow, deep)):
        a, b = result.summary_for(path, DEPTH_LINEAR), result.summary_for(path, PAPER)
        diff, se, oc = compare(result, path, DEPTH_LINEAR, PAPER)
        lines.append(f"| {path_name(path)} | {a.nll_mean:.3f} | {b.nll_mean:.3f} | {diff:+.3f} ± {se:.3f} | {oc} | "
                     f"{content_cell(result, path, DEPTH_LINEAR)} | {content_cell(result, path, PAPER)} |")
    lines += ["", "outcome: `holds` = the depth-linear adapter reaches or beats the paper's (difference + 2 SE ≤ 0), "
              "`fails` = it is worse (difference − 2 SE > 0), else inconclusive.", ""]
    return lines


def _init_record(run_dir: Path) -> dict:
    """The main space's init record in ``histories.json`` (empty where the run has none)."""
    f = run_dir / "histories.json"
    return next((r for hist in (json.loads(f.read_text()).values() if f.is_file() else ()) for r in hist
                 if r.get("kind") == "init"), {})


def _readout_text(run_dir: Path, space_cfg: dict) -> str:
    """``, a token readout ...`` for a space with ``token_readout`` (each target's calibration squared error of the
    joint fit against Σ's alone, from the init record), else nothing."""
    if not space_cfg.get("token_readout", False):
        return ""
    init = _init_record(run_dir)
    ratios = {}
    for key, v in init.items():
        if key.startswith("init/readout/") and key.endswith("/error_ratio"):
            _, _, m, kind, _ = key.split("/")
            ratios.setdefault(m, {})[kind] = v
    said = "; ".join(f"{m}: keys ×{d.get('keys', float('nan')):.2f}, values ×{d.get('values', float('nan')):.2f}"
                     for m, d in ratios.items())
    return (", a token readout (`kvlingua/readout.py`: OUT also reads the target's own token and the one before it"
            + (f"; calibration squared error against Σ alone: {said})" if said else ")"))


def _prior_text(run_dir: Path, space_cfg: dict) -> str:
    """``, token priors ...`` for a space with ``token_prior`` (which targets kept theirs, from the main space's init
    record in ``histories.json``), else nothing."""
    n = space_cfg.get("token_prior", 0)
    if not n:
        return ""
    init = _init_record(run_dir)
    kept = {key.split("/")[2]: (v, init.get(key.replace("/kept", "/nll_delta"))) for key, v in init.items()
            if key.startswith("init/prior/") and key.endswith("/kept")}
    said = "; ".join(f"{m} {'kept' if v else 'dropped'} ({d:+.3f} nats on the calibration batches)"
                     for m, (v, d) in kept.items())
    return f", a token prior of the {n} most frequent calibration tokens per target (`kvlingua/prior.py`" + \
        (f": {said})" if said else ")")


def curves_section(run_dir: Path, report: Path, deep: str, shallow: str) -> list[str]:
    """Validation NLL of the cross-model paths at each evaluation of each space (``histories.json``: step 0 is
    right after the adapters' initialisation), and the curves drawn from the same records."""
    f = run_dir / "histories.json"
    if not f.is_file():
        return []
    from kvlingua.report import plot_history

    histories = json.loads(f.read_text())
    if not any(r.get("kind") == "eval" for hist in histories.values() for r in hist):
        return []  # trained without evaluations
    png = plot_history(histories, report.parent / report.stem / "curves.png",
                       title="Validation suffix NLL during Σ training (all spaces)")
    lines = ["## Training curves (validation split)", "",
             "Suffix NLL on validation rows at each evaluation; step 0 is right after the adapters' initialisation "
             "(for `init: closed_form`, the closed form; training keeps its best evaluation). No prefix at all is the floor a translated cache must beat to help.",
             "", f"![curves]({png.relative_to(report.parent).as_posix()})", "",
             "| space | path | validation NLL by step | no prefix | base |", "|---|---|---|---|---|"]
    for space, hist in histories.items():
        evals = [r for r in hist if r.get("kind") == "eval"]
        for path in ((deep, shallow), (shallow, deep)):
            name = path_name(path)
            key = NllKey(*path).curve()
            steps = ", ".join(f"{r['step']}: {r[key]:.2f}" for r in evals if key in r)
            last = evals[-1] if evals else {}
            lines.append(f"| {space} | {name} | {steps} | {_fmt(last.get(NllKey(*path, 'no-prefix').curve()))} | "
                         f"{_fmt(last.get(NllKey(*path, 'base').curve()))} |")
    lines.append("")
    return lines


def positions_section(run_dir: Path, positions: Sequence[int], trained: tuple[int, int], deep: str,
                      shallow: str) -> list[str]:
    """Content transferred and NLL of the main space at each prefix length."""
    lines = ["## Positions: prefix lengths inside and outside training", "",
             f"The adapters trained on prefixes of {trained[0]}–{trained[1]} tokens (each batch one length). Each "
             "row re-scores the trained pool on test rows with that prefix length (`kvlingua eval --prefix-len P`); "
             "rows of different P are different text; a split with too few long passages for every held-out batch is "
             "scored on the batches it holds (last column).", "",
             "| P | trained on | path | base | control | translated | content | batches |",
             "|---|---|---|---|---|---|---|---|"]
    for p in positions:
        f = run_dir / "positions" / f"eval-test-P{p}.json"
        if not f.is_file():
            lines.append(f"| {p} | | not run | | | | | |")
            continue
        result = EvalResult.from_dict(json.loads(f.read_text()))
        space = DEPTH_LINEAR if DEPTH_LINEAR in result.conditions else result.conditions[-1]
        inside = "yes" if trained[0] <= p <= trained[1] else "no"
        for path in ((deep, shallow), (shallow, deep)):
            s = {c: result.summary_for(path, c).nll_mean for c in ("base", "control", space)}
            lines.append(f"| {p} | {inside} | {path_name(path)} | {s['base']:.3f} | {s['control']:.3f} | "
                         f"{s[space]:.3f} | {content_cell(result, path, space)} | {result.num_batches} |")
    lines.append("")
    return lines


def _pretraining_note(pool: str | None) -> str:
    """The pool members' own pre-training wall times (pool manifest): inside ``train`` when the command found
    the pool new, else spent earlier by ``kvlingua pretrain``."""
    walls = pretraining_seconds(pool)
    if not walls:
        return ""
    return (" Pool pre-training (from the pool manifest): " + ", ".join(f"{n} {w / 60:.1f} min" for n, w in walls.items())
            + "; part of `train` when the pool is new, else spent before it by `kvlingua pretrain`.")


def acceptance_section(result: EvalResult, run_dir: Path, positions: Sequence[int], deep: str, shallow: str,
                       pool_json: dict) -> list[str]:
    """The issue's targets, each read off the numbers above; a pool of two families (members with their own
    tokenizers in ``pool_json``) is held to issue #22's too."""
    mixed = any("tokenizer" in m for m in pool_json["members"])
    space = DEPTH_LINEAR if DEPTH_LINEAR in result.conditions else result.conditions[-1]
    rows = []
    cyc = result.summary_for((deep, deep), space).content
    rows.append((f"{deep} → Σ → {deep} content ≥ 0.95", _fmt(cyc, 2), cyc >= 0.95))
    cross = result.summary_for((shallow, deep), space).content
    rows.append((f"{shallow} → {deep} content ≥ 0.6", _fmt(cross, 2), cross >= 0.6))
    floor_ok = all(result.summary_for(p, c).nll_mean <= result.summary_for(p, "no-prefix").nll_mean
                   for p in result.paths for c in result.conditions_of(p) if c not in ("base", "control", "no-prefix"))
    rows.append(("no space ends worse than no prefix on any path", "yes" if floor_ok else "no", floor_ok))
    at = {}
    for p in positions:
        f = run_dir / "positions" / f"eval-test-P{p}.json"
        if f.is_file():
            r = EvalResult.from_dict(json.loads(f.read_text()))
            at[p] = {tuple(path): r.summary_for(tuple(path), space).content for path in r.paths}
    if 64 in at and len(at) > 1:
        rows += length_targets(at, "", mixed, cyclic=True)
    rows += refresh_targets(run_dir, positions, mixed)
    if mixed:
        rows += handoff_targets(run_dir, pool_json)
    lines = ["## Against the targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows]
    return lines + [""]


def _stack_text(space_cfg: dict) -> str:
    """The main space's stack as the report says it (from ``pool.json``'s space config)."""
    if space_cfg.get("adapter") == "linear" or space_cfg.get("stack") is False:
        return "no cross-attention stack (the short path alone)"
    depth = space_cfg.get("num_layers")
    if depth is None:
        return "a cross-attention stack of one layer per model layer (the paper's)"
    how = "merged into one slice" if space_cfg.get("group_mode") == "merge" else "attended"
    return f"a cross-attention stack of {depth} layer(s), each reading one group of a model's layers ({how})"


def write_real_model_report(run_dir: str | Path, report: str | Path, run: ReportRun) -> Path:
    """Write the report for the run in ``run_dir`` to ``report``, from the run's files and ``run``; returns its path."""
    run_dir, report = Path(run_dir), Path(report)
    pool_json = json.loads((run_dir / "pool" / "pool.json").read_text())
    deep, shallow = deep_and_shallow(pool_json["members"])
    result = EvalResult.from_dict(json.loads((run_dir / "eval.json").read_text()))
    timing = json.loads((run_dir / "timing.json").read_text())
    job = pool_json.get("job", {})
    trained = tuple(pool_json.get("trained_prefix_len") or (job.get("prefix_len"), job.get("prefix_len")))
    bench, reverse = (read_bench(run_dir, name) for name in BENCH_FILES)
    total = sum(run.stages.values())
    lines = [
        "# Two real families, two tokenizers, one Σ" if any("tokenizer" in m for m in pool_json["members"])
        else "# A real pretrained model in the pool", "",
        f"Generated by `{run.command}` ({run.provenance()}) from the files that run wrote in "
        f"`{run_dir.name}/`; do not edit by hand.", "",
        f"* Machine: {run.machine}.",
        "* Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in run.stages.items())
        + f"; {total / 60:.1f} min in all." + _pretraining_note(run.pool),
        f"* Split: every number below is on the **{job.get('eval_split', 'test')}** split; training curves used "
        "validation" + (", and so does the refresh section's first table (where its share is chosen)"
                        if (run_dir / "refresh").is_dir() else "") + ".", "",
        "## The pool", "",
        "| model | type | layers × KV heads × head dim | vocabulary |", "|---|---|---|---|",
    ]
    for m in pool_json["members"]:
        s = m["summary"]
        lines.append(f"| {m['name']} | {s['model_type']} | {s['num_layers']} × {s['n_kv_heads']} × {s['head_dim']} | "
                     f"{s['vocab_size']} |")
    if run.pool is not None:
        lines += ["", *pool_table([run.pool])]
    lines += ["", f"Prefix {job.get('prefix_len')} tokens (trained on {trained[0]}–{trained[1]}), suffix "
              f"{job.get('suffix_len')}, batch {job.get('batch_size')}; spaces: "
              + ", ".join(f"`{n}` ({s.get('adapter')}, {s.get('output', '-')}, Q = {s.get('q_dim')})"
                          for n, s in job.get("spaces", {}).items()) + ".", ""]
    space_cfg = pool_json.get("space", {})
    lines += [f"Method settings of the main space: the target keeps its own first {space_cfg.get('sink_tokens', 0)} "
              f"position(s) (its attention sink; Σ carries the rest), keys travel {space_cfg.get('keys', 'rotated')}, "
              f"adapters start `{space_cfg.get('init', 'random')}`, Σ width Q = {space_cfg.get('q_dim')}, "
              f"{_stack_text(space_cfg)}{_readout_text(run_dir, space_cfg)}{_prior_text(run_dir, space_cfg)}. "
              "Content transferred = (control − NLL) / (control − base), where control is the target's own sink "
              "followed by another passage's positions.", ""]
    lines += acceptance_section(result, run_dir, run.positions, deep, shallow, pool_json)
    lines += claims_section(result, deep, shallow)
    lines += ["## Final table (test split)", "", result.to_markdown()]
    lines += levers_section(run_dir, deep, shallow)
    lines += continuations_section(run_dir)
    lines += adapters_section(result, timing, deep, shallow)
    lines += curves_section(run_dir, report, deep, shallow)
    lines += positions_section(run_dir, run.positions, trained, deep, shallow)
    lines += sinks_section(run_dir)
    lines += refresh_section(run_dir, run.positions, float(space_cfg.get("refresh", 0.0)))
    lines += bench_section(bench)
    lines += bench_section(reverse)
    lines += context_bytes_section(pool_json, bench)
    lines += sizes_section(Path(run.shapes_dir))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return report
