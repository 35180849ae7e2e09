"""Meta-training on Ray Train: two gloo ranks, each a shard of the meta-train tasks, one MLflow run."""
import mlflow
import pytest

import workers  # noqa: F401  (Ray environment before ``import ray``)
from kvlingua.config import load_config, parse_override
from kvlingua.modules.conditions import ModulesConfig, prepare
from kvlingua.pool import load_pool
from kvlingua.tracking import open_tracker
from tests.kvlingua.test_modules_cli import build_smoke_pool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("meta_ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("KVLINGUA_HOME", str(root / "home"))  # before Ray starts: the ranks read the same corpus
    over = build_smoke_pool(root)
    cfg = load_config(ModulesConfig, "configs/modules/smoke.yaml",
                      dict(parse_override(v) for v in over[1::2]) | {"meta.train.steps": 3})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root, cfg
    ray.shutdown()
    mp.undo()


def test_two_ranks_meta_train_and_write_the_pool_and_metrics(setup):
    from workers.meta_worker import meta_train_distributed

    root, cfg = setup
    prepare(cfg, lambda _: None, roles=("meta-train",))  # the driver learns the modules once
    tracker = open_tracker(True, None, "modules-test", root / "out", "meta")
    result = meta_train_distributed(cfg, num_workers=2, tracker=tracker, progress=False)
    tracker.close()
    assert result["steps"] == 3 and result["tasks_seen"] == 3 * 4 * 2  # steps x batch x ranks
    meta = load_pool(result["pool"], load_models=False, verify=False)
    start = load_pool(cfg.pool, load_models=False, verify=False)
    assert meta.meta["modules"]["prompt_len"] == cfg.prompt.length
    moved = [k for k, v in meta.space.state_dict().items() if not (v == start.space.state_dict()[k]).all()]
    assert moved  # Σ was meta-trained from the pool's adapters
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'out'}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert any(k.startswith("suffix/seed0_to_seed1") for k in run.data.metrics)  # rank 0 wrote into the run
