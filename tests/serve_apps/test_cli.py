"""``kvlingua serve``: argument parsing and refusals that need no Ray."""
from __future__ import annotations

from orchestrator.cli import build_parser, main


def test_serve_defaults_bind_loopback(tmp_path):
    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert (args.host, args.port, args.replicas, args.num_gpus) == ("127.0.0.1", 8000, 1, 0.0)
    assert build_parser().parse_args(["serve", str(tmp_path), "--replicas", "3", "--port", "9001"]).replicas == 3
    assert args.models_root is None
    assert build_parser().parse_args(["serve", str(tmp_path), "--models-root", "/m"]).models_root == "/m"


def test_serve_refuses_a_directory_without_pool_json(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "not a pool directory (no pool.json)" in capsys.readouterr().err


def test_serve_refuses_bad_options(tmp_path, capsys):
    (tmp_path / "pool.json").write_text("{}")
    assert main(["serve", str(tmp_path), "--replicas", "0"]) == 2
    assert "num_replicas must be an integer >= 1" in capsys.readouterr().err


def test_serve_refuses_a_missing_modules_directory_in_one_line(pool_dir, tmp_path, capsys):
    assert main(["serve", str(pool_dir), "--modules", str(tmp_path / "none")]) == 2
    # Ray forwards the package's shared Serve replicas' logs to this process's stderr: keep only our own lines
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "(ServeReplica" not in line]
    assert len(err) == 1 and "module directory not found" in err[0], err
    assert "Traceback" not in "\n".join(err)
