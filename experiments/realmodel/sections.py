"""The real-model report's cells and its sections beyond the claims: the closed-form start and the levers, the
training arms at equal wall time, the continuations, the hand-off benchmark, a stored context's bytes, and the
adapter sizes at public shapes. Each reads the run's files only (:mod:`experiments.realmodel.report`)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.toolkit.stats import FAILS, HOLDS, paired_difference, paired_outcome
from kvlingua.eval_result import EvalResult
from kvlingua.paths import path_name
from kvlingua.report import fmt


def _fmt(x: float, digits: int = 3) -> str:
    """:func:`kvlingua.report.fmt` with this report's text for a missing number."""
    return fmt(x, f".{digits}f", missing="n/a")


def series(result: EvalResult, path: tuple[str, str], cond: str) -> list[float]:
    """Per held-out batch NLL of ``cond`` on ``path`` (whole suffix)."""
    return list(result.per_batch["all"][path_name(path)][cond])


def compare(result: EvalResult, path: tuple[str, str], a: str, b: str, relation: str = "le",
            tol: float = 0.0) -> tuple[float, float, str]:
    """``(mean a − b, its standard error, outcome)`` over the held-out batches of ``path``."""
    return paired_outcome(series(result, path, a), series(result, path, b), relation, tol)


def content_cell(result: EvalResult, path, cond: str) -> str:
    s = result.summary_for(path, cond)
    return _fmt(s.content, 2) if not math.isnan(s.content) else f"n/a (gap {s.gap:.3f} ± {s.gap_se:.3f})"


HANDOFF_TARGET = 0.3
"""A 512-token hand-off through Σ should cost at most this share of the target re-reading the text (issue #22)."""


BENCH_FILES = ("bench_handoff.json", "bench_handoff_reverse.json")
"""A run's hand-off measurements, shallow -> deep first (then the reverse, in a pool of two families)."""
REFRESH_BENCH_FILES = ("bench_refresh.json", "bench_refresh_reverse.json")
"""The same, with the ``--refresh`` shares timed too."""


def read_bench(run_dir: Path, name: str) -> dict | None:
    """The hand-off measurement ``name`` of the run (None where that stage did not run)."""
    f = Path(run_dir) / name
    return json.loads(f.read_text()) if f.is_file() else None


def _refresh_flag(cfg: dict) -> str:
    """`` --refresh 0.05 0.1`` where the measurement timed refresh shares (``cfg["refresh"]`` is their tuple's str)."""
    shares = cfg.get("refresh", "()").strip("()").replace(",", " ").split()
    return " --refresh " + " ".join(shares) if shares else ""


def bench_section(bench: dict | None) -> list[str]:
    if bench is None:
        return []
    cfg = bench["config"]
    lines = ["## Hand-off at a real shape", "",
             f"`python bench/bench_handoff.py --pool ... --source {cfg['source']} --target {cfg['target']} --prefix "
             f"{cfg['prefix']} --suffix {cfg['suffix']} --no-variants{_refresh_flag(cfg)}`: the {cfg['prefix']}-token prefix of held-out "
             f"text, already read by {cfg['source']}, reaches {cfg['target']} either by {cfg['target']} re-reading the "
             f"text or through Σ; median of {cfg['repeats']} rounds, {cfg['threads']} thread(s), with "
             f"{cfg['target']}'s suffix NLL after each cache. Target (issue #22): translation ≤ {HANDOFF_TARGET:g}× "
             "re-prefill.", "",
             "| method | ms | × re-prefill | suffix NLL |", "|---|---|---|---|"]
    for r in bench["rows"]:
        lines.append(f"| {r['method']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['suffix_nll']:.3f} |")
    lines += [f"| no prefix (floor) | | | {bench['no_prefix_nll']:.3f} |", ""]
    return lines


CONTEXT_BYTES_TARGET = 0.25
"""A context stored once in Σ should take at most this share of the members' native caches together (issue #22)."""


def context_bytes(pool_json: dict, p: int) -> tuple[int, dict[str, int]]:
    """Bytes of a ``p``-token context stored once in Σ (what the serve context store keeps: keys and values
    ``[1, P-k, Q]``) and of each member's native cache of the same text (``[1, P, L, D]`` keys and values), fp32."""
    space = pool_json.get("space", {})
    q, k = int(space["q_dim"]), int(space.get("sink_tokens", 0))
    native = {m["name"]: 2 * p * m["summary"]["num_layers"] * m["summary"]["n_kv_heads"] * m["summary"]["head_dim"] * 4
              for m in pool_json["members"]}
    return 2 * (p - k) * q * 4, native


def handoff_targets(run_dir: Path, pool_json: dict) -> list[tuple[str, str, bool]]:
    """Acceptance rows of a pool of two families (issue #22) from the hand-off benchmarks: the main space's
    hand-off (with its own refresh) and each timed refresh share ≤ :data:`HANDOFF_TARGET` × re-prefill on both
    targets, and a stored context ≤ :data:`CONTEXT_BYTES_TARGET` × the native caches together."""
    from kvlingua.run import REFRESH_TAG, refreshed_space

    def kinds(bench: dict) -> list[str]:  # the spaces a measurement translated with: "default", "default, refresh 5%"
        return [r["method"].removeprefix("translate (").split(":")[0] for r in bench["rows"]
                if r["method"].startswith("translate (")]

    def ratios(benches: list[dict], kind: str) -> list[float]:  # the translation of ``kind``, each direction
        return [next(r["ratio"] for r in b["rows"] if r["method"].startswith(f"translate ({kind}:")) for b in benches]

    benches = [b for b in (read_bench(run_dir, n) for n in BENCH_FILES) if b is not None]
    if not benches:
        return []
    p = int(benches[0]["config"]["prefix"])
    main = ratios(benches, "default")
    rows = [(f"hand-off through Σ ≤ {HANDOFF_TARGET:g}× re-prefill at {p} tokens on every target",
             " / ".join(f"{r:.2f}×" for r in main), max(main) <= HANDOFF_TARGET)]
    refreshed = [b for b in (read_bench(run_dir, n) for n in REFRESH_BENCH_FILES) if b is not None]
    for kind in (kinds(refreshed[0]) if refreshed else []):
        if refreshed_space(kind) != "default":
            continue
        timed = ratios(refreshed, kind)
        rows.append((f"with refresh {kind.split(REFRESH_TAG)[1]}: hand-off ≤ {HANDOFF_TARGET:g}× re-prefill on every "
                     "target", " / ".join(f"{r:.2f}×" for r in timed), max(timed) <= HANDOFF_TARGET))
    sigma, native = context_bytes(pool_json, p)
    share = sigma / sum(native.values())
    rows.append((f"a stored {p}-token context ≤ {CONTEXT_BYTES_TARGET:g}× the members' native caches together",
                 f"{share:.3f}×", share <= CONTEXT_BYTES_TARGET))
    return rows


def context_bytes_section(pool_json: dict, bench: dict | None) -> list[str]:
    """Bytes of a context stored once in Σ against every member's native cache of the same text
    (:func:`context_bytes`)."""
    if bench is None:
        return []
    p = int(bench["config"]["prefix"])
    space = pool_json.get("space", {})
    q, k = int(space["q_dim"]), int(space.get("sink_tokens", 0))
    sigma, native = context_bytes(pool_json, p)
    lines = ["## A stored context against the native caches", "",
             f"A {p}-token context stored once in Σ (keys and values of its {p - k} positions after the sink, Q = {q}, "
             "fp32, as the serve context store keeps it; each reader computes its own sink) against each member's "
             "own cache of it (fp32), computed from the pool's shapes. Target (issue #22): "
             f"≤ {CONTEXT_BYTES_TARGET:g}× the two native "
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
    from kvlingua.space_config import SpaceConfig

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


def _content(result: EvalResult, path, cond: str = "space") -> float:
    return result.summary_for(path, cond).content


def _lever_results(d: Path) -> tuple[dict[str, EvalResult], dict[str, str], str | None]:
    """A levers directory: file key -> result, file key -> lever name, and the default start's key."""
    res = {f.stem: EvalResult.from_dict(json.loads(f.read_text())) for f in sorted(d.glob("*.json"))
           if f.name != "names.json"}
    names = json.loads((d / "names.json").read_text()) if (d / "names.json").is_file() else {}
    return res, names, next((k for k, n in names.items() if n == "start (closed form)"), None)


def _lever_rows(res: dict[str, EvalResult], names: dict[str, str], start_key: str | None, paths,
                trained: bool = False) -> list[str]:
    """One table row per lever (and the trained space first, with ``trained``): NLL (content) on every path and the
    paired difference against the default start."""
    start = res.get(start_key)
    lines = ["| lever | " + " | ".join(f"{path_name(p)} NLL (content) | − start (± SE)" for p in paths) + " |",
             "|---|" + "---|---|" * len(paths)]
    for key, name in names.items():
        if key not in res or (key == "trained" and not trained):
            continue
        cells, r = [], res[key]
        for path in paths:
            cell = f"{r.summary_for(path, 'space').nll_mean:.3f} ({_fmt(_content(r, path), 2)})"
            if start is not None and key != start_key:
                diff, se = paired_difference(series(r, path, "space"), series(start, path, "space"))
                cells += [cell, f"{diff:+.3f} ± {se:.3f}"]
            else:
                cells += [cell, "—"]
        label = "trained (the run's final space)" if key == "trained" else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def levers_section(run_dir: Path, deep: str, shallow: str) -> list[str]:
    """The closed-form start against the trained space, what each lever buys at the start (``levers/``), the same
    levers at held-out prefixes past training (``levers-P<n>/``), then the training arms."""
    d = run_dir / "levers"
    if not (d / "trained.json").is_file():
        return []
    res, names, start_key = _lever_results(d)
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
        diff, se = paired_difference(series(trained, path, "space"), series(start, path, "space"))
        lines.append(f"| {path_name(path)} | {start.summary_for(path, 'space').nll_mean:.3f} | "
                     f"{_fmt(_content(start, path), 2)} | {trained.summary_for(path, 'space').nll_mean:.3f} | "
                     f"{_fmt(_content(trained, path), 2)} | {diff:+.3f} ± {se:.3f} |")
    lines += ["", "## Levers at the start (test split)", "",
              "Each row changes one setting of the main space against its own start and recomputes the start "
              "(no training: each variant is one calibration and one scoring). `sink_tokens: k` = the target keeps "
              "its own first k positions (its attention sink), `keys: rotated` = keys travel with RoPE, `q_dim` = Σ's "
              "width, `init: match` = the earlier random start rescaled to the target's statistics, `init_batches: n` "
              "= the closed form calibrated on the first n training batches instead of the run's, `refresh: 0` = the "
              "target reads the translation as is (no positions recomputed), `token_prior: 0` = the targets decode "
              "without their token priors (no per-token correction of Σ's output), `token_readout: false` = OUT fitted and "
              "read without the target's own tokens (Σ alone). NLL difference against "
              "the default start on the same rows (paired, ± SE; negative = the lever helps). A row's control keeps "
              "its own sink, so content compares within a row; the NLL difference compares across rows.", "",
              *_lever_rows(res, names, start_key, paths)]
    return lines + ["", *lever_positions_section(run_dir), *arms_section(run_dir)]


def lever_positions_section(run_dir: Path) -> list[str]:
    """The levers again at each held-out prefix length past training (``levers-P<n>/``), shortest first."""
    dirs = sorted((d for d in run_dir.glob("levers-P*") if (d / "trained.json").is_file()),
                  key=lambda d: int(d.name.removeprefix("levers-P")))
    lines = []
    for d in dirs:
        res, names, start_key = _lever_results(d)
        paths = [tuple(p) for p in res["trained"].paths]
        lines += [f"## Levers at held-out prefixes of {d.name.removeprefix('levers-P')} tokens (test split)", "",
                  "The starts of the table above, each calibrated exactly as there (the run's training batches), and "
                  "the trained space, scored on test rows with prefixes of this length: whether any lever carries a "
                  "prefix longer than training's. Paired against the default start on these rows (negative = "
                  "better).", "", *_lever_rows(res, names, start_key, paths, trained=True), ""]
    return lines


def arms_section(run_dir: Path) -> list[str]:
    """The training arms (``arms/``): the main space trained afresh per arm for the same wall time, each against the
    first (the default) on the levers' rows with its hand-off time, which arm the numbers make the default, and the
    fastest hand-off that no path finds worse."""
    d = run_dir / "arms"
    if not (d / "runs.json").is_file():
        return ["Levers that need training (the objective, the stack's shape) train one space each; this run "
                "skipped them (`kvlingua real-model --arm-seconds S`).", ""]
    meta = json.loads((d / "runs.json").read_text())
    runs = meta["runs"]
    res = {n: EvalResult.from_dict(json.loads((d / r["file"]).read_text())) for n, r in runs.items()}
    default = next(iter(runs))
    paths = [tuple(p) for p in res[default].paths]
    directions = list(runs[default].get("handoff", {}))
    lines = ["## Training arms at equal wall time (test split)", "",
             f"Each row trains the main space afresh from its start with one change for {meta['seconds']:g} wall "
             "seconds (evaluations included; the schedule is planned from the measured step cost to end a little "
             "past the budget, so the budget ends every run), keeps its best validation evaluation, and is scored on "
             "the levers' rows. `suffix`: the paper's suffix cross-entropy; `kl`: the mean over suffix tokens of "
             "KL(target after its own cache ‖ target after the translated cache); `recon`: suffix cross-entropy + "
             "the reconstruction loss (weight 1, in Σ's view); `stack: n layers (merge)`: an n-layer stack, each "
             "layer reading one merged group of slices; `short path only`: no stack. NLL difference against "
             f"`{default}` on the same rows (paired, ± SE; negative = the arm helps). Hand-off: the trained arm "
             "carrying a held-out prefix through Σ against the target re-reading it, timed interleaved in the same "
             "run (median), × re-prefill.", "",
             "| arm | steps (schedule) | train s | kept step | "
             + " | ".join(f"{path_name(p)} NLL (content) | − {default} (± SE)" for p in paths)
             + "".join(f" | hand-off {p} (× re-prefill)" for p in directions) + " |",
             "|---|---|---|---|" + "---|---|" * len(paths) + "---|" * len(directions)]
    beats, no_worse = {}, []
    for name, run in runs.items():
        r, cells, wins, worse = res[name], [], [], False
        for path in paths:
            cells.append(f"{r.summary_for(path, 'space').nll_mean:.3f} ({_fmt(_content(r, path), 2)})")
            if name == default:
                cells.append("—")
                continue
            diff, se, oc = paired_outcome(series(r, path, "space"), series(res[default], path, "space"), "le", 0.0)
            cells.append(f"{diff:+.3f} ± {se:.3f}")
            wins.append(diff < 0 and oc == HOLDS)
            worse = worse or oc == FAILS
        cells += [_fmt(run.get("handoff", {}).get(p, math.nan), 2) for p in directions]
        if wins and all(wins):
            beats[name] = sum(r.summary_for(p, "space").nll_mean for p in paths)
        if not worse and directions and all(p in run.get("handoff", {}) for p in directions):
            no_worse.append(name)
        lines.append(f"| {name} | {run['steps']} ({run['schedule_steps']}) | {run['train_s']:.1f} | "
                     f"{run['best_step']} | " + " | ".join(cells) + " |")
    best = min(beats, key=beats.get) if beats else default
    verdict = (f"it beats `{default}` on every path by more than 2 standard errors at equal wall time"
               if best != default else
               "no other arm beats it on every path by more than 2 standard errors at equal wall time")
    lines += ["", f"**Best arm: `{best}`**: {verdict}."]
    if no_worse:
        fastest = min(no_worse, key=lambda n: max(runs[n]["handoff"].values()))
        lines.append(f"**Fastest hand-off no path finds worse than `{default}`** (by more than 2 standard errors): "
                     f"`{fastest}`, " + ", ".join(f"{runs[fastest]['handoff'][p]:.2f}× re-prefill {p}"
                                                  for p in directions) + ".")
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


def _refresh_results(run_dir: Path, positions, split: str = "test") -> dict[int, EvalResult]:
    """``{P: EvalResult}`` of the ``refresh/`` stage on ``split``, at the positions that ran."""
    out = {}
    for p in positions:
        f = Path(run_dir) / "refresh" / f"eval-{split}-P{p}.json"
        if f.is_file():
            out[p] = EvalResult.from_dict(json.loads(f.read_text()))
    return out


def refresh_shares(result: EvalResult) -> list[tuple[str, str]]:
    """``[(space, refreshed condition)]`` of a ``refresh/`` evaluation (:func:`kvlingua.run.refresh_condition`)."""
    from kvlingua.run import refreshed_space

    return [(refreshed_space(c), c) for c in result.conditions if refreshed_space(c) is not None]


def refresh_targets(run_dir: Path, positions, mixed: bool) -> list[tuple[str, str, bool]]:
    """Acceptance rows for each refresh share: every path within 0.05 of its P = 64 content at every P, and, in a
    pool of two families (issue #22), cross paths ≥ 0.9 and cyclic ≥ 0.95 at every P."""
    at = _refresh_results(run_dir, positions)
    if 64 not in at:
        return []
    rows = []
    for space, cond in refresh_shares(at[64]):
        c = {p: {tuple(path): r.summary_for(tuple(path), cond).content for path in r.paths} for p, r in at.items()}
        rows += length_targets(c, f"with {cond.removeprefix(space + ', ')}: ", mixed, cyclic=True)
    return rows


def length_targets(content: dict[int, dict[tuple, float]], label: str, mixed: bool,
                   cyclic: bool) -> list[tuple[str, str, bool]]:
    """Acceptance rows ``(target, measured, met)`` over ``content`` ``{P: {path: content}}`` (P = 64 among them):
    every path within 0.05 of its P = 64 content at every P (where there is more than one P); with ``mixed`` (two
    families, issue #22) both cross paths ≥ 0.9, and with ``cyclic`` both cyclic paths ≥ 0.95, at every P. Each
    target is prefixed by ``label``."""
    rows = []
    if len(content) > 1:
        worst = min(content[p][path] - content[64][path] for p in content for path in content[p])
        rows.append((f"{label}every path within 0.05 of its P = 64 content at every P", f"worst {worst:+.2f}",
                     worst >= -0.05))
    if mixed:
        cross = min(v for row in content.values() for path, v in row.items() if path[0] != path[1])
        rows.append((f"{label}both cross paths ≥ 0.9 at every P", f"lowest {cross:.2f}", cross >= 0.9))
        if cyclic:
            low = min(v for row in content.values() for path, v in row.items() if path[0] == path[1])
            rows.append((f"{label}both cyclic paths ≥ 0.95 at every P", f"lowest {low:.2f}", low >= 0.95))
    return rows


def refresh_section(run_dir: Path, positions, own: float = 0.0) -> list[str]:
    """The trained pool read with each refresh share at every prefix length, paired with it as it records itself
    (``own``: its space's refresh share): on validation (where the default share is chosen), then on test."""
    lines = []
    for split in ("validation", "test"):
        at = _refresh_results(run_dir, positions, split)
        if at:
            lines += _refresh_table(at, split, own)
    if not lines:
        return []
    recorded = ("the same cache without a refresh" if not own else
                f"the pool as it records itself (its own refresh, {own:.0%}; `refresh 0%` reads the translation as is)")
    lines = ["## Refresh: the target re-reads the positions it leans on", "",
             "After the translation, the target recomputes its own keys and values at a share of the translated "
             "positions after its sink: the ones its first suffix token (read, never scored) attends to most in the "
             "translated cache, each reading its own token there after the translated positions before it, in one "
             "forward (`refresh` in the space config; `kvlingua/refresh.py`). The default share is chosen on the "
             "validation table; the test table reports it. Each cell: content, then the paired NLL difference against "
             f"{recorded} (± SE over the batches; negative = the cell's share helps).", "", *lines]
    for name in REFRESH_BENCH_FILES:
        lines += bench_section(read_bench(run_dir, name))
    return lines


def _refresh_table(at: dict[int, EvalResult], split: str, own: float) -> list[str]:
    pairs = refresh_shares(next(iter(at.values())))
    recorded = "translated" if not own else f"as recorded (refresh {own:.0%})"
    lines = [f"### {split.capitalize()} split", "",
             f"| P | path | {recorded} | " + " | ".join(c.removeprefix(s + ", ") for s, c in pairs) + " | batches |",
             "|---|---|---|" + "---|" * len(pairs) + "---|"]
    for p, result in at.items():
        for path in result.paths:
            cells = []
            for space, cond in refresh_shares(result):
                diff, se, _ = compare(result, path, cond, space)
                cells.append(f"{content_cell(result, path, cond)} ({diff:+.3f} ± {se:.3f})")
            space = pairs[0][0]
            lines.append(f"| {p} | {path_name(path)} | {content_cell(result, path, space)} | " + " | ".join(cells)
                         + f" | {result.num_batches} |")
    return lines + [""]
