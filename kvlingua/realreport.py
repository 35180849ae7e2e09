"""The real-model report (``docs/results/real-model.md``), generated from a run's files only.

Reads what ``kvlingua real-model`` left in the run directory -- ``eval.json`` (the final table, test
split), ``timing.json``, ``pool/pool.json``, ``positions/eval-test-P<P>.json``,
``bench_handoff.json`` -- and the public model shapes of ``configs/shapes/`` (planned on the meta
device), and writes one Markdown file. Every verdict follows from the numbers by
:func:`kvlingua.paper.claims.outcome` (a paired difference ± 2 standard errors against a tolerance);
nothing in it is typed by hand.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from kvlingua.evaluate import EvalResult, paired_difference
from kvlingua.paper.claims import outcome
from kvlingua.paths import path_name

DEPTH_LINEAR = "translator"
"""The space that holds the depth-linear adapter in the real-model run config."""
PAPER = "dense"
"""The space that holds the paper's adapter (dense output) in the real-model run config."""


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _series(result: EvalResult, path: tuple[str, str], cond: str) -> list[float]:
    return list(result.per_batch["all"][path_name(path)][cond])


def compare(result: EvalResult, path: tuple[str, str], a: str, b: str, relation: str = "le",
            tol: float = 0.0) -> tuple[float, float, str]:
    """``(mean a − b, its standard error, outcome)`` over the held-out batches of ``path``."""
    diff, se = paired_difference(_series(result, path, a), _series(result, path, b))
    return diff, se, outcome(diff, se, relation, tol)


def _content_cell(result: EvalResult, path, cond: str) -> str:
    s = result.summary_for(path, cond)
    return _fmt(s.content, 2) if not math.isnan(s.content) else f"n/a (gap {s.gap:.3f} ± {s.gap_se:.3f})"


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
        f"({'better' if oc == 'holds' else 'not better' if oc == 'fails' else 'no clear difference'} "
        "at 2 standard errors).",
    ]
    s2 = result.summary_for((shallow, deep), space)
    base2 = result.summary_for((shallow, deep), "base")
    diff2, se2, _ = compare(result, (shallow, deep), space, "base")
    lines += [
        f"2. **How much of {deep}'s own context does {shallow}'s cache give it?** {deep} reading {shallow}'s "
        f"translated cache: NLL {s2.nll_mean:.3f} against {base2.nll_mean:.3f} after its own cache "
        f"(difference {diff2:+.3f} ± {se2:.3f}) and {result.summary_for((shallow, deep), 'control').nll_mean:.3f} "
        f"after another passage's cache (control): content transferred {_content_cell(result, (shallow, deep), space)} "
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
                     f"{_content_cell(result, path, DEPTH_LINEAR)} | {_content_cell(result, path, PAPER)} |")
    lines += ["", "outcome: `holds` = the depth-linear adapter reaches or beats the paper's (difference + 2 SE ≤ 0), "
              "`fails` = it is worse (difference − 2 SE > 0), else inconclusive.", ""]
    return lines


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
            steps = ", ".join(f"{r['step']}: {r[f'eval/nll/{name}']:.2f}" for r in evals if f"eval/nll/{name}" in r)
            last = evals[-1] if evals else {}
            lines.append(f"| {space} | {name} | {steps} | {_fmt(last.get(f'eval/nll/{name}/no-prefix'))} | "
                         f"{_fmt(last.get(f'eval/nll/{name}/base'))} |")
    lines.append("")
    return lines


def positions_section(run_dir: Path, positions: Sequence[int], trained: tuple[int, int], deep: str,
                      shallow: str) -> list[str]:
    """Content transferred and NLL of the main space at each prefix length."""
    lines = ["## Positions: prefix lengths inside and outside training", "",
             f"The adapters trained on prefixes of {trained[0]}–{trained[1]} tokens (each batch one length). Each "
             "row re-scores the trained pool on test rows with that prefix length (`kvlingua eval --prefix-len P`); "
             "rows of different P are different text.", "",
             "| P | trained on | path | base | control | translated | content |", "|---|---|---|---|---|---|---|"]
    for p in positions:
        f = run_dir / "positions" / f"eval-test-P{p}.json"
        if not f.is_file():
            lines.append(f"| {p} | | not run | | | | |")
            continue
        result = EvalResult.from_dict(json.loads(f.read_text()))
        space = DEPTH_LINEAR if DEPTH_LINEAR in result.conditions else result.conditions[-1]
        inside = "yes" if trained[0] <= p <= trained[1] else "no"
        for path in ((deep, shallow), (shallow, deep)):
            s = {c: result.summary_for(path, c).nll_mean for c in ("base", "control", space)}
            lines.append(f"| {p} | {inside} | {path_name(path)} | {s['base']:.3f} | {s['control']:.3f} | "
                         f"{s[space]:.3f} | {_content_cell(result, path, space)} |")
    lines.append("")
    return lines


def bench_section(bench: dict | None) -> list[str]:
    if bench is None:
        return []
    cfg = bench["config"]
    lines = ["## Hand-off at a real shape", "",
             f"`python bench/bench_handoff.py --pool ... --source {cfg['source']} --target {cfg['target']} --prefix "
             f"{cfg['prefix']} --suffix {cfg['suffix']} --no-variants`: the {cfg['prefix']}-token prefix of held-out "
             f"text, already read by {cfg['source']}, reaches {cfg['target']} either by {cfg['target']} re-reading the "
             f"text or through Σ; median of {cfg['repeats']} rounds, {cfg['threads']} thread(s), with "
             f"{cfg['target']}'s suffix NLL after each cache. Target: translation ≤ 0.5× re-prefill.", "",
             "| method | ms | × re-prefill | suffix NLL |", "|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(f"| {r['method']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['suffix_nll']:.3f} |")
    lines += [f"| no prefix (floor) | | | {bench['no_prefix_nll']:.3f} |", ""]
    return lines


def context_bytes_section(pool_json: dict, bench: dict | None) -> list[str]:
    """Bytes of a context stored once in Σ (what the serve context store keeps: keys and values ``[1, P-k, Q]``)
    against every member's native cache of the same text (``[1, P, L, D]`` keys and values), fp32."""
    if bench is None:
        return []
    p = int(bench["config"]["prefix"])
    space = pool_json.get("space", {})
    q, k = int(space["q_dim"]), int(space.get("sink_tokens", 0))
    sigma = 2 * (p - k) * q * 4
    native = {m["name"]: 2 * p * m["summary"]["num_layers"] * m["summary"]["n_kv_heads"] * m["summary"]["head_dim"] * 4
              for m in pool_json["members"]}
    lines = ["## A stored context against the native caches", "",
             f"A {p}-token context stored once in Σ (keys and values of its {p - k} positions after the sink, Q = {q}, "
             "fp32, as the serve context store keeps it; each reader computes its own sink) against each member's "
             "own cache of it (fp32), computed from the pool's shapes. Target (issue #22): ≤ 0.25× the two native "
             "caches together.", "",
             "| what | bytes | × Σ |", "|---|---|---|", f"| Σ (stored once, read by every member) | {sigma:,} | 1.00 |"]
    for name, b in native.items():
        lines.append(f"| {name}'s own cache | {b:,} | {b / sigma:.2f} |")
    both = sum(native.values())
    lines += [f"| all members' caches together | {both:,} | {both / sigma:.2f} |", "",
              f"Σ is **{sigma / both:.3f}×** the members' caches together.", ""]
    return lines


def sizes_section(shapes_dir: Path) -> list[str]:
    """IN + OUT of the paper's adapter against the depth-linear one at each public shape (Q = 32 L)."""
    from kvlingua.cache import arch_summary
    from kvlingua.plan import Q_PER_LAYER, load_model_config, meta_model, meta_space, model_name, n_params
    from kvlingua.translator import SpaceConfig

    lines = ["## Adapter sizes at public model shapes", "",
             f"IN + OUT of one model at Σ width Q = {Q_PER_LAYER}·L, counted on the meta device from the "
             "`config.json` files in `configs/shapes/` (no weights): the paper's adapter (`dense`) against the "
             "depth-linear one (`per_layer`), as a share of the model's own parameters, both with the default "
             "closed-form start, whose short path is dense (L·D × Q per map: the per-layer short path would be Q/L "
             "of that). Target ≤ 0.1×.", "",
             "| model | L × D | params | dense IN + OUT | share | per_layer IN + OUT | share |",
             "|---|---|---|---|---|---|---|"]
    for f in sorted(shapes_dir.glob("*.json")):
        config = load_model_config(f)
        name, summary, params = model_name(f), arch_summary(config), n_params(meta_model(config))
        q = Q_PER_LAYER * summary.num_layers
        size = {}
        for out in ("dense", "per_layer"):
            counts = meta_space({name: summary}, SpaceConfig(q_dim=q, output=out)).param_counts()[name]
            size[out] = counts["in"] + counts["out"]
        lines.append(f"| {f.stem} | {summary.num_layers} × {summary.width} | {params / 1e6:.1f}M | "
                     f"{size['dense'] / 1e6:.1f}M | {size['dense'] / params:.2f}× | {size['per_layer'] / 1e6:.1f}M | "
                     f"{size['per_layer'] / params:.3f}× |")
    lines.append("")
    return lines


def _pretraining_note(pool: str | None) -> str:
    """The pool members' own pre-training wall times (pool manifest): inside ``train`` when the command found
    the pool new, else spent earlier by ``kvlingua pretrain``."""
    if pool is None:
        return ""
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import MANIFEST, PoolConfig, pool_dir

    manifest = pool_dir(load_config(PoolConfig, pool)) / MANIFEST
    if not manifest.is_file():
        return ""
    walls = {e["name"]: e["metrics"]["train_wall_s"] for e in json.loads(manifest.read_text())["members"]
             if "train_wall_s" in e["metrics"]}
    if not walls:
        return ""
    return (" Pool pre-training (from the pool manifest): " + ", ".join(f"{n} {w / 60:.1f} min" for n, w in walls.items())
            + "; part of `train` when the pool is new, else spent before it by `kvlingua pretrain`.")


def _content(result: EvalResult, path, cond: str = "space") -> float:
    return result.summary_for(path, cond).content


def levers_section(run_dir: Path, deep: str, shallow: str) -> list[str]:
    """The closed-form start against the trained space, and what each lever buys at the start (``levers/``)."""
    d = run_dir / "levers"
    if not (d / "trained.json").is_file():
        return []
    res = {f.stem: EvalResult.from_dict(json.loads(f.read_text())) for f in sorted(d.glob("*.json"))
           if f.name != "names.json"}
    names = json.loads((d / "names.json").read_text()) if (d / "names.json").is_file() else {}
    start_key = next((k for k, n in names.items() if n == "start (closed form)"), None)
    trained, start = res["trained"], res.get(start_key)
    paths = [tuple(p) for p in trained.paths]
    lines = ["## The closed-form start against training (test split)", "",
             "`start` is the main space before any training step: the closed form (`init: closed_form`: joint "
             "principal directions of the members' caches, ridge regression in and out, no gradients), computed from "
             "the run's first training batches exactly as training starts; `trained` is the final space. Both on the "
             "same test rows; `trained − start` is their paired NLL difference (negative: training helped).", "",
             "| path | start NLL | start content | trained NLL | trained content | trained − start (± SE) |",
             "|---|---|---|---|---|---|"]
    for path in paths:
        if start is None:
            break
        diff, se = paired_difference(_series(trained, path, "space"), _series(start, path, "space"))
        lines.append(f"| {path_name(path)} | {start.summary_for(path, 'space').nll_mean:.3f} | "
                     f"{_fmt(_content(start, path), 2)} | {trained.summary_for(path, 'space').nll_mean:.3f} | "
                     f"{_fmt(_content(trained, path), 2)} | {diff:+.3f} ± {se:.3f} |")
    lines += ["", "## Levers at the start (test split)", "",
              "Each row changes one setting of the main space against its own start and recomputes the start "
              "(no training: every variant costs the same, seconds). `sink_tokens: k` = the target keeps its own "
              "first k positions (its attention sink), `keys: rotated` = keys travel with RoPE, `q_dim` = Σ's width, "
              "`init: match` = the earlier random start rescaled to the target's statistics. NLL difference against "
              "the default start on the same rows (paired, ± SE; negative = the lever helps). A row's control keeps "
              "its own sink, so content compares within a row; the NLL difference compares across rows.", "",
              "| lever | " + " | ".join(f"{path_name(p)} NLL (content) | − start (± SE)" for p in paths) + " |",
              "|---|" + "---|---|" * len(paths)]
    for key, name in names.items():
        if key not in res or key == "trained":
            continue
        cells = []
        for path in paths:
            r = res[key]
            cell = f"{r.summary_for(path, 'space').nll_mean:.3f} ({_fmt(_content(r, path), 2)})"
            if start is not None and key != start_key:
                diff, se = paired_difference(_series(r, path, "space"), _series(start, path, "space"))
                cells += [cell, f"{diff:+.3f} ± {se:.3f}"]
            else:
                cells += [cell, "—"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + ["", *objectives_section(run_dir)]


def objectives_section(run_dir: Path) -> list[str]:
    """The objective lever (``objectives/``): the main space trained afresh per objective for the same wall time,
    each against the default objective on the levers' rows, and which objective the numbers make the default."""
    d = run_dir / "objectives"
    if not (d / "runs.json").is_file():
        return ["The objective lever (suffix KL to the target's own-cache distribution, reconstruction) trains one "
                "space per objective; this run skipped it (`kvlingua real-model --objective-seconds S`).", ""]
    meta = json.loads((d / "runs.json").read_text())
    runs = meta["runs"]
    res = {n: EvalResult.from_dict(json.loads((d / f"{n}.json").read_text())) for n in runs}
    default = next(iter(runs))
    paths = [tuple(p) for p in res[default].paths]
    lines = ["## Objectives at equal wall time (test split)", "",
             f"Each row trains the main space afresh from its start for {meta['seconds']:g} wall seconds "
             "(evaluations included; the schedule is planned from the measured step cost to end a little past the "
             "budget, so the budget ends every run), keeps its best validation evaluation, and is scored on the "
             "levers' rows. `suffix`: the paper's suffix cross-entropy; `kl`: the mean over suffix tokens of "
             "KL(target after its own cache ‖ target after the translated cache); `recon`: suffix cross-entropy + "
             f"the reconstruction loss (weight 1, in Σ's view). NLL difference against `{default}` on the same rows "
             "(paired, ± SE; negative = the objective helps).", "",
             "| objective | steps (schedule) | train s | kept step | "
             + " | ".join(f"{path_name(p)} NLL (content) | − {default} (± SE)" for p in paths) + " |",
             "|---|---|---|---|" + "---|---|" * len(paths)]
    beats = {}
    for name, run in runs.items():
        r, cells, wins = res[name], [], []
        for path in paths:
            cells.append(f"{r.summary_for(path, 'space').nll_mean:.3f} ({_fmt(_content(r, path), 2)})")
            if name == default:
                cells.append("—")
                continue
            diff, se = paired_difference(_series(r, path, "space"), _series(res[default], path, "space"))
            cells.append(f"{diff:+.3f} ± {se:.3f}")
            wins.append(diff < 0 and outcome(diff, se, "le", 0.0) == "holds")
        if wins and all(wins):
            beats[name] = sum(r.summary_for(p, "space").nll_mean for p in paths)
        lines.append(f"| {name} | {run['steps']} ({run['schedule_steps']}) | {run['train_s']:.1f} | "
                     f"{run['best_step']} | " + " | ".join(cells) + " |")
    best = min(beats, key=beats.get) if beats else default
    verdict = (f"it beats `{default}` on every path by more than 2 standard errors at equal wall time"
               if best != default else
               "no other objective beats it on every path by more than 2 standard errors at equal wall time")
    lines += ["", f"**Default objective: `{best}`**: {verdict}.", ""]
    return lines


def acceptance_section(result: EvalResult, run_dir: Path, positions: Sequence[int], deep: str, shallow: str) -> list[str]:
    """The issue's targets, each read off the numbers above."""
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
        worst = min(at[p][path] - at[64][path] for p in at for path in at[p])
        rows.append(("every path within 0.05 of its P = 64 content at every P", f"worst {worst:+.2f}", worst >= -0.05))
    lines = ["## Against the targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in rows]
    return lines + [""]


def continuations_section(run_dir: Path) -> list[str]:
    f = run_dir / "continuations.json"
    if not f.is_file():
        return []
    c = json.loads(f.read_text())
    lines = ["## Latent continuations", "",
             f"{c['target']} continues held-out prompts that {c['source']} read (greedy, {c['max_new_tokens']} tokens): "
             "through Σ (`latent`) and by re-reading the text (`text`).", ""]
    for row in c["rows"]:
        lines += [f"* **Prompt:** …{row['prompt'][-160:]}", f"  * latent: {row['latent']}", f"  * text: {row['text']}"]
    return lines + [""]


def write_real_model_report(run_dir: str | Path, report: str | Path, *, command: str, positions: Sequence[int],
                            shapes_dir: str | Path, machine: str, stages: dict, commit: str,
                            pool: str | None = None) -> Path:
    """Write the report for the run in ``run_dir`` to ``report``; returns its path. ``pool``: the run's pool YAML,
    whose members (how each was made, pre-training minutes, context use) the report tabulates."""
    run_dir, report = Path(run_dir), Path(report)
    pool_json = json.loads((run_dir / "pool" / "pool.json").read_text())
    members = sorted(pool_json["members"], key=lambda m: m["summary"]["num_layers"])
    deep, shallow = members[-1]["name"], members[0]["name"]
    result = EvalResult.from_dict(json.loads((run_dir / "eval.json").read_text()))
    timing = json.loads((run_dir / "timing.json").read_text())
    job = pool_json.get("job", {})
    trained = tuple(pool_json.get("trained_prefix_len") or (job.get("prefix_len"), job.get("prefix_len")))
    bench_file = run_dir / "bench_handoff.json"
    bench = json.loads(bench_file.read_text()) if bench_file.is_file() else None
    total = sum(stages.values())
    lines = [
        "# Two real families, two tokenizers, one Σ" if any("tokenizer" in m for m in pool_json["members"])
        else "# A real pretrained model in the pool", "",
        f"Generated by `{command}` (code at commit `{commit}`) from the files that run wrote in `{run_dir.name}/`; "
        "do not edit by hand.", "",
        f"* Machine: {machine}.",
        "* Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in stages.items())
        + f"; {total / 60:.1f} min in all." + _pretraining_note(pool),
        f"* Split: every number below is on the **{job.get('eval_split', 'test')}** split; training curves used "
        "validation.", "",
        "## The pool", "",
        "| model | type | layers × KV heads × head dim | vocabulary |", "|---|---|---|---|",
    ]
    for m in pool_json["members"]:
        s = m["summary"]
        lines.append(f"| {m['name']} | {s['model_type']} | {s['num_layers']} × {s['n_kv_heads']} × {s['head_dim']} | "
                     f"{s['vocab_size']} |")
    if pool is not None:
        from kvlingua.paper.report import pool_section

        lines += ["", *pool_section([pool])]
    lines += ["", f"Prefix {job.get('prefix_len')} tokens (trained on {trained[0]}–{trained[1]}), suffix "
              f"{job.get('suffix_len')}, batch {job.get('batch_size')}; spaces: "
              + ", ".join(f"`{n}` ({s.get('adapter')}, {s.get('output', '-')}, Q = {s.get('q_dim')})"
                          for n, s in job.get("spaces", {}).items()) + ".", ""]
    space_cfg = pool_json.get("space", {})
    lines += [f"Method settings of the main space: the target keeps its own first {space_cfg.get('sink_tokens', 0)} "
              f"position(s) (its attention sink; Σ carries the rest), keys travel {space_cfg.get('keys', 'rotated')}, "
              f"adapters start `{space_cfg.get('init', 'random')}`, Σ width Q = {space_cfg.get('q_dim')}. "
              "Content transferred = (control − NLL) / (control − base), where control is the target's own sink "
              "followed by another passage's positions.", ""]
    lines += acceptance_section(result, run_dir, positions, deep, shallow)
    lines += claims_section(result, deep, shallow)
    lines += ["## Final table (test split)", "", result.to_markdown()]
    lines += levers_section(run_dir, deep, shallow)
    lines += continuations_section(run_dir)
    lines += adapters_section(result, timing, deep, shallow)
    lines += curves_section(run_dir, report, deep, shallow)
    lines += positions_section(run_dir, positions, trained, deep, shallow)
    lines += bench_section(bench)
    reverse = run_dir / "bench_handoff_reverse.json"
    lines += bench_section(json.loads(reverse.read_text()) if reverse.is_file() else None)
    lines += context_bytes_section(pool_json, bench)
    lines += sizes_section(Path(shapes_dir))
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
    return report
