"""Shared fixtures for the Ray tests: a small local Ray and a tiny pool saved to disk."""
import os

import pytest

import workers  # noqa: F401  (Ray environment before ``import ray``)
from tests.helpers import tiny_model

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def save_tiny_pool(root) -> dict[str, str]:
    """Two tiny frozen models of different architectures saved as safetensors: name -> dir."""
    models = {"a": tiny_model("gemma2", seed=0), "b": tiny_model("llama", seed=1, layers=3)}
    out = {}
    for name, model in models.items():
        path = root / name
        model.save_pretrained(path, safe_serialization=True)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory):
    return save_tiny_pool(tmp_path_factory.mktemp("pool"))
