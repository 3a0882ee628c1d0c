"""Serve the one-step student over HTTP: dynamic batching, zero-downtime model swaps, metrics.

    python -m src.serve                                   # models/onnx on http://127.0.0.1:8000
    python -m src.serve --production production           # follow what src.flows promotes
    python -m src.serve --model models/onnx --provider cuda --precision fp16 --host 0.0.0.0
    curl -s 127.0.0.1:8000/v1/images -d '{"prompt": "a red circle on a blue background", "seed": 0}' -o img.png

Endpoints: POST /v1/images ({"prompt", "seed", "n", "response_format": "png" | "b64_json"}),
GET / (a page to try it), GET /healthz (the process is up), GET /readyz (a model is loaded
and warmed up), GET /metrics (Prometheus text). Every image response carries the model's
version (`X-Model-Version`, the first 16 hex digits of the artifact manifest's digest).

An image is a function of (model version, prompt, seed) only: the same as `python -m
src.infer` gives, byte for byte, whatever else shares its batch. Batching, queue and limit
settings are the `serve` section of params.yaml (--set serve.KEY=VALUE, or the flags below).

With --production DIR the server follows DIR/current/onnx, where `src.flows` promotes: a new
artifact is verified against its manifest, loaded beside the serving one and warmed up, then
swapped in with one reference assignment. Requests already admitted finish on the model they
started with. A damaged or incomplete promotion is refused and logged; the old model serves on.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import math
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
except ImportError as err:          # the pipeline's install leaves the service's packages out
    raise SystemExit(f"python -m src.serve: {err.name} is not installed; install the serve extra: "
                     "pip install -e '.[serve]'") from None
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .config import DEFAULT_PARAMS, ServeConfig, add_config_args, apply_overrides, config_from_dict, load_config
from .errors import UserError, run_cli
from .infer import Artifact, load_artifact, png_bytes, to_uint8, tokenize
from .noise import initial_noise
from .text import normalize_counted

log = logging.getLogger("src.serve")
MAX_SEED = 2**63 - 1


class Rejected(Exception):
    """A request answered with an error: HTTP status, a kind (the `errors_total` label) and a message."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


# --------------------------------------------------------------------------- requests


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: StrictStr
    seed: StrictInt | None = Field(None, ge=0, le=MAX_SEED)
    n: StrictInt = Field(1, ge=1)
    response_format: Literal["png", "b64_json"] = "png"


def parse_request(body: bytes, cfg: ServeConfig) -> tuple[ImageRequest, list[str]]:
    """The request body -> (a checked request with its prompt normalised, warnings); every problem is a 4xx
    naming the field."""
    try:
        raw = json.loads(body)
    except RecursionError:
        raise Rejected(400, "invalid_json", "the body nests too deeply to be a request") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise Rejected(400, "invalid_json", f"the body is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise Rejected(422, "invalid_request", f"expected a JSON object like {{\"prompt\": \"...\"}}, "
                                               f"got {type(raw).__name__}")
    try:
        req = ImageRequest.model_validate(raw)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(map(str, e["loc"])) or "body"
            got = f" (got {json.dumps(e['input'])[:60]})" if e["type"] not in ("missing", "extra_forbidden") else ""
            msg = "unknown field; allowed: prompt, seed, n, response_format" if e["type"] == "extra_forbidden" \
                else e["msg"]
            parts.append(f"{key}: {msg}{got}")
        raise Rejected(422, "invalid_request", "; ".join(parts)) from None
    if len(req.prompt) > cfg.max_prompt_chars:
        raise Rejected(422, "invalid_request", f"prompt: {len(req.prompt)} characters, at most {cfg.max_prompt_chars}")
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected(422, "invalid_request", "prompt: contains a lone UTF-16 surrogate (not valid Unicode text)") \
            from None
    prompt, removed = normalize_counted(req.prompt)          # as prepare and infer do
    if not prompt:
        raise Rejected(422, "invalid_request", "prompt: must not be empty" + (
            f" (it held only whitespace and {removed} control characters)" if removed else ""))
    if req.n > cfg.max_n:
        raise Rejected(422, "invalid_request", f"n: at most {cfg.max_n} images per request (got {req.n})")
    if req.seed is not None and req.seed + req.n - 1 > MAX_SEED:
        raise Rejected(422, "invalid_request", f"seed: seed + n - 1 must be at most {MAX_SEED}")
    if req.response_format == "png" and req.n != 1:
        raise Rejected(422, "invalid_request", "response_format 'png' returns one image: ask for n = 1, "
                                               "or use response_format 'b64_json'")
    req.prompt = prompt
    warnings = [f"{removed} control character(s) removed from the prompt"] if removed else []
    return req, warnings


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Rejected(413, "body_too_large", f"the body is {declared} bytes, at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, "body_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus instruments in a registry of their own (one per server)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        p = "swiftbrush_"
        self.requests = Counter(p + "http_requests", "HTTP requests by route and status", ["route", "code"],
                                registry=r)
        self.errors = Counter(p + "errors", "error responses by kind", ["kind"], registry=r)
        self.images = Counter(p + "images", "images generated", registry=r)
        self.batch = Histogram(p + "batch_images", "images per ONNX Runtime call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Gauge(p + "queue_images", "images waiting for a batch", registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "POST /v1/images, arrival to response",
                                 registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.model = Gauge(p + "model_info", "the model being served (value 1)",
                           ["version", "precision", "provider"], registry=r)
        self.swaps = Counter(p + "model_swaps", "promoted models swapped in (ok) or refused", ["result"],
                             registry=r)
        for kind in ("ok", "refused"):
            self.swaps.labels(kind)

    def serving(self, art: Artifact) -> None:
        self.model.clear()
        self.model.labels(art.version, art.precision, art.provider).set(1)


# --------------------------------------------------------------------------- dynamic batching


@dataclass
class Job:
    art: Artifact                  # the model this request was admitted on; it finishes on it
    ids: np.ndarray                # (n, max_length)
    noise: np.ndarray              # (n, C, h, w)
    future: asyncio.Future
    arrived: float                 # loop.time()

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass
class Batcher:
    """Gathers jobs for up to `max_delay_ms` or `max_batch` images into one ONNX Runtime call (Triton's
    dynamic batcher with one preferred size). A batch holds jobs of one model only."""

    cfg: ServeConfig
    metrics: Metrics
    jobs: list[Job] = field(default_factory=list)
    waiting: int = 0                                       # images in `jobs`
    last_call_s: float = 0.05
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "ort"))

    def submit(self, job: Job) -> None:
        if self.waiting + job.n > self.cfg.max_queue:
            calls = math.ceil(self.waiting / self.cfg.max_batch) if self.cfg.batching else len(self.jobs)
            retry = max(1, math.ceil(calls * self.last_call_s))
            raise Rejected(429, "queue_full", f"{self.waiting} images are waiting (at most {self.cfg.max_queue}); "
                                              f"retry in {retry} s", {"Retry-After": str(retry)})
        self.jobs.append(job)
        self._count(job.n)
        self.arrived.set()

    def _count(self, delta: int) -> None:
        self.waiting += delta
        self.metrics.queue.set(self.waiting)

    def _drop_abandoned(self) -> None:
        kept = [j for j in self.jobs if not j.future.done()]
        self._count(sum(j.n for j in kept) - self.waiting)
        self.jobs = kept

    def _ready(self) -> int:
        art = self.jobs[0].art
        return sum(j.n for j in self.jobs if j.art is art)

    def take(self) -> list[Job]:
        """The next batch: the oldest job, then later jobs of the same model while they fit."""
        first = self.jobs[0]
        batch, total, rest = [first], first.n, []
        for job in self.jobs[1:]:
            if self.cfg.batching and job.art is first.art and total + job.n <= self.cfg.max_batch:
                batch.append(job)
                total += job.n
            else:
                rest.append(job)
        self.jobs = rest
        self._count(-total)
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_abandoned()
            if not self.jobs:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            if self.cfg.batching:
                deadline = self.jobs[0].arrived + self.cfg.max_delay_ms / 1000
                while self._ready() < self.cfg.max_batch and (left := deadline - loop.time()) > 0:
                    self.arrived.clear()
                    try:
                        await asyncio.wait_for(self.arrived.wait(), left)
                    except TimeoutError:
                        break
                self._drop_abandoned()
                if not self.jobs:
                    continue
            await self.execute(self.take())

    async def execute(self, batch: list[Job]) -> None:
        art = batch[0].art
        ids = np.concatenate([j.ids for j in batch])
        noise = np.concatenate([j.noise for j in batch])
        self.metrics.batch.observe(len(ids))
        t0 = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: art.run(ids, noise))
        except Exception as err:                               # a runtime failure: every job of the batch fails
            log.exception("ONNX Runtime call failed")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(err)
            return
        self.last_call_s = time.perf_counter() - t0
        images = to_uint8(out)
        start = 0
        for j in batch:
            if not j.future.done():
                j.future.set_result(images[start:start + j.n])
            start += j.n
        self.metrics.images.inc(len(images))


# --------------------------------------------------------------------------- models and swaps


def load_model(folder: Path, precision: str, provider: str, threads: int, workers: int = 1) -> Artifact:
    """Verify, load and warm up an artifact (a first call allocates what later calls reuse)."""
    art = load_artifact(folder, precision, provider, threads=threads, workers=workers)
    ids, _ = tokenize(art.tokenizer, art.contract, ["warm-up"])
    art.run(ids, initial_noise([0], tuple(art.contract["latent_shape"])))
    return art


def signature(folder: Path) -> tuple | None:
    """What changes when a promotion swaps a new folder in (the manifest is a new file each time)."""
    try:
        st = (folder / "manifest.json").stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


@dataclass
class Service:
    cfg: ServeConfig
    precision: str = "fp32"
    provider: str = "auto"
    model: Artifact | None = None
    production: Path | None = None
    metrics: Metrics = field(default_factory=Metrics)
    batcher: Batcher | None = None

    def install(self, art: Artifact) -> None:
        old = self.model
        self.model = art                       # one reference assignment: the swap
        self.metrics.serving(art)
        if old is not None:
            self.metrics.swaps.labels("ok").inc()
            log.info("swapped model %s -> %s (%s)", old.version, art.version, art.folder)
        else:
            log.info("serving model %s from %s (%s on %s)", art.version, art.folder, art.precision, art.provider)

    async def try_swap(self, folder: Path) -> bool:
        """Load `folder` beside the serving model and swap it in; refuse (and log) a bad one."""
        try:
            art = await asyncio.get_running_loop().run_in_executor(
                None, load_model, folder, self.precision, self.provider, self.cfg.threads, self.cfg.workers)
        except Exception as err:                           # UserError from verification, or anything else
            self.metrics.swaps.labels("refused").inc()
            log.error("refused the model at %s, still serving %s: %s", folder,
                      self.model.version if self.model else "nothing", err)
            return False
        if self.model is not None and art.version == self.model.version:
            return False
        self.install(art)
        return True

    async def watch(self) -> None:
        """Follow production/current/onnx: try each new promotion once."""
        folder = self.production / "current" / "onnx"
        seen = None
        while True:
            sig = signature(folder)
            if sig is not None and sig != seen:
                seen = sig
                await self.try_swap(folder)
            await asyncio.sleep(self.cfg.watch_interval_s)


# --------------------------------------------------------------------------- the app


def create_app(service: Service):
    m = service.metrics

    @asynccontextmanager
    async def lifespan(app):
        service.batcher = Batcher(service.cfg, m)
        tasks = [asyncio.create_task(service.batcher.run())]
        if service.production is not None:
            tasks.append(asyncio.create_task(service.watch()))
        yield
        for t in tasks:
            t.cancel()
        service.batcher.pool.shutdown(wait=True)

    app = FastAPI(title="SwiftBrush one-step student", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    routes = {"/", "/v1/images", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"}

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        route = request.url.path if request.url.path in routes else "other"
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

    @app.post("/v1/images")
    async def images(request: Request):
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        req, warnings = parse_request(await read_body(request, service.cfg.max_body_bytes), service.cfg)
        art = service.model                    # pinned: this request finishes on this model
        if art is None:
            raise Rejected(503, "not_ready", "no model is loaded yet", {"Retry-After": "1"})
        seed = req.seed if req.seed is not None else secrets.randbelow(2**32)
        seeds = list(range(seed, seed + req.n))
        ids, cut = tokenize(art.tokenizer, art.contract, [req.prompt])
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
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("{{MAX_N}}", str(service.cfg.max_n))

    return app


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>SwiftBrush one-step student</title>
<style>
 body{font:16px/1.4 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}
 h1{font-size:1.4rem;margin-bottom:.2rem} .sub{color:#666;margin-top:0}
 form{display:grid;grid-template-columns:1fr 7rem auto;gap:.5rem;margin:1.2rem 0}
 input,button{font:inherit;padding:.5rem .6rem;border:1px solid #bbb;border-radius:.4rem}
 button{background:#1d4ed8;color:#fff;border-color:#1d4ed8;cursor:pointer} button:disabled{opacity:.6}
 #out{display:flex;gap:1rem;align-items:flex-start} #out img{width:256px;height:256px;image-rendering:pixelated;
 border-radius:.4rem;background:#eee} #info{color:#333} .err{color:#b91c1c}
</style></head><body>
<h1>SwiftBrush one-step student</h1>
<p class="sub">One network evaluation per image. Type a prompt, pick a seed, generate.</p>
<form id="f">
 <input id="prompt" name="prompt" placeholder="a red circle at the top on a blue background" required>
 <input id="seed" name="seed" type="number" min="0" step="1" value="0" title="seed">
 <button id="go" type="submit">Generate</button>
</form>
<div id="out"><img id="img" alt=""><div id="info">Model: <span id="version">-</span></div></div>
<script>
const f = document.getElementById('f'), go = document.getElementById('go'), info = document.getElementById('info');
fetch('readyz').then(r => r.json()).then(j => { if (j.model_version) document.getElementById('version').textContent = j.model_version; });
f.addEventListener('submit', async (e) => {
  e.preventDefault(); go.disabled = true; const t0 = performance.now();
  const body = {prompt: document.getElementById('prompt').value, response_format: 'b64_json'};
  const seed = document.getElementById('seed').value; if (seed !== '') body.seed = Number(seed);
  try {
    const r = await fetch('v1/images', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
    const j = await r.json();
    if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
    const img = document.getElementById('img');
    img.src = 'data:image/png;base64,' + j.images[0].b64_png; img.alt = body.prompt;
    const total = Math.round(performance.now() - t0);
    info.innerHTML = '';
    for (const [k, v] of [['Model', j.model_version], ['Seed', j.seed], ['Server time', j.time_ms + ' ms'],
                          ['Round trip', total + ' ms']].concat(j.warnings.map(w => ['Warning', w]))) {
      const d = document.createElement('div'); d.textContent = k + ': ' + v; info.appendChild(d); }
    info.dataset.done = '1';
  } catch (err) { info.innerHTML = ''; const d = document.createElement('div'); d.className = 'err';
    d.textContent = 'Error: ' + err.message; info.appendChild(d); }
  finally { go.disabled = false; }
});
</script></body></html>
"""


# --------------------------------------------------------------------------- the command line


def serve_config(args) -> ServeConfig:
    overrides = list(args.overrides)
    if args.max_batch is not None:
        overrides.append(f"serve.max_batch={args.max_batch}")
    if args.max_delay_ms is not None:
        overrides.append(f"serve.max_delay_ms={args.max_delay_ms}")
    if args.no_batching:
        overrides.append("serve.batching=false")
    if args.params == DEFAULT_PARAMS and not args.params.is_file():      # a serving box without the repo's params
        return config_from_dict(apply_overrides({}, overrides), "defaults").serve
    return load_config(args.params, overrides).serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, help="serve this export folder (default models/onnx)")
    source.add_argument("--production", type=Path, metavar="DIR",
                        help="serve DIR/current/onnx and swap in each new promotion (the src.flows folder)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                        help="ONNX Runtime device: auto = CUDA when usable, else CPU (default)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32", help="which graph (default fp32)")
    parser.add_argument("--max-batch", type=int, help="most images per ONNX Runtime call (serve.max_batch)")
    parser.add_argument("--max-delay-ms", type=float, help="batching wait (serve.max_delay_ms)")
    parser.add_argument("--no-batching", action="store_true", help="one request per call (serve.batching=false)")
    parser.add_argument("--access-log", action="store_true", help="log every request (off: it costs throughput)")
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    cfg = serve_config(args)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(), indent=2))
        return
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1..65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(cfg, args.precision, args.provider)
    if args.production is not None:
        service.production = args.production
        folder = args.production / "current" / "onnx"
        if signature(folder) is None:
            log.warning("nothing promoted at %s yet; /readyz stays 503 until a promotion arrives", folder)
    else:
        t0 = time.perf_counter()
        service.install(load_model(args.model or Path("models/onnx"), args.precision, args.provider, cfg.threads,
                                   cfg.workers))
        log.info("loaded and warmed up in %.2f s", time.perf_counter() - t0)
    import uvicorn

    try:
        uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info",
                    access_log=args.access_log, timeout_graceful_shutdown=int(cfg.request_timeout_s) + 1)
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err.strerror or err})") from None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_cli(main)
