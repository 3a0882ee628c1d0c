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
from pathlib import Path

from .core.errors import UserError, run_cli
from .core.fileio import atomic_file
from .core.text import normalize_counted
from .serving.runtime import load_artifact, png_bytes, stream_images

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
    for i, img in stream_images(art, prompts, seeds, args.batch_size):
        with atomic_file(files[i], "wb") as f:
            f.write(png_bytes(img))
    dt = time.perf_counter() - t1
    where = files[0] if len(files) == 1 else files[0].parent
    print(f"{len(prompts)} image(s) in {dt:.2f} s ({len(prompts) / dt:.1f} images/s) -> {where}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
