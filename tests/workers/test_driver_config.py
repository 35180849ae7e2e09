"""RayConfig: strict loading, checks, and the resources a run reserves (no Ray needed)."""
from types import SimpleNamespace

import pytest

from kvlingua.config import ConfigError, from_dict
from workers.driver import RayConfig, requested_resources


def test_config_checks_and_strict_keys():
    assert from_dict(RayConfig, {"placement": "colocated", "num_workers": 2}).num_workers == 2
    with pytest.raises(ConfigError, match="placement"):
        from_dict(RayConfig, {"placement": "remote"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RayConfig, {"num_worker": 2})
    with pytest.raises(ValueError, match="num_workers"):
        RayConfig(num_workers=0)
    with pytest.raises(ValueError, match="checkpoint_every"):
        RayConfig(checkpoint_every=0)
    opts = RayConfig(host_num_gpus=1.0, host_max_restarts=5, block_dir="/tmp/b").host_options()
    assert (opts.num_gpus, opts.max_restarts, opts.max_task_retries, opts.block_dir) == (1.0, 5, 5, "/tmp/b")


def test_requested_resources_count_hosts_only_when_hosted():
    job = SimpleNamespace(models={"a": "x", "b": "y", "c": "z"})
    hosted = RayConfig(num_workers=2, worker_num_cpus=1.5, host_num_cpus=0.5, host_num_gpus=0.25, use_gpu=True)
    assert requested_resources(job, hosted) == {"CPU": 3 * 0.5 + 2 * 1.5, "GPU": 3 * 0.25 + 2}
    colocated = RayConfig(placement="colocated", num_workers=2, worker_num_cpus=1.5, host_num_cpus=0.5)
    assert requested_resources(job, colocated) == {"CPU": 3.0, "GPU": 0}
