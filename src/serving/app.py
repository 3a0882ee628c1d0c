"""The HTTP app: POST /v1/images, GET / (the page in page.html), /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..method.noise import initial_noise
from .batcher import Batcher, Job
from .requests import Rejected, parse_request, read_body
from .runtime import png_bytes
from .service import Service

log = logging.getLogger("src.serve")
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")


ROUTES = {"/", "/v1/images", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}


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
    app.post("/v1/images")(images_endpoint(service))
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
        return JSONResponse({"error": {"type": err.kind, "message": err.message}}, err.status, err.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        m.errors.labels("internal").inc()
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": {"type": "internal", "message": "internal server error (logged)"}}, 500)


def images_endpoint(service: Service):
    """POST /v1/images: parse, pin the serving model, queue one job for the batcher, answer PNG or JSON."""
    m = service.metrics

    async def images(request: Request):
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        req, warnings = parse_request(await read_body(request, service.cfg.max_body_bytes), service.cfg)
        art = service.model                    # pinned: this request finishes on this model
        if art is None:
            raise Rejected(503, "not_ready", "no model is loaded yet", {"Retry-After": "1"})
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        seeds = list(range(seed, seed + req.n))
        ids, cut = art.token_ids([req.prompt])
        job = Job(art, np.repeat(ids, req.n, axis=0), initial_noise(seeds, tuple(art.contract["latent_shape"])),
                  loop.create_future(), loop.time())
        service.batcher.submit(job)
        try:
            pixels = await asyncio.wait_for(asyncio.shield(job.future), service.cfg.request_timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise Rejected(503, "timeout", f"not answered within {service.cfg.request_timeout_s} s "
                                           "(serve.request_timeout_s)", {"Retry-After": "1"}) from None
        pngs = await loop.run_in_executor(None, lambda: [png_bytes(p) for p in pixels])
        warnings += [f"the prompt is longer than {art.contract['max_length']} tokens and was truncated; "
                     f"dropped text: {cut[0]!r}"] if cut else []
        ms = round((time.perf_counter() - t0) * 1000, 1)
        m.latency.observe(ms / 1000)
        headers = {"X-Model-Version": art.version, "X-Seed": str(seed), "X-Time-Ms": str(ms)}
        if req.response_format == "png":
            if warnings:
                headers["X-Warning"] = json.dumps(" / ".join(warnings))  # ASCII-escaped: a valid header value
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model_version": art.version, "seed": seed, "time_ms": ms, "warnings": warnings,
                             "images": [{"seed": s, "b64_png": base64.b64encode(p).decode()}
                                        for s, p in zip(seeds, pngs)]}, headers=headers)

    return images


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
