"""``kvlingua real-model``: a pool with a real pretrained model, end to end, into one generated report.

Runs, each stage skipped when its output exists (so an interrupted run resumes):

1. ``train`` — the run config (default ``configs/real.yaml``) through :func:`experiments.training.train_run`,
   on Ray unless in process: the pool is fetched/pre-trained first, every space trains, the final table is on
   the test split;
2. ``positions`` — the trained pool re-scored at each prefix length (:func:`kvlingua.run.evaluate_pool_dir`);
3. ``levers`` — each lever's start against the trained space (:func:`experiments.realmodel.levers.lever_starts`),
   again at each of ``lever_positions`` (``levers-P<n>/``: held-out prefixes of that length, the same starts),
   and, with ``arm_seconds``, ``arms``: the main space trained afresh for that many wall seconds per training arm
   (an objective, a stack shape; :class:`experiments.realmodel.arms.ArmTrainer`), each arm's hand-off timed,
   and at each of ``sinks`` the sink study (``sinks-P<n>/``, :mod:`experiments.realmodel.sinks`): which positions
   the target's suffix attends to, and what restoring its own keys, values or most-attended positions buys;
4. ``continuations`` — held-out prompts continued by the deep model after the shallow one's cache;
5. ``bench`` — :func:`experiments.realmodel.handoff.measure_handoff` on the trained pool: translating a
   ``bench_prefix``-token cache from the shallow model into the deep one against the deep one re-reading the
   text (both ways when the members tokenize differently);
6. with ``refresh`` shares, ``refresh`` — the trained pool at every prefix length read with each share
   (:mod:`kvlingua.refresh`), paired with the space as trained, on validation (where a share is chosen) and on
   test, and the hand-off timed with it;

then :meth:`RealModel.write_report` writes the report from those files only
(:func:`experiments.realmodel.report.write_real_model_report`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.realmodel.arms import DEFAULT_ARMS
from experiments.realmodel.report import ReportRun, write_real_model_report
from experiments.realmodel.sections import BENCH_FILES, REFRESH_BENCH_FILES
from experiments.realmodel.sinks import ATTENTION_FILE, write_sink_study
from experiments.toolkit.pools import deep_and_shallow
from experiments.toolkit.provenance import commit
from experiments.training import Placement, train_run

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "real.yaml"
SHAPES = REPO / "configs" / "shapes"
STAGES_FILE = "real_model_stages.json"
COMMITS_FILE = "real_model_commits.json"
"""Stage name -> the commit its code ran at (a run resumed at a later commit runs its later stages there)."""
"""Wall seconds of each finished stage, kept beside the run so a resumed run reports every stage."""
LEVER_BATCHES = 4
"""Held-out batches of the levers and arms stages: each variant is a calibration and a scoring."""


@dataclass(frozen=True)
class RealModelConfig:
    """What ``kvlingua real-model`` was asked (its flags)."""

    config: Path = DEFAULT_CONFIG
    """The run YAML."""
    overrides: tuple[str, ...] = ()
    """``-o key=value`` overrides of the run YAML."""
    positions: tuple[int, ...] = (16, 64, 256, 512)
    """Prefix lengths of the position table."""
    bench_prefix: int = 512
    """Prefix tokens of the hand-off benchmark."""
    bench_repeats: int = 5
    """Timed rounds of the hand-off benchmark."""
    arm_seconds: float = 0.0
    """Wall seconds per training arm (0: skip the arms stage)."""
    arms: tuple[str, ...] | None = None
    """The training arms (None: ``arms.DEFAULT_ARMS``, the objectives); the first is the default the rest pair
    against."""
    levers: tuple[str, ...] | None = None
    """The levers to score at the start (None: all of ``levers.DEFAULT_LEVERS``)."""
    lever_positions: tuple[int, ...] = ()
    """Held-out prefix lengths at which the levers are scored again (each start still calibrated on the run's
    training batches): which lever, if any, carries a prefix past the trained lengths."""
    refresh: tuple[float, ...] = ()
    """Refresh shares (:mod:`kvlingua.refresh`) at which the trained pool is scored again at every prefix length
    (``refresh/``, paired with the space as the pool records it, its own share included) and its hand-off timed
    (``bench_refresh*.json``); 0 reads the translation as is (what a pool's default refresh buys)."""
    sinks: tuple[int, ...] = ()
    """Held-out prefix lengths of the sink study (``sinks-P<n>/``, :mod:`experiments.realmodel.sinks`): where a
    long prefix's content is lost, by the target's attention."""
    placement: Placement = Placement()

    def __post_init__(self) -> None:
        from kvlingua.config import ConfigError

        if (any(p < 1 for p in (*self.positions, *self.lever_positions, *self.sinks)) or self.bench_prefix < 1
                or self.bench_repeats < 1):
            raise ConfigError("--positions, --lever-positions, --sinks, --bench-prefix and --bench-repeats must be "
                              "positive")
        if any(not 0 <= r <= 1 for r in self.refresh):
            raise ConfigError(f"--refresh shares must lie in [0, 1] (0: the space read without a refresh), "
                              f"got {list(self.refresh)}")
        if self.levers is not None:
            from experiments.realmodel.levers import DEFAULT_LEVERS

            unknown = [n for n in self.levers if n not in DEFAULT_LEVERS]
            if unknown:
                raise ConfigError(f"--levers: unknown lever(s) {unknown}; known: {list(DEFAULT_LEVERS)}")
        if self.arm_seconds < 0:
            raise ConfigError("--arm-seconds must be >= 0 (0: skip the arms stage)")
        if self.arms is not None:
            from experiments.realmodel.arms import check_arms

            try:
                check_arms(self.arms)
            except ValueError as e:
                raise ConfigError(f"--arms: {e}") from None

    @property
    def command(self) -> str:
        """The command line the report names."""
        command = "kvlingua real-model" + (f" {self.config}" if Path(self.config).resolve() != DEFAULT_CONFIG else "")
        command += "".join(f" -o {o}" for o in self.overrides) + (" --in-process" if self.placement.in_process else "")
        command += f" --arm-seconds {self.arm_seconds:g}" if self.arm_seconds > 0 else ""
        command += " --arms " + " ".join(f"'{n}'" for n in self.arms) if self.arms and self.arm_seconds > 0 else ""
        command += " --levers " + " ".join(f"'{n}'" for n in self.levers) if self.levers else ""
        command += " --lever-positions " + " ".join(map(str, self.lever_positions)) if self.lever_positions else ""
        command += " --sinks " + " ".join(map(str, self.sinks)) if self.sinks else ""
        command += " --refresh " + " ".join(f"{r:g}" for r in self.refresh) if self.refresh else ""
        return command


@dataclass(frozen=True)
class RealModel:
    """``kvlingua real-model``: a config → its stages → the run directory → the report."""

    cfg: RealModelConfig

    def run_config(self):
        from kvlingua.config import parse_override
        from workers.run_config import load_run_config

        return load_run_config(self.cfg.config, dict(parse_override(o) for o in self.cfg.overrides))

    def run(self) -> Path:
        """Every stage whose files are missing; returns the run directory."""
        from kvlingua.run import evaluate_pool_dir
        from workers.run_config import run_dir_of

        cfg = self.run_config()
        run_dir = run_dir_of(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        stage = _Stages(run_dir)
        if not ((run_dir / "eval.json").is_file() and (run_dir / "pool" / "pool.json").is_file()):
            with stage("train", f"train: {self.cfg.config} -> {run_dir}"):
                train_run(cfg, self.cfg.placement)
        positions_dir = run_dir / "positions"
        positions_dir.mkdir(exist_ok=True)
        for p in self.cfg.positions:
            out = positions_dir / f"eval-test-P{p}.json"
            if not out.is_file():
                with stage(f"positions P={p}", f"positions: P = {p}"):
                    evaluate_pool_dir(run_dir, split="test", prefix_len=p, fit_batches=True)[0].to_json(out)
        record_held_prefix(run_dir, positions_dir, self.cfg.positions)
        for p in (None, *self.cfg.lever_positions):  # the run's own held-out prefixes, then each longer length
            name, out = ("levers", "levers") if p is None else (f"levers P={p}", f"levers-P{p}")
            if _missing_levers(run_dir / out, self.cfg.levers):
                with stage(name, f"levers: each lever's closed-form start ({'the run' if p is None else p} prefix)",
                           adds=True):
                    _levers(run_dir, run_dir / out, self.cfg.levers, prefix_len=p)
        for p in self.cfg.sinks:
            if not (run_dir / f"sinks-P{p}" / ATTENTION_FILE).is_file():
                with stage(f"sinks P={p}", f"sinks: where a {p}-token prefix's content goes"):
                    write_sink_study(run_dir, run_dir / f"sinks-P{p}", p, LEVER_BATCHES)
        if self.cfg.refresh:
            (run_dir / "refresh").mkdir(exist_ok=True)
        for split in ("validation", "test") if self.cfg.refresh else ():  # validation chooses a share; test reports
            for p in self.cfg.positions:
                out = run_dir / "refresh" / f"eval-{split}-P{p}.json"
                if not _has_refresh(out, self.cfg.refresh):
                    with stage(f"refresh {split} P={p}", f"refresh: {split}, P = {p}, shares {list(self.cfg.refresh)}"):
                        evaluate_pool_dir(run_dir, split=split, prefix_len=p, fit_batches=True,
                                          refresh=self.cfg.refresh)[0].to_json(out)
        pool_json = json.loads((run_dir / "pool" / "pool.json").read_text())
        deep, shallow = deep_and_shallow(pool_json["members"])
        # both ways where the members tokenize differently (two real families), else the shallow model into the deep one
        mixed = any("tokenizer" in m for m in pool_json["members"])
        directions = [(shallow, deep)] + ([(deep, shallow)] if mixed else [])
        arms = self.cfg.arms or DEFAULT_ARMS
        done = _arms_meta(run_dir / "arms", self.cfg.arm_seconds)["runs"]
        if self.cfg.arm_seconds > 0 and not set(arms) <= set(done):
            with stage("arms", f"arms: the main space trained {self.cfg.arm_seconds:g} s per arm", adds=True):
                self._arms(run_dir, arms, directions, cfg)
        if not (run_dir / "continuations.json").is_file():
            with stage("continuations", f"continuations: {shallow} -> {deep}, latent and text"):
                _continuations(run_dir, shallow, deep)
        for (source, target), name in zip(directions, BENCH_FILES):
            if not (run_dir / name).is_file():
                label = "bench" if name == BENCH_FILES[0] else f"bench {source} -> {target}"
                with stage(label, f"bench: {source} -> {target}, {self.cfg.bench_prefix}-token prefix"):
                    self._bench(run_dir, source, target, cfg, run_dir / name)
        for (source, target), name in zip(directions, REFRESH_BENCH_FILES):
            if self.cfg.refresh and not _has_rows(run_dir / name, self.cfg.refresh):
                with stage(f"bench refresh {source} -> {target}", f"bench: {source} -> {target} with refresh"):
                    self._bench(run_dir, source, target, cfg, run_dir / name, self.cfg.refresh)
        return run_dir

    def write_report(self, report: Path) -> Path:
        """The report from the run directory's files only."""
        from experiments.toolkit.provenance import machine
        from workers.run_config import run_dir_of

        cfg = self.run_config()
        run_dir = run_dir_of(cfg)
        stages = _Stages(run_dir)
        return write_real_model_report(run_dir, report, ReportRun(
            command=self.cfg.command, positions=self.cfg.positions, shapes_dir=SHAPES, machine=machine(),
            stages=stages.read(), commit=commit(), pool=cfg.pool, stage_commits=stages.read_commits()))

    def _arms(self, run_dir: Path, arms: tuple[str, ...], directions: list[tuple[str, str]], cfg) -> None:
        """``arms/<file>`` per arm (:func:`~experiments.realmodel.arms.arm_file`; scored on the levers' held-out
        batches) and ``arms/runs.json``: the budget, and per arm its steps, schedule, train seconds, kept step and
        hand-off (translate / re-prefill at ``bench_prefix`` tokens, per direction). Each arm is written as it
        ends, so a stopped stage resumes at the next arm."""
        from experiments.realmodel.arms import ArmTrainer, arm_file
        from experiments.realmodel.handoff import handoff_inputs, time_handoff
        from kvlingua.paths import path_name

        out = run_dir / "arms"
        out.mkdir(exist_ok=True)
        meta_file, meta = out / "runs.json", _arms_meta(out, self.cfg.arm_seconds)
        trainer = ArmTrainer(run_dir, batches=LEVER_BATCHES, progress=self.cfg.placement.progress)
        pool, text = trainer.loaded, _bench_text(run_dir / "bench_text.txt")
        tokenizers = pool.tokenizers if pool.mixed_tokenizers else None
        inputs = {d: handoff_inputs(pool.models, pool.tokenizer, tokenizers, *d, text, self.cfg.bench_prefix,
                                    cfg.suffix_len, 1) for d in directions}
        for name in arms:
            if name in meta["runs"]:
                continue
            print(f"[real-model] arm {name!r}", flush=True)
            run = trainer.run(name, self.cfg.arm_seconds)
            run.result.to_json(out / arm_file(name))
            handoff = {}
            for (source, target), ids in inputs.items():
                secs, _ = time_handoff(pool.models, {name: run.space}, source, target, ids, self.cfg.bench_repeats)
                handoff[path_name((source, target))] = round(secs[name] / secs["prefill"], 4)
            meta["runs"][name] = {"file": arm_file(name), "steps": run.steps, "schedule_steps": run.schedule_steps,
                                  "train_s": round(run.train_s, 1), "best_step": run.best_step, "handoff": handoff}
            order = [n for n in arms if n in meta["runs"]] + [n for n in meta["runs"] if n not in arms]
            meta["runs"] = {n: meta["runs"][n] for n in order}  # the first asked is the default the rest pair with
            meta_file.write_text(json.dumps(meta, indent=1) + "\n")

    def _bench(self, run_dir: Path, source: str, target: str, cfg, out: Path, refresh: tuple[float, ...] = ()) -> None:
        from experiments.realmodel.handoff import HandoffConfig, handoff_lines, measure_handoff

        measured = measure_handoff(HandoffConfig(
            pool=run_dir / "pool", source=source, target=target, text=_bench_text(run_dir / "bench_text.txt"),
            prefix=self.cfg.bench_prefix, suffix=cfg.suffix_len, repeats=self.cfg.bench_repeats,
            threads=cfg.ray.torch_threads or 2, no_variants=True, json=out, refresh=refresh))
        print("\n".join(handoff_lines(measured)), flush=True)


class _Stages:
    """The stages file of a run directory: ``with stages(name, what):`` prints, times and records one stage."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / STAGES_FILE
        self.commits_file = run_dir / COMMITS_FILE

    def read(self) -> dict:
        return json.loads(self.file.read_text()) if self.file.is_file() else {}

    def read_commits(self) -> dict:
        """Stage name -> the commit it ran at (stages of runs older than this record are absent)."""
        return json.loads(self.commits_file.read_text()) if self.commits_file.is_file() else {}

    def __call__(self, name: str, what: str, adds: bool = False):
        """Time stage ``name``; ``adds``: a stage that resumes in parts (the arms) adds each part's seconds to what
        its earlier parts recorded, instead of replacing them."""
        from contextlib import contextmanager

        @contextmanager
        def timed():
            print(f"[real-model] {what}", flush=True)
            start = time.perf_counter()
            yield
            stages = self.read()
            stages[name] = round(time.perf_counter() - start + (stages.get(name, 0.0) if adds else 0.0), 1)
            self.file.write_text(json.dumps(stages, indent=1) + "\n")
            commits = self.read_commits()
            commits[name] = commit()
            self.commits_file.write_text(json.dumps(commits, indent=1) + "\n")

        return timed()


def _bench_text(path: Path, split: str = "test") -> Path:
    """The held-out split's English text in one file (the benchmark's real prefix and suffix), written once per
    run directory (the arms and the bench stage read the same)."""
    from kvlingua.data.views import DataConfig, documents

    if not path.is_file():
        path.write_text("\n".join(documents(DataConfig(view="en"), split)))
    return path


def record_held_prefix(run_dir: Path, positions_dir: Path, positions, tol: float = 0.05) -> None:
    """Write ``held_prefix_len`` into each pool's ``pool.json``: the longest prefix of the position grid up to which
    every path of the main space keeps its content within ``tol`` of its content at the trained top. Serving then
    hands over latents up to that length (a pool with un-rotated keys has no other position limit)."""
    from kvlingua.eval_result import EvalResult
    from kvlingua.pool import POOL_FILE
    from kvlingua.rundir import main_space, read_run_pools

    pools = read_run_pools(run_dir)
    meta = json.loads((pools[main_space(pools)] / POOL_FILE).read_text())
    top = meta.get("trained_prefix_len", [None, None])[1]
    files = {p: positions_dir / f"eval-test-P{p}.json" for p in sorted(positions)}
    if top not in files or not all(f.is_file() for f in files.values()):
        return
    results = {p: EvalResult.from_dict(json.loads(f.read_text())) for p, f in files.items()}
    space = main_space(pools)
    ref = {path: results[top].summary_for(path, space).content for path in results[top].paths}
    held = None
    for p, r in results.items():
        if p > top and any(r.summary_for(path, space).content < ref[path] - tol for path in r.paths):
            break
        held = p
    for d in pools.values():
        m = json.loads((d / POOL_FILE).read_text())
        if m.get("held_prefix_len", "unset") != held:  # a rerun leaves the file as it is
            m["held_prefix_len"] = held
            (d / POOL_FILE).write_text(json.dumps(m, indent=2) + "\n")


def _has_refresh(out: Path, shares: tuple[float, ...]) -> bool:
    """Whether ``out`` (a ``refresh/`` evaluation) holds every share's condition."""
    from kvlingua.eval_result import EvalResult

    if not out.is_file():
        return False
    from kvlingua.run import refresh_condition

    conditions = EvalResult.from_dict(json.loads(out.read_text())).conditions
    return all(any(c.endswith(refresh_condition("", r)) for c in conditions) for r in shares)


def _has_rows(bench: Path, shares: tuple[float, ...]) -> bool:
    """Whether the hand-off measurement ``bench`` timed every refresh share."""
    if not bench.is_file():
        return False
    from kvlingua.run import refresh_condition

    methods = [r["method"] for r in json.loads(bench.read_text())["rows"]]
    return all(any(refresh_condition("default", r) in m for m in methods) for r in shares)


def _missing_levers(out: Path, names: tuple[str, ...] | None) -> list[str]:
    """The levers of ``names`` (None: every lever of ``levers.DEFAULT_LEVERS``) that ``out`` has not scored yet, and
    ``trained`` when the trained space's result is missing."""
    from experiments.realmodel.levers import DEFAULT_LEVERS

    have = set(json.loads((out / "names.json").read_text()).values()) if (out / "names.json").is_file() else set()
    return ([n for n in (names or tuple(DEFAULT_LEVERS)) if n not in have]
            + ([] if (out / "trained.json").is_file() else ["trained"]))


def _levers(run_dir: Path, out: Path, names: tuple[str, ...] | None = None, prefix_len: int | None = None) -> None:
    """``out/<k>.json`` per lever (:func:`~experiments.realmodel.levers.lever_starts`, held-out prefixes of
    ``prefix_len`` tokens, default the run's) and ``names.json`` (file key -> name; a lever that does not apply to the
    run, e.g. more sink positions than its shortest prefix, has a key and no file). Levers scored before keep their
    files: a rerun that asks for more levers scores only the new ones."""
    from experiments.realmodel.levers import DEFAULT_LEVERS, lever_starts

    out.mkdir(exist_ok=True)
    missing = _missing_levers(out, names)
    todo = {n: DEFAULT_LEVERS[n] for n in missing if n != "trained"}
    results = lever_starts(run_dir, todo, batches=LEVER_BATCHES, prefix_len=prefix_len, trained="trained" in missing)
    keys = json.loads((out / "names.json").read_text()) if (out / "names.json").is_file() else {}
    for name in [n for n in ("trained",) if n in results] + list(todo):
        key = "trained" if name == "trained" else f"lever{next(i for i in range(len(keys) + 1) if f'lever{i}' not in keys)}"
        if name in results:
            results[name].to_json(out / f"{key}.json")
        keys[key] = name
    (out / "names.json").write_text(json.dumps(keys, indent=1) + "\n")


def _arms_meta(out: Path, seconds: float) -> dict:
    """``out/runs.json`` at this budget with only the arms whose results file is there (another budget's arms do
    not pair with these: none); ``{"seconds", "runs": {name: record}}``."""
    f = out / "runs.json"
    meta = json.loads(f.read_text()) if f.is_file() else {}
    if meta.get("seconds") != seconds:
        return {"seconds": seconds, "runs": {}}
    meta["runs"] = {n: r for n, r in meta["runs"].items() if (out / r.get("file", "")).is_file()}
    return meta


def _continuations(run_dir: Path, source: str, target: str, n: int = 3, prompt_tokens: int = 48,
                   max_new_tokens: int = 32) -> None:
    """Greedy continuations of ``n`` held-out prompts: ``target`` after ``source``'s cache through Σ, and after
    re-reading the text (``continuations.json``; :func:`kvlingua.crosstext.continuations`)."""
    from kvlingua.crosstext import continuations
    from kvlingua.pool import load_pool

    rows = continuations(load_pool(run_dir / "pool"), source, target, n, prompt_tokens, max_new_tokens)
    (run_dir / "continuations.json").write_text(json.dumps(
        {"source": source, "target": target, "max_new_tokens": max_new_tokens, "rows": rows}, indent=1) + "\n")
