"""Ray Serve deployment of a trained pool: cross-model generation over HTTP.

``build_app(pool_dir, ServeOptions(...))`` (in :mod:`serve_apps.app`) returns a Serve
application: one deployment per pool model (:mod:`serve_apps.model_server`) and a FastAPI
ingress (:mod:`serve_apps.ingress`, routes in :mod:`serve_apps.api`). Nothing starts at
import. Importing this package sets the environment Ray must see before ``import ray``.
"""
import os

os.environ.setdefault("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
