"""One Ray and one Serve instance for every live-server test of this directory (package scope).

``server`` is the pool app at ``/`` (an ``httpx.Client``); ``serve_url`` its base URL. Other
tests deploy further small apps under their own route prefix on the same Serve instance.
"""
from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import serve_apps  # noqa: E402,F401  (Ray's environment before ``import ray``)

from tests.serve_apps.tiny_pool import build_tiny_pool, learn_tiny_module  # noqa: E402

LIMITS = dict(max_prompt_tokens=64, max_new_tokens=64)
MODULE = "cat/moon"
"""The one module the pool app serves, learned on model ``a``."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def pool_dir(tmp_path_factory):
    return build_tiny_pool(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="package")
def modules_dir(pool_dir, tmp_path_factory):
    """A directory with one module (:data:`MODULE`), learned on model ``a`` in a few steps."""
    return learn_tiny_module(pool_dir, tmp_path_factory.mktemp("modules"), model="a", name=MODULE)


METRICS_PORT: dict[str, int] = {}
"""Port of Ray's Prometheus metrics export of the package's Ray (set by :func:`serve_url`)."""


@pytest.fixture(scope="package")
def serve_url():
    """A Ray (2 CPUs) and Serve on a free loopback port for the whole package; shut down afterwards.

    Ray exports application metrics on its own Prometheus port (:data:`METRICS_PORT`), reported every second."""
    ray = pytest.importorskip("ray")
    from ray import serve

    METRICS_PORT["port"] = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=METRICS_PORT["port"],
             _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="package")
def server(serve_url, pool_dir, modules_dir):
    """An httpx client of the tiny pool's app served at ``/``, with the modules of ``modules_dir``."""
    httpx = pytest.importorskip("httpx")
    from ray import serve

    from serve_apps.app import build_app
    from serve_apps.options import ServeOptions

    opts = ServeOptions(num_cpus=0.25, request_timeout_s=60, modules_dir=str(modules_dir), **LIMITS)
    serve.run(build_app(pool_dir, opts), name="kvlingua", route_prefix="/")
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        yield client
