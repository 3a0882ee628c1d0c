"""The dynamic batcher: requests wait at most serve.max_delay_ms to share one ONNX Runtime call of at
most serve.max_batch images (Triton's maximum queue delay); an image never depends on its batch.
Prometheus instruments of one server live here too (`Metrics`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..core.config import ServeConfig
from ..core.images import uint8_from_unit
from .requests import Rejected
from .runtime import Artifact

log = logging.getLogger("src.serve")


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
        self.by_key = Counter(p + "authorized_requests", "requests that presented a valid API key, by key id "
                              "(the first 8 hex digits of the key's SHA-256)", ["key_id"], registry=r)
        self.swaps = Counter(p + "model_swaps", "promoted models swapped in (ok) or refused", ["result"],
                             registry=r)
        for kind in ("ok", "refused"):
            self.swaps.labels(kind)

    def serving(self, art: Artifact) -> None:
        self.model.clear()
        self.model.labels(art.version, art.precision, art.provider).set(1)


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
        images = uint8_from_unit(out)
        start = 0
        for j in batch:
            if not j.future.done():
                j.future.set_result(images[start:start + j.n])
            start += j.n
        self.metrics.images.inc(len(images))
