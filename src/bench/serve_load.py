"""Load test of `python -m src.serve` on loopback: batching on vs off, and a model swap under load.

    python -m src.bench.serve_load                       # reports/serve/{load.json,README.md}
    python -m src.bench.serve_load --requests 2000 --clients 16 --duration-s 60

Each scenario starts its own server process on 127.0.0.1 (a free port), waits for /readyz,
then a bounded number of asyncio clients (--clients) send POST /v1/images back to back
until --requests answers or --duration-s seconds, whichever comes first. Prompts and seeds
are the eval prompts'. Recorded: answers by status (every non-200 is an error), throughput,
latency percentiles, the server's resident memory when ready, after the first tenth of the
requests and at the end, and its peak (VmHWM).

The swap scenario serves `--production` from a temporary folder: A is promoted before the
load starts, B (A's weights with a different model card, so a different manifest digest and
version) is promoted with `src.flows.promote` once half the requests are answered. Every
response's X-Model-Version is kept: per client, the versions must change exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from ..core.launch import free_port
from .common import machine

OUT = Path("reports/serve")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


@contextmanager
def server(args: list[str], log: Path):
    """A `python -m src.serve` process on a free loopback port; yields (base URL, pid)."""
    import httpx

    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "src.serve", "--host", "127.0.0.1", "--port", str(port), *args],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise UserError(f"the server exited ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"the server did not come up in 120 s; see {log}")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while httpx.get(url + "/readyz", timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise UserError(f"{url}/readyz: not ready after {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class Load:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    codes: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0
    versions: dict[int, list[str]] = field(default_factory=dict)        # per client, in order
    elapsed_s: float = 0.0


async def drive(url: str, bodies: list[dict], clients: int, duration_s: float, on_progress=None) -> Load:
    """`clients` workers POST bodies in turn until all are answered or the time is up."""
    import httpx

    load, nxt = Load(), iter(range(len(bodies)))
    deadline = time.monotonic() + duration_s

    async def worker(k: int, client: httpx.AsyncClient) -> None:
        load.versions[k] = []
        for i in nxt:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/images", json=bodies[i])
            except httpx.HTTPError:
                load.transport_errors += 1
                continue
            load.latencies.append(time.perf_counter() - t0)
            load.codes[r.status_code] = load.codes.get(r.status_code, 0) + 1
            load.versions[k].append(r.headers.get("x-model-version", ""))
            if on_progress is not None:
                await on_progress(len(load.latencies))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await asyncio.gather(*(worker(k, client) for k in range(clients)))
    load.elapsed_s = time.perf_counter() - t0
    return load


def summary(load: Load) -> dict:
    lat = np.array(load.latencies) * 1000
    answered = len(load.latencies)
    ok = load.codes.get(200, 0)
    return {"requests": answered + load.transport_errors, "ok": ok,
            "errors": answered - ok + load.transport_errors,
            "codes": {str(k): v for k, v in sorted(load.codes.items())},
            "seconds": round(load.elapsed_s, 2), "requests_per_s": round(answered / load.elapsed_s, 1),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 95, 99)},
            "max_ms": round(float(lat.max()), 1)}


def scenario(name: str, server_args: list[str], bodies: list[dict], clients: int, duration_s: float,
             logs: Path, promote_b=None) -> dict:
    """One server, one load; memory read at ready, after a tenth of the load, and at the end."""
    import httpx

    print(f"[{name}] {' '.join(server_args)}", file=sys.stderr)
    with server(server_args, logs / f"{name}.log") as (url, pid):
        wait_ready(url)
        mem = {"ready": memory_mb(pid)}
        marks = {"warm": max(1, len(bodies) // 10), "swap": len(bodies) // 2}
        swapped = {}

        async def progress(done: int) -> None:
            if done == marks["warm"] and "warm" not in mem:
                mem["warm"] = memory_mb(pid)
            if promote_b is not None and done >= marks["swap"] and not swapped:
                swapped["at_request"] = done
                swapped["t"] = time.perf_counter()
                await asyncio.get_running_loop().run_in_executor(None, promote_b)

        load = asyncio.run(drive(url, bodies, clients, duration_s, progress))
        mem["end"] = memory_mb(pid)
        metrics = httpx.get(url + "/metrics").text
    out = summary(load) | {"clients": clients, "server_args": server_args,
                           "rss_mb": {k: v["VmRSS"] for k, v in mem.items()}, "peak_rss_mb": mem["end"]["VmHWM"]}
    out["mean_batch_images"] = round(metric_sum(metrics, "swiftbrush_batch_images_sum") /
                                     max(1.0, metric_sum(metrics, "swiftbrush_batch_images_count")), 2)
    if promote_b is not None:
        versions = [v for v in load.versions.values() if v]
        out["swap"] = {"promoted_after_requests": swapped.get("at_request"),
                       "versions_seen": sorted({x for v in versions for x in v}),
                       "clients_whose_version_changed_exactly_once":
                           sum(1 for v in versions if sum(a != b for a, b in zip(v, v[1:])) == 1),
                       "clients": len(versions),
                       "swaps_ok": metric_sum(metrics, 'swiftbrush_model_swaps_total{result="ok"}'),
                       "swaps_refused": metric_sum(metrics, 'swiftbrush_model_swaps_total{result="refused"}')}
    print(f"[{name}] {out['requests']} requests, {out['errors']} errors, {out['requests_per_s']} req/s, "
          f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms", file=sys.stderr)
    return out


def metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.split(" ")[0] == name)


def request_bodies(prompts_file: Path, count: int) -> list[dict]:
    from ..core.prompts import read_prepared

    records = read_prepared(prompts_file, None) if prompts_file.is_file() else []
    if not records:
        raise UserError(f"{prompts_file}: no prompts (run `dvc repro prepare` first, or pass --prompts)")
    return [{"prompt": records[i % len(records)]["prompt"], "seed": i} for i in range(count)]


def report(r: dict) -> str:
    rows = [("batching on", r["batching_on"]), ("batching off", r["batching_off"]), ("swap under load", r["swap"])]
    lines = [f"# Serving under load ({r['machine']})", "",
             f"`python -m src.bench.serve_load`: {r['clients']} concurrent clients on loopback, each sending "
             "`POST /v1/images` (one PNG, n = 1; the eval prompts with their seeds) as soon as its previous answer "
             f"arrives, against `python -m src.serve` serving `{r['model']}` (fp32, ONNX Runtime CPU). Server "
             "and clients share the machine's cores.", "",
             "| scenario | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch | RSS ready / warm / end MB | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows:
        rss = s["rss_mb"]
        lines.append(f"| {name} | {s['requests']} | {s['errors']} | {s['requests_per_s']} | {s['p50_ms']} | "
                     f"{s['p95_ms']} | {s['p99_ms']} | {s['mean_batch_images']} | {rss['ready']} / "
                     f"{rss.get('warm', '-')} / {rss['end']} | {s['peak_rss_mb']} |")
    on, off, sw = r["batching_on"], r["batching_off"], r["swap"]
    lines += ["", f"Dynamic batching (`serve.max_batch` {r['max_batch']}, `serve.max_delay_ms` {r['max_delay_ms']}) "
              f"answers {on['requests_per_s'] / off['requests_per_s']:.1f}x the requests per second of one call per "
              f"request, at {off['p50_ms'] / on['p50_ms']:.1f}x lower median latency.", "",
              f"Swap: B was promoted (`src.flows.promote`) after {sw['swap']['promoted_after_requests']} answers; "
              f"{sw['swap']['clients_whose_version_changed_exactly_once']} of {sw['swap']['clients']} clients saw "
              f"the version change exactly once ({' -> '.join(sw['swap']['versions_seen'])}), "
              f"{int(sw['swap']['swaps_ok'])} swap, {sw['errors']} failed requests. B is A's weights with another "
              "model card (so another digest): the swap path (verify, load beside, warm up, switch) is the same "
              "whatever the weights; the tests swap between two differently trained artifacts.", "",
              "Resident memory is read from /proc when the server is ready, after a tenth of the requests and at "
              "the end; peak is the kernel's high-water mark.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m src.bench.serve_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/onnx"), help="export folder (default models/onnx)")
    p.add_argument("--prompts", type=Path, default=Path("prompts/eval.jsonl"), help="prompts to send")
    p.add_argument("--requests", type=int, default=10_000, help="requests per scenario (default 10000)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--duration-s", type=float, default=300, help="longest a scenario runs (default 300)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or args.requests < 1 or not 0 < args.duration_s <= 3600:
        raise UserError("--clients 1..256, --requests >= 1 and --duration-s in (0, 3600] keep the load bounded")
    from ..core import manifest
    from ..flows import Decision, promote

    manifest.read(args.model)
    bodies = request_bodies(args.prompts, args.requests)
    batch = ["--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp = Path(tmp)
        result = {"machine": machine(), "model": str(args.model), "clients": args.clients,
                  "max_batch": args.max_batch, "max_delay_ms": args.max_delay_ms}
        common = ["--model", str(args.model), "--provider", "cpu"]
        result["batching_on"] = scenario("batching_on", common + batch, bodies, args.clients, args.duration_s, tmp)
        result["batching_off"] = scenario("batching_off", common + ["--no-batching"], bodies, args.clients,
                                          args.duration_s, tmp)

        def stage(name: str, card_note: str) -> Path:
            ws = tmp / name
            shutil.copytree(args.model, ws / "models" / "onnx")
            with open(ws / "models" / "onnx" / "README.md", "a") as f:
                f.write(card_note)
            manifest.write(ws / "models" / "onnx")
            return ws

        ws_a, ws_b = stage("A", "\n<!-- load test: A -->\n"), stage("B", "\n<!-- load test: B -->\n")
        production = tmp / "production"
        promote(ws_a, production, {}, Decision(True, "load test A", "-", 0.0, None))
        result["swap"] = scenario(
            "swap", ["--production", str(production), "--provider", "cpu", "--set", "serve.watch_interval_s=0.2",
                     *batch], bodies, args.clients, args.duration_s, tmp,
            promote_b=lambda: promote(ws_b, production, {}, Decision(True, "load test B", "-", 0.0, None)))
        result["swap"]["server_args"][1] = "<tmp>/production"
    write_json(args.out / "load.json", result)
    with atomic_file(args.out / "README.md") as f:
        f.write(report(result))
    print(f"wrote {args.out / 'load.json'} and {args.out / 'README.md'}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
