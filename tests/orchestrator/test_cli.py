"""The `kvlingua` command line: help on every subcommand, clear errors for bad configs."""
import subprocess
import sys

import pytest

from orchestrator.cli import COMMANDS, build_parser, main

ROOT_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: kvlingua " + name in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "quickstart" in out.stdout


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", r"unknown key\(s\) \['stepz'\]"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("ray.placement=everywhere", "placement"),
        ("prefix_len=0", "prefix_len"),
        ("spaces.translator.q_dim=33", r"q_dim=33 is not divisible by the layer count of seed0 \(L=2\)"),
        ("pool_members=[seed0, nobody]", r"pool_members: \['nobody'\] not in pool"),
        ("space_steps={lineer: 5}", r"space_steps: 'lineer' is not one of the spaces"),
        ("space_steps={linear: 0}", r"space_steps.linear must be a positive integer"),
    ],
)
def test_bad_run_config_is_refused_before_compute(override, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("KVLINGUA_HOME", str(tmp_path / "home"))  # nothing may be built there
    code = main(["train", str(ROOT_CONFIGS / "quickstart-smoke.yaml"), "-o", override])
    assert code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "home").exists()


def test_missing_files_are_named(capsys, tmp_path):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"name: x\nmodels: {{a: {tmp_path / 'missing-model'}}}\ntrain: {{steps: 1}}\n")
    assert main(["train", str(cfg)]) == 2
    assert "models.a: checkpoint directory not found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no pool.json" in capsys.readouterr().err


def test_pool_and_models_are_exclusive(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: x\ntrain: {steps: 1}\n")
    assert main(["train", str(cfg)]) == 2
    assert "exactly one of `pool`" in capsys.readouterr().err


def test_a_multi_line_error_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("name: x\ntrain: {steps: 1\n")  # the YAML parser's message spans several lines
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"kvlingua train: error: {cfg}: not valid YAML")


def test_known_errors_share_one_base_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from kvlingua.cache import CacheAPIError
    from kvlingua.config import ConfigError, KvlinguaError
    from kvlingua.data.corpus import CorpusError
    from kvlingua.pool_members import PoolMismatchError, PoolNotFoundError

    known = (ConfigError, PoolMismatchError, PoolNotFoundError, CacheAPIError, CorpusError)
    assert all(issubclass(cls, KvlinguaError) for cls in known)
    import orchestrator.commands.eval as eval_cmd

    for raised, code in ((CorpusError("/data/corpus: truncated"), 2), (RuntimeError("a bug"), None)):
        def fail(args, raised=raised):
            raise raised

        monkeypatch.setattr(eval_cmd, "run", fail)
        if code is None:
            with pytest.raises(RuntimeError, match="a bug"):
                main(["eval", "somewhere"])
        else:
            assert main(["eval", "somewhere"]) == code
            assert capsys.readouterr().err == "kvlingua eval: error: /data/corpus: truncated\n"
