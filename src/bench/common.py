"""What every benchmark shares: timing (median, interleaved round robin) and the machine's name."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from ..core.config import load_config


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def round_robin(runs: dict[str, Callable[[], object]], repeats: int, sparse: tuple[str, ...] = (),
                burst: int = 1) -> dict[str, float]:
    """Median wall time of each run, after one warm-up each, timed in turns (one timed call of every run per
    round), so that a machine that speeds up or slows down during the benchmark shifts every run alike and their
    ratios hold. `burst`: calls per run and round, the last one timed (the others re-warm the caches the other
    runs evicted, as a process serving one model keeps them warm). Runs whose name contains a `sparse` word (the
    slow teacher) are timed every other round, once."""
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in runs.items():
            slow = any(w in name for w in sparse)
            if r % 2 and slow:
                continue
            for _ in range(0 if slow else burst - 1):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> str:
    """The machine a benchmark ran on, as its reports name it: CPU model, cores, memory and the GPU (when
    torch sees one)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        gpu = "no GPU"
    return f"{cpu}, {os.cpu_count()} CPU cores, {mem:.0f} GiB RAM, {gpu}"


class DistillRun:
    """One distillation run built exactly as `python -m src.distill` builds it (scratch folders under `tmp`),
    whose training steps the benchmarks time: `step(k)` runs distill's own step k with its own draws."""

    def __init__(self, overrides: list[str], tmp: Path, train_prompts: Path | None = None):
        from .. import distill as D

        self.overrides = overrides
        self.config = load_config(overrides=overrides)
        self.cfg = self.config.distill.model_copy(update={"processes": 1})   # one process's step
        tiny = Path(self.config.tiny_decoder) if self.config.tiny_decoder else None
        paths = D.Paths(train_prompts=train_prompts or D.Paths.train_prompts, eval_prompts=tmp / "none.jsonl",
                        checkpoints=tmp / "ck", student=tmp / "student", reports=tmp / "rep", tiny_decoder=tiny)
        self.run = D.setup(self.cfg, self.config.lr, self.config.seed, paths)
        D.resume(self.run, self.cfg, paths)

    def step(self, k: int) -> float:
        """Seconds for the run's training step k (the draws of distill's step k)."""
        from .. import distill as D

        gen, idx, z = D.step_draws(self.run, self.cfg, self.config.seed, k)
        t0 = time.perf_counter()
        D.train_step(self.run, self.cfg, [self.run.prompts[i] for i in idx], z, gen, k)
        return time.perf_counter() - t0
