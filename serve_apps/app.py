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
from kvlingua.pool import load_pool, verify_models
from serve_apps.ingress import PoolIngress
from serve_apps.model_server import PoolModelServer
from serve_apps.options import ServeOptions


def build_app(pool_dir: str | Path, options: ServeOptions = ServeOptions()) -> serve.Application:
    """The Serve application for ``pool_dir``; checks the pool here so a bad one fails before deploying.

    With ``options.verify`` every model is loaded here once, in turn, to check its weight fingerprint
    (a replica that failed the same check would surface as a failed deployment, not as a clear error).
    ``options.models_root`` says where the models are if they moved since training.

    Raises:
        kvlingua.pool.PoolNotFoundError: ``pool_dir`` is not a pool directory, or a file or model is missing.
        kvlingua.pool.PoolMismatchError: the pool is damaged or a model checkpoint no longer matches ``pool.json``.
    """
    root = Path(pool_dir).resolve()
    pool = load_pool(root, load_models=False, verify=options.verify, models_root=options.models_root)
    if options.verify:
        verify_models(pool.members)
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
