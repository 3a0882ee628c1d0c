"""Generate images with the exported one-step student (ONNX Runtime; no PyTorch needed).

    python -m src.infer "a red circle at the top on a blue background" --seed 0 --out circle.png
    python -m src.infer "a cat" "a dog" --seed 7 --out pets/            # pets/0000-seed7.png, pets/0001-seed8.png
    python -m src.infer --prompts-file prompts.txt --batch-size 16 --precision fp16 --provider cuda

Prompt i is drawn with seed (--seed + i), or with the i-th of --seeds; the same prompt and
seed give the same image on every run, whatever the batch size. The artifact comes from
`dvc repro export` (models/onnx: fp32/ and fp16/ graphs, tokenizer.json, onestep.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import manifest
from .errors import UserError, run_cli
from .fileio import atomic_file, read_json
from .launch import cpu_cores
from .noise import initial_noise
from .text import normalize_counted

OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}   # names of ort.GraphOptimizationLevel
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class Artifact:
    """A loaded, verified export folder: the ONNX session, its tokenizer, its I/O contract and version."""

    session: object
    tokenizer: object
    contract: dict
    provider: str
    precision: str
    version: str = ""
    folder: Path | None = None
    io_binding: bool = False          # on CUDA: inputs bound once, the output allocated by ONNX Runtime on the device
    workers: int = 1                  # on CPU: a batch is split over this many concurrent calls (see load_artifact)
    _pool: object = field(default=None, repr=False)

    def run(self, ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """images (B, 3, H, W) float32 in [0, 1] for token ids and initial noise."""
        if self.workers > 1 and len(ids) > 1:
            from concurrent.futures import ThreadPoolExecutor

            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-worker")
            futures = [self._pool.submit(self._run, ids[lo:hi], noise[lo:hi])
                       for lo, hi in contiguous_parts(len(ids), self.workers)]
            return np.concatenate([f.result() for f in futures])
        return self._run(ids, noise)

    def _run(self, ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        if not self.io_binding:
            return self.session.run(["images"], {"input_ids": ids, "noise": noise})[0]
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
        binding.bind_cpu_input("noise", np.ascontiguousarray(noise))
        binding.bind_output("images", device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def contiguous_parts(n: int, parts: int) -> list[tuple[int, int]]:
    """(lo, hi) of min(parts, n) contiguous slices of range(n), their sizes within one of each other."""
    return [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(n), min(parts, n))]


CONTRACT_KEYS = {"max_length": 2, "bos_id": 0, "eos_id": 0, "pad_id": 0}   # integer keys a reader needs: minimum


def contract_problems(raw: dict) -> list[str]:
    """What is missing or wrong in an onestep.json mapping (export writes more keys than these)."""
    bad = [f"{k}: expected an integer >= {low}" for k, low in CONTRACT_KEYS.items()
           if not (type(raw.get(k)) is int and raw[k] >= low)]
    shape = raw.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        bad.append("latent_shape: expected three positive integers [C, h, w]")
    return bad


def read_contract(path: Path) -> dict:
    raw = read_json(path, "the artifact is damaged, re-export it")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object (the I/O contract), got {type(raw).__name__}")
    bad = contract_problems(raw)
    if bad:
        raise UserError(f"{path}: not a valid I/O contract ({'; '.join(bad)}); re-export the artifact")
    return raw


def read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:          # tokenizers raises a bare Exception for every parse error
        raise UserError(f"{path}: not a Hugging Face tokenizers file ({err}); re-export the artifact") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def open_session(graph: Path, precision: str, provider: str, optimization: str, threads: int):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)          # no provider-bridge noise on machines without CUDA
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    opts.intra_op_num_threads = threads
    wanted = PROVIDERS["cuda"] if provider in ("auto", "cuda") else PROVIDERS["cpu"]
    wanted = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(graph), opts, providers=wanted)
    except Exception as err:          # onnxruntime's InvalidProtobuf, Fail, ... share no public base class
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{graph}: ONNX Runtime cannot open it ({first[:300]})") from None
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError("--provider cuda: CUDA is not usable here (no GPU, or onnxruntime-gpu without CUDA "
                        "libraries); use --provider cpu or auto")
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != (["input_ids", "noise"], ["images"]):
        raise UserError(f"{graph}: inputs {names[0]} and outputs {names[1]}; expected (input_ids, noise) -> images")
    return session


def load_artifact(folder: Path, precision: str = "fp32", provider: str = "auto", optimization: str = "all",
                  threads: int = 0, workers: int = 1) -> Artifact:
    """Open an export folder, verified against its manifest first. `optimization`: ONNX Runtime graph
    optimisation level (disable, basic, extended, all); `threads`: intra-op threads on CPU (0 = ONNX
    Runtime's default, one per core; with `workers`, the cores shared out). `workers` (CPU): a batch is split
    into this many parts that run at once on one session, each part on its own threads (the images are the
    same; on a 2-core machine two one-thread workers draw ~1.2-1.3x the images per second of one call on both
    cores: reports/bench). Every problem with the folder is one UserError naming the file."""
    if workers < 1:
        raise UserError(f"workers: expected a positive integer, got {workers}")
    folder = Path(folder)
    graph = folder / precision / "model.onnx"
    missing = [p for p in (graph, folder / "tokenizer.json", folder / "onestep.json") if not p.is_file()]
    if missing:
        raise UserError(f"no exported model at {folder} (missing {', '.join(map(str, missing))}); "
                        "run `dvc repro export` first, or pass --model")
    version = manifest.verify(folder, ["onestep.json", "tokenizer.json", f"{precision}/"])["version"]
    contract = read_contract(folder / "onestep.json")
    tokenizer = read_tokenizer(folder / "tokenizer.json")
    if workers > 1 and not threads:
        threads = max(1, cpu_cores() // workers)
    session = open_session(graph, precision, provider, optimization, threads)
    declared = session.get_inputs()[1].shape[1:]
    if all(isinstance(d, int) for d in declared) and list(declared) != list(contract["latent_shape"]):
        raise UserError(f"{graph}: takes noise of shape {declared}, but {folder / 'onestep.json'} says "
                        f"{contract['latent_shape']}; the files come from different exports, re-export")
    used = session.get_providers()[0]
    on_cuda = used == "CUDAExecutionProvider"
    return Artifact(session, tokenizer, contract, used, precision, version, folder, io_binding=on_cuda,
                    workers=1 if on_cuda else workers)


def tokenize(tokenizer, contract: dict, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """(N, max_length) int64 ids: BOS, prompt, EOS, padding; returns also the cut-off text of long prompts."""
    n, eos, pad = contract["max_length"], contract["eos_id"], contract["pad_id"]
    ids = np.full((len(prompts), n), pad, np.int64)
    cut = []
    for i, enc in enumerate(tokenizer.encode_batch(prompts)):
        row = enc.ids
        if len(row) > n:
            cut.append(tokenizer.decode(row[n - 1:-1]).replace("</w>", " ").strip())  # CLIP BPE word ends
            row = row[:n - 1] + [eos]
        ids[i, :len(row)] = row
    return ids, cut


def generate(art: Artifact, prompts: list[str], seeds: list[int], batch_size: int = 8):
    """Yield (index, uint8 HxWx3 image) in order; batches never change an image."""
    c = art.contract
    ids, cut = tokenize(art.tokenizer, c, prompts)
    if cut:
        print(f"warning: {len(cut)} prompt(s) longer than {c['max_length']} tokens were truncated (as diffusers "
              f"does); dropped text of the first: {cut[0]!r}", file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        noise = initial_noise(seeds[start:end], tuple(c["latent_shape"]))
        images = art.run(ids[start:end], noise)
        for j, img in enumerate(to_uint8(images)):
            yield start + j, img


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8, rounded: the one quantisation of every image."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)


def png_bytes(img: np.ndarray) -> bytes:
    """One uint8 HxWx3 image as PNG (the encoding `--out` files and the server's responses share)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- the command line


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected a positive integer, got 0")
    return value


def read_prompts(args) -> list[str]:
    prompts = [p for p in args.prompts]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts-file {path}: file not found")
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise UserError(f"--prompts-file {path}: not UTF-8 text ({err})") from None
    cleaned = [normalize_counted(p) for p in prompts]                  # as prepare does
    prompts = [p for p, _ in cleaned]
    if not prompts or any(not p for p in prompts):
        raise UserError("no prompts: give one or more non-empty prompts as arguments or with --prompts-file")
    removed = [n for _, n in cleaned if n]
    if removed:
        print(f"warning: removed {sum(removed)} control character(s) from {len(removed)} prompt(s)", file=sys.stderr)
    return prompts


def output_paths(out: str | None, prompts: list[str], seeds: list[int]) -> list[Path]:
    """One file for a single prompt given a .png path; otherwise a folder of NNNN-seedS.png."""
    if out is None:
        out = "image.png" if len(prompts) == 1 else "images"
    path = Path(out)
    if path.suffix.lower() == ".png":
        if len(prompts) != 1:
            raise UserError(f"--out {out}: {len(prompts)} prompts need a folder, not a .png file")
        folder, files = path.parent, [path]
    else:
        folder, files = path, [path / f"{i:04d}-seed{s}.png" for i, s in enumerate(seeds)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / ".write-test", "wb"):
            pass
        (folder / ".write-test").unlink()
    except OSError as err:
        raise UserError(f"--out {out}: cannot write to {folder} ({err.strerror or err})") from None
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="prompts to draw (quote each one)")
    parser.add_argument("--prompts-file", metavar="FILE", help="more prompts, one per line (blank lines skipped)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the first prompt; prompt i uses seed + i (default 0)")
    parser.add_argument("--seeds", type=non_negative_int, nargs="+", metavar="S",
                        help="one seed per prompt, instead of --seed")
    parser.add_argument("--out", metavar="PATH",
                        help="a .png file (one prompt) or a folder (default: image.png, or images/ for several)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per ONNX call (default 8)")
    parser.add_argument("--model", default="models/onnx", help="export folder (default models/onnx)")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32",
                        help="which graph: fp32 (default) or fp16 (meant for GPUs)")
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto",
                        help="ONNX Runtime device: auto = CUDA when usable, else CPU (default)")
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="CPU: split each batch over N concurrent calls sharing the cores (default 1)")
    args = parser.parse_args(argv)

    prompts = read_prompts(args)
    if args.seeds is not None and len(args.seeds) != len(prompts):
        raise UserError(f"--seeds: {len(args.seeds)} seeds for {len(prompts)} prompts (give one per prompt)")
    seeds = list(args.seeds) if args.seeds is not None else [args.seed + i for i in range(len(prompts))]
    files = output_paths(args.out, prompts, seeds)

    t0 = time.perf_counter()
    art = load_artifact(Path(args.model), args.precision, args.provider, workers=args.workers)
    t_load = time.perf_counter() - t0
    print(f"model {args.model} ({args.precision}) on {art.provider}, loaded in {t_load:.2f} s", file=sys.stderr)
    t1 = time.perf_counter()
    for i, img in generate(art, prompts, seeds, args.batch_size):
        with atomic_file(files[i], "wb") as f:
            f.write(png_bytes(img))
    dt = time.perf_counter() - t1
    where = files[0] if len(files) == 1 else files[0].parent
    print(f"{len(prompts)} image(s) in {dt:.2f} s ({len(prompts) / dt:.1f} images/s) -> {where}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
