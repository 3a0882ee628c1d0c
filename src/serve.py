"""Serve the one-step student over HTTP: dynamic batching, zero-downtime model swaps, metrics.

    python -m src.serve                                   # models/onnx on http://127.0.0.1:8000
    python -m src.serve --production production           # follow what src.flows promotes
    SWIFTBRUSH_API_KEYS=KEY python -m src.serve --model models/onnx --provider cuda --precision fp16 --host 0.0.0.0
    curl -s 127.0.0.1:8000/v1/images -d '{"prompt": "a red circle on a blue background", "seed": 0}' -o img.png

Endpoints: POST /v1/images ({"prompt", "seed", "n", "response_format": "png" | "b64_json"}),
OpenAI's POST /v1/images/generations and GET /v1/models, AUTOMATIC1111's POST /sdapi/v1/txt2img,
GET /sdapi/v1/sd-models and GET/POST /sdapi/v1/options (docs/serving.md), GET / (a page to try it),
GET /healthz (the process is up), GET /readyz (a model is loaded and warmed up), GET /metrics
(Prometheus text). Every image response carries the model's version (`X-Model-Version`, the first
16 hex digits of the artifact manifest's digest).

API keys: with serve.api_keys_file or SWIFTBRUSH_API_KEYS set, every route that draws or lists
models needs `Authorization: Bearer KEY`. Without keys the server refuses a --host other than
this machine's loopback unless --allow-unauthenticated is given.

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
import json
import logging
import os
import time
from pathlib import Path

from .core.config import DEFAULT_PARAMS, ServeConfig, add_config_args, apply_overrides, config_from_dict, load_config
from .core.errors import UserError, run_cli

try:
    from .serving.app import create_app
except ImportError as err:          # the pipeline's install leaves the service's packages out
    raise SystemExit(f"python -m src.serve: {err.name} is not installed; install the serve extra: "
                     "pip install -e '.[serve]'") from None
from .serving.auth import check_bind, load_keys
from .serving.service import Service, load_model, signature

log = logging.getLogger("src.serve")


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
    parser.add_argument("--allow-unauthenticated", action="store_true",
                        help="allow a --host beyond this machine with no API key (serve.api_keys_file, "
                             "SWIFTBRUSH_API_KEYS)")
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
    keys = load_keys(cfg.api_keys_file)
    check_bind(args.host, bool(keys), args.allow_unauthenticated)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(cfg, args.precision, args.provider, key_hashes=keys)
    if keys:
        log.info("API keys required on the generation routes (%d key(s))", len(keys))
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
