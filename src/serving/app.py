"""The HTTP app: POST /v1/images, the OpenAI and AUTOMATIC1111 dialects (openai_api.py, a1111.py), GET / (the
page in page.html), /healthz, /readyz, /metrics; API keys (auth.py) on every route that draws or lists models."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import a1111, openai_api
from .auth import key_id, match, presented_key
from .batcher import Batcher
from .generate import draw
from .requests import Rejected, parse_request, read_body
from .service import Service

log = logging.getLogger("src.serve")
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")


ROUTES = {"/", "/v1/images", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v1/images/generations",
          "/v1/models", "/sdapi/v1/txt2img", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/samplers",
          "/sdapi/v1/schedulers"}


def create_app(service: Service):
    """The FastAPI app over `service`: the batcher (and the promotion watcher) run for the app's lifetime."""

    @asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(service.cfg, service.metrics)
        tasks = [asyncio.create_task(service.batcher.run())]
        if service.production is not None:
            tasks.append(asyncio.create_task(service.watch()))
        yield
        for t in tasks:
            t.cancel()
        service.batcher.pool.shutdown(wait=True)

    app = FastAPI(title="SwiftBrush one-step student", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    add_error_handling(app, service.metrics)
    authorize = authorizer(service)
    app.post("/v1/images")(images_endpoint(service, authorize))
    openai_api.add_routes(app, service, authorize)
    a1111.add_routes(app, service, authorize)
    add_probes(app, service)
    return app


def add_error_handling(app, m) -> None:
    """Count every response by route and status; answer a `Rejected` with its JSON error and anything
    else with a logged 500."""

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"
        m.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected):
        m.errors.labels(err.kind).inc()
        return error_response(request.url.path, err)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        m.errors.labels("internal").inc()
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": {"type": "internal", "message": "internal server error (logged)"}}, 500)


def error_response(path: str, err: Rejected) -> Response:
    """A refusal in the shape of the dialect the route speaks."""
    if path.startswith("/sdapi/"):
        return a1111.error_response(err)
    if path.startswith(("/v1/images/generations", "/v1/images/files/", "/v1/models")):
        return openai_api.error_response(err)
    return JSONResponse({"error": {"type": err.kind, "message": err.message}}, err.status, err.headers)


def images_endpoint(service: Service, authorize):
    """POST /v1/images: parse, draw on the serving model, answer PNG or JSON."""

    async def images(request: Request):
        authorize(request)
        req, warnings = parse_request(await read_body(request, service.cfg.max_body_bytes), service.cfg)
        drawn = await draw(service, req.prompt, req.n, req.seed, warnings)
        headers = drawn.headers
        if req.response_format == "png":
            if drawn.warnings:
                headers["X-Warning"] = json.dumps(" / ".join(drawn.warnings))  # ASCII-escaped: a valid header value
            return Response(drawn.pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model_version": drawn.art.version, "seed": drawn.seeds[0], "time_ms": drawn.ms,
                             "warnings": drawn.warnings,
                             "images": [{"seed": s, "b64_png": base64.b64encode(p).decode()}
                                        for s, p in zip(drawn.seeds, drawn.pngs)]}, headers=headers)

    return images


def authorizer(service: Service):
    """`authorize(request, basic=False)`: with keys configured, a request without a known key is a 401 (the
    caller's dialect shapes it); with none, every request passes. Counts requests per key id."""
    hashes = service.key_hashes

    def authorize(request: Request, basic: bool = False) -> None:
        if not hashes:
            return
        key = presented_key(request.headers.get("authorization"), basic)
        found = match(key, hashes) if key is not None else None
        if found is None:
            raise Rejected(401, "unauthorized", "an API key is required: send `Authorization: Bearer KEY`"
                           if key is None else "the API key is not valid", {"WWW-Authenticate": "Bearer"})
        service.metrics.by_key.labels(key_id(found)).inc()

    return authorize


def add_probes(app, service: Service) -> None:
    """GET /healthz (the process is up), /readyz (a model is loaded), /metrics (Prometheus), / (the page)."""

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        art = service.model
        if art is None:
            raise Rejected(503, "not_ready", "no model is loaded yet")
        return {"status": "ready", "model_version": art.version, "precision": art.precision,
                "provider": art.provider, "folder": str(art.folder)}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("{{MAX_N}}", str(service.cfg.max_n))
