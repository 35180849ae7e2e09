"""RayConfig: strict loading, checks, nesting, and the resources a run reserves (no Ray needed)."""
import sys

import pytest

from kvlingua.config import ConfigError, from_dict
from workers.config import HostOptions, RayConfig


def test_config_checks_and_strict_keys():
    cfg = from_dict(RayConfig, {"placement": "colocated", "num_workers": 2, "host": {"num_gpus": 1.0, "max_restarts": 5}})
    assert cfg.num_workers == 2 and cfg.host == HostOptions(num_gpus=1.0, max_restarts=5)
    with pytest.raises(ConfigError, match="placement"):
        from_dict(RayConfig, {"placement": "remote"})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(RayConfig, {"num_worker": 2})
    with pytest.raises(ConfigError, match=r"ray.host: unknown key.*host_num_cpus|unknown key"):
        from_dict(RayConfig, {"host": {"host_num_cpus": 1}}, where="ray")
    with pytest.raises(ValueError, match="num_workers"):
        RayConfig(num_workers=0)
    with pytest.raises(ValueError, match="resources"):
        HostOptions(resources={"node2": -1})


def test_requested_resources_count_hosts_only_when_hosted():
    hosted = RayConfig(num_workers=2, worker_num_cpus=1.5, use_gpu=True,
                       host=HostOptions(num_cpus=0.5, num_gpus=0.25, resources={"node2": 1}))
    assert hosted.requested(3) == [("model host", 3, {"CPU": 0.5, "GPU": 0.25, "node2": 1}),
                                   ("Train worker", 2, {"CPU": 1.5, "GPU": 1.0})]
    colocated = RayConfig(placement="colocated", num_workers=2, worker_num_cpus=1.5)
    assert colocated.requested(3) == [("Train worker", 2, {"CPU": 1.5, "GPU": 0.0})]


def test_loading_a_run_config_does_not_import_ray(tmp_path):
    """Reading and validating a run YAML is pure: it must work (and fail) before Ray is imported."""
    import subprocess

    code = ("import sys; from workers.run_config import load_run_config; "
            "load_run_config('configs/quickstart.yaml'); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__file__.rsplit("/tests/", 1)[0])
    assert out.stdout.strip() == "False", out.stderr
