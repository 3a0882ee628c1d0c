"""Speed benchmark on this machine: distillation throughput and one-step inference vs the teacher.

    python -m src.bench                # writes reports/bench/bench.json and reports/bench/README.md
    python -m src.bench --quick        # fewer repeats (a smoke run)

Needs the pipeline's outputs: models/student (`dvc repro distill`) and models/onnx
(`dvc repro export`). Every timing is the median of several repeats after a warm-up; run it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from ..core.config import load_config
from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from ..core.prompts import read_prepared
from .common import machine, round_robin, timed


def tiny_artifact(student: Path, tiny_decoder: Path, out: Path) -> Path:
    """The student exported with the tiny decoder (export.decoder: tiny) into `out`, parity-checked as the stage
    does; the returned folder is what `python -m src.export --set export.decoder=tiny` would write."""
    from ..export import Paths, export

    cfg = load_config().export.model_copy(update={"decoder": "tiny"})
    export(cfg, Paths(student=student, out=out / "onnx", reports=out / "reports", tiny_decoder=tiny_decoder))
    return out / "onnx"


def in_parts(n: int, workers: int, pool, call: Callable[[int, int, int], object]) -> list:
    """call(k, lo, hi) for the `workers` contiguous parts k of range(n), at once on `pool`, PyTorch's threads shared
    out among them."""
    from ..serving.runtime import contiguous_parts

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        futures = [pool.submit(call, k, lo, hi) for k, (lo, hi) in enumerate(contiguous_parts(n, workers))]
        return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def bench_inference(student: Path, artifacts: dict[str, Path], teacher: str, prompts: list[str],
                    batches: tuple[int, ...], repeats: int, teacher_steps: int = 25, guidance: float = 4.5,
                    tiny_decoder: Path | None = None, workers: int = 2) -> dict:
    """Latency (s per batch) and images/s of: each ONNX artifact (`artifacts`: decoder name -> folder) in fp32
    and fp16, the PyTorch student with each decoder, the teacher N steps + CFG (PyTorch). At the largest batch
    also every generator with its batch split over `workers` concurrent calls (`_w2`: the artifact with
    `load_artifact(workers=2)`, PyTorch on one thread per part, the teacher with a scheduler per part)."""
    from ..method.onestep import one_step_images
    from ..method.teacher import alphas_cumprod, load_pipeline, with_tiny_decoder
    from ..serving.runtime import load_artifact, stream_images

    student_pipe, teacher_pipe = load_pipeline(str(student)), load_pipeline(teacher)
    pipes = {"vae": student_pipe}
    if tiny_decoder is not None:
        pipes["tiny"] = with_tiny_decoder(student_pipe, tiny_decoder, "tiny_decoder")
    abar = alphas_cumprod(student_pipe)
    arts = {(d, p): load_artifact(folder, p, "auto") for d, folder in artifacts.items() for p in ("fp32", "fp16")}
    pool = ThreadPoolExecutor(workers)
    rows: dict[str, dict] = {}
    for b in batches:
        ps, seeds = (prompts * b)[:b], list(range(b))
        runs = {f"onnx_{p}{suffix(d)}_b{b}": (lambda a=a: list(stream_images(a, ps, seeds, b)))
                for (d, p), a in arts.items()}
        runs |= {f"torch_student{suffix(d)}_b{b}": (lambda pipe=pipe: one_step_images(pipe, pipe.unet, ps, seeds, abar, b))
                 for d, pipe in pipes.items()}
        runs[f"teacher_{teacher_steps}_b{b}"] = lambda: teacher_pipe(
            ps, num_inference_steps=teacher_steps, guidance_scale=guidance, output_type="np",
            generator=[torch.Generator().manual_seed(s) for s in seeds])
        if b == max(batches) and workers > 1 and arts["vae", "fp32"].provider == "CPUExecutionProvider":
            runs |= split_runs(arts, pipes, teacher_pipe, artifacts, ps, seeds, abar, teacher_steps, guidance,
                               workers, b, pool)
        with torch.inference_mode():
            times = round_robin(runs, repeats, sparse=("teacher",), burst=3)
        rows |= {name: {"batch": b, "latency_s": round(t, 5), "images_per_s": round(b / t, 2)}
                 for name, t in times.items()}
    rows["provider"] = arts["vae", "fp32"].provider
    return rows


def split_runs(arts: dict, pipes: dict, teacher_pipe, artifacts: dict[str, Path], ps: list[str], seeds: list[int],
               abar, teacher_steps: int, guidance: float, workers: int, b: int, pool) -> dict[str, Callable]:
    """The `_w{workers}` runs: the same generators with the batch split over concurrent calls."""
    import copy

    from diffusers import StableDiffusionPipeline

    from ..method.onestep import one_step_images
    from ..serving.runtime import load_artifact, stream_images

    w = f"_w{workers}"
    runs: dict[str, Callable] = {}
    for d, folder in artifacts.items():
        art = load_artifact(folder, "fp32", "cpu", workers=workers)
        runs[f"onnx_fp32{suffix(d)}{w}_b{b}"] = lambda a=art: list(stream_images(a, ps, seeds, b))
    for d, pipe in pipes.items():
        runs[f"torch_student{suffix(d)}{w}_b{b}"] = lambda pipe=pipe: in_parts(
            b, workers, pool, lambda k, lo, hi: one_step_images(pipe, pipe.unet, ps[lo:hi], seeds[lo:hi], abar, hi - lo))
    # diffusers' schedulers keep per-call state (the step index): one scheduler per part, the modules shared
    parts = [StableDiffusionPipeline(**{**teacher_pipe.components, "scheduler": copy.deepcopy(teacher_pipe.scheduler)})
             for _ in range(workers)]
    runs[f"teacher_{teacher_steps}{w}_b{b}"] = lambda: in_parts(b, workers, pool, lambda k, lo, hi: parts[k](
        ps[lo:hi], num_inference_steps=teacher_steps, guidance_scale=guidance, output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds[lo:hi]]))
    return runs


def suffix(decoder: str) -> str:
    return "" if decoder == "vae" else f"_{decoder}"


def headlines(inf: dict, big: int, teacher_steps: int) -> dict:
    """The benchmark's ratios. Like for like: PyTorch against PyTorch, and ONNX Runtime against PyTorch for the
    same graph and decoder. `speedup_one_step_vs_teacher_25` is the best one-step artifact (any precision and
    decoder, ONNX Runtime) against the teacher's N steps in PyTorch."""
    teacher = f"teacher_{teacher_steps}"
    ips = {k.rsplit("_b", 1)[0]: v["images_per_s"] for k, v in inf.items() if isinstance(v, dict) and v["batch"] == big}
    lat1 = {k.rsplit("_b", 1)[0]: v["latency_s"] for k, v in inf.items() if isinstance(v, dict) and v["batch"] == 1}
    onnx = {k: v for k, v in ips.items() if k.startswith("onnx_") and not k.endswith("_w2")}   # one call per batch
    best = max(onnx, key=onnx.get)
    out = {"speedup_one_step_vs_teacher_25": ips[best] / ips[teacher], "best_one_step_artifact": best,
           "speedup_one_step_vs_teacher_25_b1": lat1[teacher] / min(v for k, v in lat1.items() if k.startswith("onnx_")),
           "ort_vs_torch_speedup": ips["onnx_fp32"] / ips["torch_student"],
           "ort_vs_torch_speedup_b1": lat1["torch_student"] / lat1["onnx_fp32"]}
    for d in ("", "_tiny"):
        if f"torch_student{d}" in ips:
            out[f"speedup_torch_student{d}_vs_torch_teacher_25"] = ips[f"torch_student{d}"] / ips[teacher]
        if f"onnx_fp32{d}" in ips:
            out[f"speedup_onnx_fp32{d}_vs_torch_teacher_25"] = ips[f"onnx_fp32{d}"] / ips[teacher]
    if f"{teacher}_w2" in ips:                   # every generator with its batch split over two workers
        t2 = ips[f"{teacher}_w2"]
        for d in ("", "_tiny"):
            if f"onnx_fp32{d}_w2" in ips:
                out[f"speedup_onnx_fp32{d}_w2_vs_torch_teacher_25_w2"] = ips[f"onnx_fp32{d}_w2"] / t2
                out[f"ort_vs_torch_speedup{d}_w2"] = ips[f"onnx_fp32{d}_w2"] / ips[f"torch_student{d}_w2"]
        out["workers_gain"] = {k[:-3]: ips[k] / ips[k[:-3]] for k in ips if k.endswith("_w2") and k[:-3] in ips}
    if "onnx_fp32_tiny" in ips and "torch_student_tiny" in ips:
        out["ort_vs_torch_speedup_tiny"] = ips["onnx_fp32_tiny"] / ips["torch_student_tiny"]
        out["ort_vs_torch_speedup_tiny_b1"] = lat1["torch_student_tiny"] / lat1["onnx_fp32_tiny"]
    return out


def bench_ort_options(onnx_dir: Path, prompts: list[str], batch: int, repeats: int) -> dict:
    """images/s of the fp32 graph under each graph optimisation level and CPU thread count."""
    from ..serving.runtime import OPTIMIZATION, load_artifact, stream_images

    ps, seeds = (prompts * batch)[:batch], list(range(batch))
    out = {}
    for threads in (1, 0):
        for level in OPTIMIZATION:
            art = load_artifact(onnx_dir, "fp32", "cpu", optimization=level, threads=threads)
            t = timed(lambda: list(stream_images(art, ps, seeds, batch)), repeats)
            out[f"{level}_threads{threads or 'all'}"] = round(batch / t, 1)
    return out


def bench_distill(steps: int) -> dict:
    """Steps/s, samples/s and peak memory of the default distillation (params.yaml), on scratch folders."""
    from ..distill import Paths, distill

    cfg = load_config()
    d = cfg.distill.model_copy(update={"steps": steps, "val_every": 10**9, "checkpoint_every": 10**9, "processes": 1})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r = distill(d, cfg.lr, cfg.seed, Paths(eval_prompts=tmp / "none.jsonl", checkpoints=tmp / "ck",
                                               student=tmp / "student", reports=tmp / "rep"))
    return {"distill_steps_per_s": r["steps_per_s"], "distill_samples_per_s": r["samples_per_s"],
            "distill_peak_memory_mb": r["peak_memory_mb"], "distill_batch_size": d.batch_size,
            "distill_bench_steps": steps}


def report(b: dict, big: int) -> str:
    inf = b["inference"]
    lines = [f"# Speed benchmark ({b['machine']})", "",
             f"`python -m src.bench`, {b['date']}. Median of repeats after a warm-up, every generator timed in turns (the third of three calls in a row; the teacher once every other turn). ONNX Runtime provider: "
             f"{inf['provider']}.", "",
             "| generator | batch | latency (s / batch) | images / s |", "|---|---|---|---|"]
    for name, row in inf.items():
        if isinstance(row, dict):
            lines.append(f"| {name.rsplit('_b', 1)[0]} | {row['batch']} | {row['latency_s']:.4f} | "
                         f"{row['images_per_s']:.1f} |")
    lines += ["", f"Ratios of images/s at batch {big} (batch 1: of latency). PyTorch is compared with PyTorch, and "
              "ONNX Runtime with PyTorch for the same graph and decoder; `tiny` is the student decoded by the "
              "tiny decoder (`export.decoder: tiny`; its quality cost: reports/eval/README.md).", "",
              "| headline | value |", "|---|---|",
              f"| best one-step artifact ({b['best_one_step_artifact']}, ONNX Runtime) vs teacher 25 steps + CFG "
              f"(PyTorch), batch {big} | **{b['speedup_one_step_vs_teacher_25']:.0f}x** |",
              f"| same at batch 1 (latency) | {b['speedup_one_step_vs_teacher_25_b1']:.0f}x |"]
    for d, what in (("", "VAE"), ("_tiny", "tiny decoder")):
        if f"speedup_torch_student{d}_vs_torch_teacher_25" in b:
            lines.append(f"| PyTorch student ({what}) vs PyTorch teacher 25 steps + CFG, batch {big} | "
                         f"{b[f'speedup_torch_student{d}_vs_torch_teacher_25']:.1f}x |")
        if f"speedup_onnx_fp32{d}_vs_torch_teacher_25" in b:
            lines.append(f"| ONNX Runtime fp32 ({what}) vs PyTorch teacher 25 steps + CFG, batch {big} | "
                         f"{b[f'speedup_onnx_fp32{d}_vs_torch_teacher_25']:.1f}x |")
    lines += [f"| ONNX Runtime fp32 vs PyTorch student, VAE, batch {big} | **{b['ort_vs_torch_speedup']:.2f}x** |",
              f"| same at batch 1 | {b['ort_vs_torch_speedup_b1']:.2f}x |"]
    if "ort_vs_torch_speedup_tiny" in b:
        lines += [f"| ONNX Runtime fp32 vs PyTorch student, tiny decoder, batch {big} | "
                  f"**{b['ort_vs_torch_speedup_tiny']:.2f}x** |",
                  f"| same at batch 1 | {b['ort_vs_torch_speedup_tiny_b1']:.2f}x |"]
    if "workers_gain" in b:
        best_w2 = max(v for k, v in b.items() if k.endswith("_w2_vs_torch_teacher_25_w2"))
        lines += [f"| best one-step artifact vs teacher, every generator's batch split over two one-thread workers | "
                  f"{best_w2:.1f}x |",
                  f"| ONNX Runtime fp32 vs PyTorch student, VAE, both split over two workers | "
                  f"{b['ort_vs_torch_speedup_w2']:.2f}x |"]
        if "ort_vs_torch_speedup_tiny_w2" in b:
            lines.append(f"| ONNX Runtime fp32 vs PyTorch student, tiny decoder, both split over two workers | "
                         f"{b['ort_vs_torch_speedup_tiny_w2']:.2f}x |")
    lines += [
              f"| distillation steps/s (batch {b['distill_batch_size']}) | {b['distill_steps_per_s']:.2f} |",
              f"| distillation samples/s | {b['distill_samples_per_s']:.1f} |",
              f"| distillation peak memory (MB) | {b['distill_peak_memory_mb']:.0f} |", "",
              f"ONNX Runtime session options, fp32 graph on CPU, images/s at batch {big} (`infer.load_artifact`):", "",
              "| graph optimisation | 1 thread | all cores |", "|---|---|---|"]
    opts = b["ort_options"]
    for level in ("disable", "basic", "extended", "all"):
        lines.append(f"| {level} | {opts[f'{level}_threads1']} | {opts[f'{level}_threadsall']} |")
    if "workers_gain" in b:
        lines += ["", f"Splitting a batch of {big} over two concurrent one-thread calls (`_w2`; the artifact's "
                  "`workers: 2`, PyTorch with one thread per part, the teacher with a scheduler per part), images/s "
                  "against one call on all cores. Every generator gains, the teacher too, so the like-for-like "
                  "ratios above use one call per batch:", "", "| generator | gain |", "|---|---|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in b["workers_gain"].items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--batch", type=int, default=64, help="the larger batch size (default 64)")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    for needed, stage in ((Path("models/student/model_index.json"), "distill"),
                          (Path("models/onnx/fp32/model.onnx"), "export")):
        if not needed.is_file():
            raise UserError(f"{needed} not found: run `dvc repro {stage}` first")
    cfg = load_config()
    prompts = [r["prompt"] for r in read_prepared(Path("prompts/eval.jsonl"), 64)]
    repeats = 3 if args.quick else 10
    tiny = Path(cfg.tiny_decoder) if cfg.tiny_decoder else None
    big = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"vae": Path("models/onnx")}
        if tiny is not None:
            artifacts["tiny"] = tiny_artifact(Path("models/student"), tiny, Path(tmp))
        inf = bench_inference(Path("models/student"), artifacts, cfg.distill.teacher, prompts, (1, big), repeats,
                              cfg.evaluate.teacher_steps, cfg.evaluate.guidance_scale, tiny)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "inference": inf,
              **headlines(inf, big, cfg.evaluate.teacher_steps),
              "ort_options": bench_ort_options(Path("models/onnx"), prompts, big, repeats),
              **bench_distill(20 if args.quick else 60)}
    write_json(args.out / "bench.json", result)
    with atomic_file(args.out / "README.md") as f:
        f.write(report(result, big))
    print(report(result, big))


if __name__ == "__main__":
    run_cli(main)
