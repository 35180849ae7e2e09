"""``build_app(pool_dir, options)``: the Serve application of a trained pool.

One deployment per pool model (``model-<name>``: frozen model + adapters, replicas and
GPUs from :class:`ServeOptions`) and one FastAPI ingress deployment (``ingress``) holding
a handle to each. Run it with ``serve.run(build_app(...), route_prefix="/")``; the
``kvlingua serve`` command does that and blocks until Ctrl-C.
"""
from __future__ import annotations

import serve_apps  # noqa: F401  (sets Ray's environment before ``import ray``)

from pathlib import Path

from ray import serve

from kvlingua.config import to_dict
from kvlingua.pool import LoadedPool, load_pool
from kvlingua.pool_members import verify_models
from serve_apps.ingress import PoolIngress
from serve_apps.model_server import PoolModelServer
from serve_apps.modules import module_library
from serve_apps.options import ServeOptions


def check_pool(pool_dir: str | Path, options: ServeOptions = ServeOptions()) -> LoadedPool:
    """The pool at ``pool_dir`` (adapters, no models), checked as serving needs it, before any deployment.

    With ``options.verify`` every model is loaded once, in turn, to check its weight fingerprint (a
    replica that failed the same check would surface as a failed deployment, not as a clear error).
    ``options.models_root`` says where the models are if they moved since training; the modules of
    ``options.modules_dir`` are checked against the pool. Needs no Ray.

    Raises:
        kvlingua.pool_members.PoolNotFoundError: ``pool_dir`` is not a pool directory, or a file or model is missing.
        kvlingua.pool_members.PoolMismatchError: the pool is damaged or a model checkpoint no longer matches ``pool.json``.
        kvlingua.modules.prompt.ModuleError: a module that cannot be served (see :func:`module_library`).
    """
    pool = load_pool(Path(pool_dir).resolve(), load_models=False, verify=options.verify,
                     models_root=options.models_root)
    if options.verify:
        verify_models(pool.members)
    module_library(pool, options.modules_dir)
    return pool


def build_app(pool_dir: str | Path, options: ServeOptions = ServeOptions(),
              pool: LoadedPool | None = None) -> serve.Application:
    """The Serve application for ``pool_dir``; the pool is checked here (:func:`check_pool`) unless the
    caller already did and passes it, so a bad one fails before deploying."""
    root = Path(pool_dir).resolve()
    pool = pool if pool is not None else check_pool(root, options)
    opts = to_dict(options)
    models = {}
    for m in pool.members:
        deployment = serve.deployment(
            PoolModelServer,
            name=f"model-{m.name}",
            num_replicas=options.num_replicas,
            max_ongoing_requests=options.max_ongoing_requests,
            ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        )
        models[m.name] = deployment.bind(str(root), m.name, opts)
    ingress = serve.deployment(
        serve.ingress()(PoolIngress),
        name="ingress",
        # room above the ingress's own cap, so the cap (503 + Retry-After) answers instead of Serve queueing
        max_ongoing_requests=options.max_pending_requests + 16,
        ray_actor_options={"num_cpus": options.ingress_num_cpus},
    )
    return ingress.bind(str(root), opts, models)
