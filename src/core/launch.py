"""Start several copies of a stage that train together (DDP), on this machine, without a launcher CLI.

`python -m src.distill --set distill.processes=2` calls `spawn`: it starts the processes with the
environment torch.distributed and accelerate read (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
waits for them and returns the first failure's exit status. On a machine without CUDA the processes
use gloo over loopback and share the cores (each gets cores / processes threads: on two cores, two
one-thread processes draw 1.4x the samples per second of one two-thread process); with GPUs, each
process takes one (LOCAL_RANK).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from .errors import UserError


def launched_world() -> int:
    """The number of processes this one was started among (1 when not under a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(base: dict[str, str], rank: int, processes: int, port: int, cuda: bool, cores: int) -> dict[str, str]:
    """The environment of process `rank` of `processes` on one machine."""
    env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(processes),
           "LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"                 # without it accelerate sees N unrelated CPU runs
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")          # gloo stays on loopback
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // processes)))
    if rank:
        env["TQDM_DISABLE"] = "1"
    return env


def spawn(module: str, argv: list[str], processes: int) -> int:
    """Run `python -m module *argv` as `processes` cooperating processes; 0, or the first failure's status
    (the others are then stopped)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < processes:
        raise UserError(f"distill.processes is {processes}, but this machine has {torch.cuda.device_count()} "
                        f"GPU(s); one process per GPU")
    cores = cpu_cores()
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *argv],
                              env=worker_env(dict(os.environ), rank, processes, port, cuda, cores))
             for rank in range(processes)]
    status = 0
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # a stopped `dvc repro` stops them all
    try:
        while procs:
            for p in list(procs):
                code = p.poll()
                if code is None:
                    continue
                procs.remove(p)
                if code and not status:
                    status = code
                    for other in procs:          # a lost peer would leave the others waiting in a collective
                        other.terminate()
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    return status
