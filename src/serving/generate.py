"""What every route that draws images shares: the prompt's checks, one job for the batcher, the PNGs.

Whichever dialect asks (/v1/images, OpenAI's /v1/images/generations, AUTOMATIC1111's /sdapi/v1/txt2img),
an image is a function of (model version, prompt, seed) only: seeds seed, seed + 1, ... for n images,
the same as `python -m src.infer` draws.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import numpy as np

from ..method.noise import initial_noise
from .batcher import Job
from .requests import Rejected
from .runtime import Artifact, png_bytes


@dataclass
class Drawn:
    """One request's images and what the response reports about them."""

    art: Artifact
    prompt: str                       # as drawn: normalised
    seeds: list[int]
    pngs: list[bytes]
    ms: float
    warnings: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Model-Version": self.art.version, "X-Seed": str(self.seeds[0]), "X-Time-Ms": str(self.ms)}


def serving_model(service) -> Artifact:
    art = service.model
    if art is None:
        raise Rejected(503, "not_ready", "no model is loaded yet", {"Retry-After": "1"})
    return art


def image_size(art: Artifact) -> tuple[int, int]:
    """(width, height) of the artifact's images."""
    h, w = art.image_hw
    return w, h


async def draw(service, prompt: str, n: int, seed: int | None, warnings: list[str] | None = None) -> Drawn:
    """`n` images of a checked, normalised `prompt` from seeds seed, seed + 1, ... (a random seed when None),
    on the model serving when the request arrived (a swap meanwhile does not change it)."""
    t0 = time.perf_counter()
    loop = asyncio.get_running_loop()
    art = serving_model(service)               # pinned: this request finishes on this model
    seed = seed if seed is not None else secrets.randbelow(2**32)
    seeds = list(range(seed, seed + n))
    ids, cut = art.token_ids([prompt])
    job = Job(art, np.repeat(ids, n, axis=0), initial_noise(seeds, tuple(art.contract["latent_shape"])),
              loop.create_future(), loop.time())
    service.batcher.submit(job)
    try:
        pixels = await asyncio.wait_for(asyncio.shield(job.future), service.cfg.request_timeout_s)
    except TimeoutError:
        job.future.cancel()
        raise Rejected(503, "timeout", f"not answered within {service.cfg.request_timeout_s} s "
                                       "(serve.request_timeout_s)", {"Retry-After": "1"}) from None
    pngs = await loop.run_in_executor(None, lambda: [png_bytes(p) for p in pixels])
    warnings = list(warnings or [])
    warnings += [f"the prompt is longer than {art.contract['max_length']} tokens and was truncated; "
                 f"dropped text: {cut[0]!r}"] if cut else []
    ms = round((time.perf_counter() - t0) * 1000, 1)
    service.metrics.latency.observe(ms / 1000)
    return Drawn(art, prompt, seeds, pngs, ms, warnings)
