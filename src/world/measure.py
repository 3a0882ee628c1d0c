"""Measure the embedded teacher and evaluator on the eval prompts; write reports/teacher/.

    python -m src.world.measure    # needs models/teacher, models/evaluator and prompts/eval.jsonl

For every eval prompt (its own seed, one generator per sample, so an image never depends on
the batch): the teacher at 25 DDIM steps with CFG 4.5 and at 1 step, read by the analytic
judge; the VAE's reconstruction PSNR on the ground-truth renders and the judge's accuracy on
those reconstructions; the evaluator CLIP's image-to-text retrieval accuracy.
Outputs: metrics.json, README.md (table) and grid.png (prompt | ground truth | 25 steps | 1 step).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import UserError, run_cli
from ..core.figures import sample_grid
from ..core.fileio import atomic_file, write_json
from ..core.prompts import read_prepared
from .build import retrieval_accuracy
from .judge import accuracy, read_scene, score
from .render import render
from .scene import Scene
from .training import encode_latents, uint8_from_signed


def load_eval_prompts(path: Path, limit: int | None = None) -> list[dict]:
    """World eval records (prompt, seed, attributes, scene) from prepare's JSONL."""
    records = read_prepared(path, limit)
    if "scene" not in records[0]:
        raise UserError(f"{path}: not world eval prompts (records need 'scene' and 'attributes'; "
                        "set prepare.eval.source: world)")
    return records


def load_teacher(path: Path, dtype: torch.dtype = torch.float32):
    """The teacher as a stock StableDiffusionPipeline (fp16 files are upcast to `dtype`)."""
    from diffusers import StableDiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise UserError(f"{path}: not a diffusers pipeline folder (no model_index.json); "
                        "build the embedded teacher with `python -m src.world.build`")
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def teacher_images(pipe, prompts: list[str], seeds: list[int], steps: int, cfg: float, batch: int = 64,
             desc: str = "generate") -> np.ndarray:
    """uint8 (N, H, W, 3) images; each sample's noise comes from its own seeded generator."""
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, mininterval=2):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        imgs = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=cfg,
                    generator=gens, output_type="np").images
        out.append((np.clip(imgs, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def judge_all(images: np.ndarray, attributes: list[dict]) -> dict[str, float]:
    return accuracy(score(read_scene(im), a) for im, a in zip(images, attributes))


def measure(teacher_dir: Path, evaluator_dir: Path, prompts_path: Path, out_dir: Path,
            limit: int | None = None, steps: int = 25, cfg: float = 4.5, grid_rows: int = 12) -> dict:
    """Run every measurement; write metrics.json, README.md and grid.png into `out_dir`."""
    from transformers import CLIPModel, CLIPTokenizer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    records = load_eval_prompts(prompts_path, limit)
    prompts = [r["prompt"] for r in records]
    seeds = [int(r["seed"]) for r in records]
    attrs = [r["attributes"] for r in records]
    pipe = load_teacher(teacher_dir)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    truth = np.stack([render(Scene(**r["scene"]), res, seed=r["seed"]) for r in records])
    t0 = time.perf_counter()
    many = teacher_images(pipe, prompts, seeds, steps, cfg, desc=f"teacher {steps} steps")
    wall_many = time.perf_counter() - t0
    t0 = time.perf_counter()
    one = teacher_images(pipe, prompts, seeds, 1, cfg, desc="teacher 1 step")
    wall_one = time.perf_counter() - t0

    with torch.no_grad():
        vae = pipe.vae
        rec = uint8_from_signed(torch.cat([vae.decode(z[None]).sample for z in encode_latents(vae, truth)]))
    mse = np.mean(((rec.astype(np.float64) - truth.astype(np.float64)) / 255.0) ** 2)

    if not (evaluator_dir / "config.json").is_file():
        raise UserError(f"{evaluator_dir}: no evaluator CLIP (build it with `python -m src.world.build`)")
    clip = CLIPModel.from_pretrained(evaluator_dir, dtype=torch.float32).eval()
    tok = CLIPTokenizer.from_pretrained(evaluator_dir)
    retrieval = retrieval_accuracy(clip, tok, truth, prompts, attrs)

    acc_many, acc_one = judge_all(many, attrs), judge_all(one, attrs)
    metrics = {
        f"attribute_accuracy_{steps}": acc_many["all"],
        "attribute_accuracy_1": acc_one["all"],
        "vae_psnr": 10 * math.log10(1 / max(mse, 1e-12)),
        "vae_judge_accuracy": judge_all(rec, attrs)["all"],
        "truth_judge_accuracy": judge_all(truth, attrs)["all"],
        "clip_retrieval_accuracy": retrieval["attributes"],
        "clip_retrieval_accuracy_exact": retrieval["exact"],
        "per_attribute": {f"teacher_{steps}": acc_many, "teacher_1": acc_one},
        "n_prompts": len(records), "steps": steps, "cfg": cfg, "resolution": res,
        f"seconds_per_image_{steps}": wall_many / len(records), "seconds_per_image_1": wall_one / len(records),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    rows = slice(0, grid_rows)
    grid = sample_grid({"ground truth": truth[rows], f"teacher {steps} steps": many[rows],
                        "teacher 1 step": one[rows]}, prompts[rows])
    with atomic_file(out_dir / "grid.png", "wb") as f:
        grid.save(f, format="PNG")
    with atomic_file(out_dir / "README.md") as f:
        f.write(_report(metrics, steps, cfg))
    return metrics


def _report(m: dict, steps: int, cfg: float) -> str:
    attrs = ["all", "shape", "color", "position", "size", "background"]
    lines = [
        "# Embedded teacher: measured quality",
        "",
        f"{m['n_prompts']} world eval prompts (`prompts/eval.jsonl`), {m['resolution']} px, one seeded "
        "generator per prompt. Reproduce: `python -m src.world.measure`.",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| teacher {steps} DDIM steps, CFG {cfg}: attribute accuracy (all right) | {m[f'attribute_accuracy_{steps}']:.3f} |",
        f"| teacher 1 step, CFG {cfg}: attribute accuracy | {m['attribute_accuracy_1']:.3f} |",
        f"| VAE reconstruction PSNR (ground-truth renders) | {m['vae_psnr']:.2f} dB |",
        f"| judge accuracy on VAE reconstructions | {m['vae_judge_accuracy']:.3f} |",
        f"| judge accuracy on ground-truth renders | {m['truth_judge_accuracy']:.3f} |",
        f"| evaluator CLIP image-to-text retrieval (same attributes) | {m['clip_retrieval_accuracy']:.3f} |",
        f"| evaluator CLIP image-to-text retrieval (exact caption) | {m['clip_retrieval_accuracy_exact']:.3f} |",
        f"| wall time per image, {steps} steps / 1 step | {m[f'seconds_per_image_{steps}'] * 1e3:.1f} ms / "
        f"{m['seconds_per_image_1'] * 1e3:.1f} ms |",
        "",
        "Per attribute:",
        "",
        "| generator | " + " | ".join(attrs) + " |",
        "|---|" + "---|" * len(attrs),
    ]
    for name, acc in m["per_attribute"].items():
        lines.append(f"| {name} | " + " | ".join(f"{acc.get(a, float('nan')):.3f}" for a in attrs) + " |")
    lines += ["", "![samples](grid.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"))
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator"))
    parser.add_argument("--prompts", type=Path, default=Path("prompts/eval.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("reports/teacher"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=4.5)
    args = parser.parse_args(argv)
    m = measure(args.teacher, args.evaluator, args.prompts, args.out, args.limit, args.steps, args.cfg)
    print(json.dumps({k: v for k, v in m.items() if k != "per_attribute"}, indent=2))


if __name__ == "__main__":
    run_cli(main)
