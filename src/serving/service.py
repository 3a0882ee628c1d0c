"""The serving state: the model in use, blue-green swaps of promoted artifacts, the batcher and metrics."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import ServeConfig
from ..method.noise import initial_noise
from .batcher import Batcher, Metrics
from .runtime import Artifact, load_artifact

log = logging.getLogger("src.serve")


def load_model(folder: Path, precision: str, provider: str, threads: int, workers: int = 1) -> Artifact:
    """Verify, load and warm up an artifact (a first call allocates what later calls reuse)."""
    art = load_artifact(folder, precision, provider, threads=threads, workers=workers)
    ids, _ = art.token_ids(["warm-up"])
    art.image_hw = tuple(art.run(ids, initial_noise([0], tuple(art.contract["latent_shape"]))).shape[-2:])
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
    key_hashes: list[str] = field(default_factory=list)     # SHA-256 of the accepted API keys (auth.py)

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
