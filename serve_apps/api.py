"""The FastAPI app of the ingress (OpenAPI at ``/docs`` and ``/openapi.json``).

Routes::

    GET  /healthz               liveness: {"status": "ok", "models": [...]}
    GET  /v1/models             pool members with their architecture summaries
    POST /v1/generate           {source, target, prompt, max_new_tokens, temperature, top_p, seed,
                                 handoff, stream}; stream=true answers with server-sent events
    POST /v1/generate/mixed     {prompt, schedule: [{model, max_new_tokens}], temperature, top_p, seed}

Built per replica by :meth:`serve_apps.ingress.PoolIngress.__serve_build_asgi_app__`, so
nothing is created at import. Schema errors are 422 (FastAPI), refused requests 400/404
with ``{"detail": message}``.
"""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from kvlingua import __version__
from serve_apps.ingress import PoolIngress, RequestError
from serve_apps.schemas import GenerateRequest, GenerateResponse, MixedRequest, MixedResponse, ModelList

_ERRORS = {400: {"description": "refused request (prompt too long, identity on mismatched layouts, ...)"},
           404: {"description": "unknown model name"}}


def make_api(ingress: PoolIngress) -> FastAPI:
    """The HTTP API over ``ingress``."""
    app = FastAPI(title="kvlingua", version=__version__,
                  description="Cross-model generation over a pool of frozen LMs sharing a KV latent space.")

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.message})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "models": list(ingress.members)}

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ingress.model_list()

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
    async def generate(req: GenerateRequest):
        prepared = ingress.prepare(req)
        if req.stream:
            return StreamingResponse(ingress.stream(prepared), media_type="text/event-stream")
        return await ingress.generate(prepared)

    @app.post("/v1/generate/mixed", response_model=MixedResponse, responses=_ERRORS)
    async def mixed(req: MixedRequest) -> MixedResponse:
        return await ingress.mixed(req)

    return app
