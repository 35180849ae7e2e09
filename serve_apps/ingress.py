"""The HTTP ingress deployment: :class:`~serve_apps.service.PoolService` with the FastAPI app Serve mounts.

``build_app`` (:mod:`serve_apps.app`) wraps :class:`PoolIngress` with ``serve.ingress()``; Serve builds the app per
replica through :meth:`PoolIngress.__serve_build_asgi_app__` (routes in :mod:`serve_apps.api`), so nothing is created
at import. A request's route, hop by hop, is in ``docs/architecture.md`` (*One served request*).
"""
from __future__ import annotations

from serve_apps.service import PoolService


class PoolIngress(PoolService):
    """Serve ingress of a pool (wrapped with ``serve.ingress()``; arguments as :class:`PoolService`)."""

    def __serve_build_asgi_app__(self):
        from serve_apps.api import make_api

        return make_api(self)
