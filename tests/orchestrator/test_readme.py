"""The README's command lines run as written: each ``kvlingua`` line parses, its config loads with its
overrides, and a run it starts fits the machine the README documents (an embedded Ray on 2 cores).

Whole runs are what the quickstart and worker tests exercise; here every line is checked as far as a test
can afford without data or models: argument parsing, strict config loading, the resources it reserves.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from orchestrator.cli import build_parser
from workers.run_config import load_run_config
from tune_spaces.sweep_config import load_sweep_config

REPO = Path(__file__).resolve().parents[2]
MACHINE_CPUS = 2.0  # the machine the README documents: "2 CPU cores"


def readme_commands(program: str) -> list[list[str]]:
    """Every command line of the README's bash blocks that runs ``program`` (comments and continuations
    dropped, ``&&`` chains split), as argv lists without the program name."""
    text = (REPO / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                if part.split()[:1] == [program]:
                    lines.append(shlex.split(part, comments=True)[1:])
    return lines


def overrides_of(argv: list[str]) -> dict[str, str]:
    from kvlingua.config import parse_override

    return dict(parse_override(argv[i + 1]) for i, a in enumerate(argv) if a in ("-o", "--override"))


def test_the_readme_documents_each_command():
    commands = {argv[0] for argv in readme_commands("kvlingua")}
    assert {"quickstart", "data", "pretrain", "train", "eval", "tune", "serve"} <= commands


@pytest.mark.parametrize("argv", readme_commands("kvlingua"), ids=" ".join)
def test_readme_kvlingua_line_parses_and_its_config_loads(argv, monkeypatch):
    monkeypatch.chdir(REPO)
    args = build_parser().parse_args(argv)
    assert callable(args.func)
    config = getattr(args, "config", None)
    if argv[0] == "train":
        cfg = load_run_config(config, overrides_of(argv))
        wants = cfg.ray.requested(2)  # the configs in the README train two-model pools
        cpus = sum(count * each.get("CPU", 0.0) for _, count, each in wants)
        assert cpus <= MACHINE_CPUS, f"{' '.join(argv)} reserves {cpus:g} CPUs; the README's machine has 2"
        assert not any(each.get("GPU") for _, _, each in wants)
    elif argv[0] == "tune":
        sweep = load_sweep_config(config, overrides_of(argv))
        base = load_run_config(sweep.base, sweep.base_overrides)
        host_cpus = 2 * base.ray.host.num_cpus + sweep.trial_cpus
        assert host_cpus <= MACHINE_CPUS
    elif argv[0] == "pretrain":
        from kvlingua.config import load_config
        from kvlingua.pretrain.pools import PoolConfig

        load_config(PoolConfig, config)


def test_the_hosted_example_fits_two_cores_with_the_quickstart_defaults():
    """The README's `-o ray.placement=hosted` example: 2 hosts × 0.25 CPU beside the 1.5-CPU worker."""
    cfg = load_run_config(REPO / "configs" / "quickstart.yaml", {"ray.placement": "hosted", "train.steps": 600})
    assert cfg.ray.placement == "hosted" and cfg.train.steps == 600
    assert cfg.ray.requested(2) == [("model host", 2, {"CPU": 0.25, "GPU": 0.0}),
                                    ("Train worker", 1, {"CPU": 1.5, "GPU": 0.0})]
