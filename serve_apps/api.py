"""The FastAPI app of the ingress (OpenAPI at ``/docs`` and ``/openapi.json``).

Routes::

    GET    /healthz                  each model's replica state; 200 when all run, else 503
    GET    /metrics                  Prometheus text (also exported through Ray's metrics endpoint)
    GET    /v1/models                OpenAI list shape: {"object": "list", "data": [{"id", "object": "model", ...}]}
    GET    /v1/pool                  pool members with their architecture summaries (was /v1/models)
    POST   /v1/completions           OpenAI-compatible (see serve_apps.openai_api)
    POST   /v1/chat/completions      OpenAI-compatible
    POST   /tokenize, /detokenize    vLLM's tokenizer routes (the pool's tokenizer, or member ``model``'s where
                                      members tokenize differently); GET /tokenizer_info
    GET    /v1/modules               served modules (soft prompts), each with the model it was learned on
    POST   /v1/contexts              {model, text | tokens} -> a context stored once in Σ
    GET    /v1/contexts              stored contexts, most recently used first
    GET    /v1/contexts/{id}         one stored context
    DELETE /v1/contexts/{id}         forget it
    POST   /v1/generate              {source, target, prompt, max_new_tokens, temperature, top_p, seed, handoff,
                                      stream, strict, context_id, handoff_tokens, use_store, module}
    POST   /v1/generate/mixed        {prompt, schedule: [{model, max_new_tokens}], temperature, top_p, seed}

Built per replica by :meth:`serve_apps.ingress.PoolIngress.__serve_build_asgi_app__`, so
nothing is created at import; the handlers call the public methods of the
:class:`~serve_apps.service.PoolService` parts. Errors: the kvlingua routes answer ``{"detail": message}``
(schema errors 422, refusals 400/404); the OpenAI-compatible and context routes answer
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` (schema errors 400).
Every request beyond ``max_pending_requests`` gets 503 with ``Retry-After``; bodies over
:func:`max_body_bytes` get 413.
"""
from __future__ import annotations

import json
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from kvlingua import __version__
from serve_apps.openai_api import add_openai_routes, is_openai_path
from serve_apps.requests import RequestError
from serve_apps.schemas import GenerateRequest, GenerateResponse, MixedRequest, MixedResponse, ModelList
from serve_apps.service import PoolService
from serve_apps.tokenizer_routes import add_tokenizer_routes

_ERRORS = {400: {"description": "refused request (prompt too long, identity on mismatched layouts, ...)"},
           404: {"description": "unknown model, module or stored context"},
           503: {"description": "too many pending requests (Retry-After) or the model has no running replica"},
           504: {"description": "no answer within request_timeout_s"}}
_UNBOUNDED = ("/healthz", "/metrics", "/docs", "/openapi.json")
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 503: "server_overloaded", 504: "timeout"}


def max_body_bytes(ingress: PoolService) -> int:
    """Largest request body read: room for a prompt of ``max_prompt_chars`` as JSON, at least 1 MiB."""
    return max(2**20, 8 * ingress.opts.max_prompt_chars)


def route_path(request: Request) -> str:
    """The request's path inside this app (without the route prefix Serve mounted it under)."""
    path, root = request.url.path, request.scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    """``{"detail": message}`` on kvlingua routes, OpenAI's error object on the OpenAI-compatible ones."""
    if is_openai_path(path):
        body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                          "param": param, "code": code}}
    else:
        body = {"detail": message}
    return JSONResponse(status_code=status, content=body, headers=headers)


def _safe(v):
    """A JSON-encodable stand-in for a value pydantic reported (NaN/Infinity become strings)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    try:
        json.dumps(v, allow_nan=False)
        return v
    except (TypeError, ValueError):
        return repr(v)[:200]


_TYPE_TAGS = ("str", "int", "float", "bool", "list", "dict", "none")


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, list[dict]]:
    """One line naming each failing field, the first field's dotted path, and the errors (safe to encode)."""
    errors = [{"loc": [_safe(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
              for e in exc.errors()]
    parts, first = [], None
    for e in errors:
        # a union's member (``str``, ``list[int]``, ``function-after[...]``) is not a field: leave it out
        loc = [str(x) for x in e["loc"]
               if x != "body" and not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x))]
        where = ".".join(loc) or "body"
        first = first or where
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts) or "invalid request", first, errors


def make_api(ingress: PoolService) -> FastAPI:
    """The HTTP API over ``ingress``."""
    app = FastAPI(title="kvlingua", version=__version__,
                  description="Cross-model generation over a pool of frozen LMs sharing a KV latent space; "
                              "OpenAI-compatible completions and a Σ context store.")
    limit = max_body_bytes(ingress)

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(route_path(request), exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, errors = validation_message(exc)
        if is_openai_path(route_path(request)):
            return error_response(route_path(request), 400, message, param, "invalid_value")
        return JSONResponse(status_code=422, content={"detail": errors, "message": message})

    @app.middleware("http")
    async def bounded(request: Request, call_next):
        """Cap on pending requests (503 + Retry-After), body size (413), request counts by route and status."""
        path = route_path(request)
        if path in _UNBOUNDED:
            return await call_next(request)
        if ingress.pending >= ingress.opts.max_pending_requests:
            response = error_response(path, 503, f"server busy: {ingress.pending} requests pending "
                                                 f"(max_pending_requests={ingress.opts.max_pending_requests}); retry later",
                                      code="overloaded", headers={"Retry-After": "1"})
        else:
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > limit):
                response = error_response(path, 413, f"request body of {size} bytes; this server reads at most {limit}",
                                          code="body_too_large")
            else:
                ingress.pending += 1
                ingress.metrics.gauge("pending_requests", ingress.pending)
                try:
                    response = await call_next(request)
                finally:
                    ingress.pending -= 1
                    ingress.metrics.gauge("pending_requests", ingress.pending)
        route = request.scope.get("route")
        ingress.metrics.request(getattr(route, "path", "unmatched"), response.status_code)
        return response

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        states = await ingress.router.replica_states()
        ok = all(s == "RUNNING" for s in states.values())
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ok" if ok else "degraded", "models": list(ingress.planner.members),
                                     "replicas": states})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        s = ingress.contexts.store
        ingress.metrics.store(s.hits, s.misses, s.bytes, len(s))
        return PlainTextResponse(ingress.metrics.prometheus(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/pool", response_model=ModelList)
    async def pool() -> ModelList:
        return ingress.planner.model_list()

    @app.post("/v1/generate", response_model=GenerateResponse, responses=_ERRORS)
    async def generate(req: GenerateRequest):
        prepared = ingress.planner.prepare(req)
        if req.stream:
            return StreamingResponse(await ingress.stream(prepared), media_type="text/event-stream")
        return await ingress.generate(prepared)

    @app.post("/v1/generate/mixed", response_model=MixedResponse, responses=_ERRORS)
    async def mixed(req: MixedRequest) -> MixedResponse:
        return await ingress.mixed.run(req)

    add_openai_routes(app, ingress, _ERRORS)
    add_tokenizer_routes(app, ingress.planner)
    return app
