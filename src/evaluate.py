"""The evaluate stage: teacher 1 step, teacher N steps with CFG and the student, side by side.

    python -m src.evaluate            # as the DVC stage `evaluate` runs it

World mode (default): for every eval prompt, with its own seed, each generator draws one
image (saved as PNG under eval_images/<generator>/, so an interrupted run continues where
it stopped); ground-truth renders are the references. Metrics per generator:
  fid                 clean-fid with the embedded evaluator CLIP's image encoder as the feature
                      extractor, against the ground-truth renders of the same prompts;
  clip_score          mean cosine similarity of image and prompt embeddings (evaluator CLIP);
  attribute_accuracy  the analytic judge, all attributes right (and per attribute).
Writes reports/eval/metrics.json ({generator: {metric: value}}), reports/eval/README.md and
reports/eval/grid.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .config import Config, EvaluateConfig, add_config_args, dump, load_config
from .errors import UserError, run_cli
from .fileio import atomic_file, write_json
from .figures import sample_grid
from .prepare import read_prepared


@dataclass
class Paths:
    eval_prompts: Path = Path("prompts/eval.jsonl")
    student: Path = Path("models/student")
    images: Path = Path("eval_images")
    reports: Path = Path("reports/eval")


Generator = Callable[[list[str], list[int]], np.ndarray]  # prompts, seeds -> uint8 (N, H, W, 3)


def image_path(folder: Path, record: dict) -> Path:
    return folder / f"{int(record['id']):06d}.png"


def tree_digest(*items: object) -> str:
    """SHA-256 over values and, for folders/files among them, every file's bytes (sorted by path)."""
    h = hashlib.sha256()
    for item in items:
        path = Path(item) if isinstance(item, (str, Path)) else None
        if path is not None and path.exists():
            for f in sorted([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]):
                h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
                h.update(f.read_bytes())
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def fill_folder(folder: Path, records: list[dict], generate: Generator, batch_size: int, desc: str,
                fingerprint: str) -> None:
    """Generate the images that are not in `folder` yet, each written atomically.

    The folder remembers what made it (`fingerprint`: models, settings, prompts): a rerun with
    the same inputs continues where an interrupted one stopped; other inputs start it afresh.
    """
    marker = folder / ".fingerprint"
    if folder.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)
    todo = [r for r in records if not image_path(folder, r).is_file()]
    for i in tqdm(range(0, len(todo), batch_size), desc=desc, disable=None, mininterval=2):
        chunk = todo[i:i + batch_size]
        images = generate([r["prompt"] for r in chunk], [int(r["seed"]) for r in chunk])
        for r, img in zip(chunk, images):
            with atomic_file(image_path(folder, r), "wb") as f:
                Image.fromarray(img).save(f, format="PNG")


def load_folder(folder: Path, records: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(image_path(folder, r)).convert("RGB")) for r in records])


class EvaluatorFeatures(torch.nn.Module):
    """clean-fid feature extractor: evaluator CLIP image embeddings of [0, 255] float batches."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.float() / 127.5 - 1.0  # the evaluator's input range (mean 0.5, std 0.5)
        return self.clip.get_image_features(pixel_values=pixels).pooler_output


def world_fid(gen_dir: Path, ref_dir: Path, clip, batch_size: int = 128) -> float:
    """FID in the evaluator's feature space (clean-fid; images stay at the world resolution)."""
    from cleanfid import fid

    return float(fid.compute_fid(str(gen_dir), str(ref_dir), mode="clean", custom_feat_extractor=EvaluatorFeatures(clip),
                                 custom_fn_resize=lambda x: x, device=torch.device("cpu"), num_workers=0,
                                 batch_size=batch_size, verbose=False))


@torch.no_grad()
def clip_score(clip, processor, images: np.ndarray, prompts: list[str], batch_size: int = 256) -> float:
    """Mean cosine similarity between each image and its own prompt."""
    sims = []
    for i in range(0, len(prompts), batch_size):
        inputs = processor(text=prompts[i:i + batch_size], images=list(images[i:i + batch_size]),
                           return_tensors="pt", padding="max_length", truncation=True)
        img = clip.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = clip.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        sims.append(torch.nn.functional.cosine_similarity(img, txt).numpy())
    return float(np.concatenate(sims).mean())


def judge(images: np.ndarray, records: list[dict]) -> dict[str, float]:
    from .world import accuracy, read_scene, score

    acc = accuracy(score(read_scene(im), r["attributes"]) for im, r in zip(images, records))
    return {("attribute_accuracy" if k == "all" else f"attribute_accuracy_{k}"): v for k, v in acc.items()}


def make_generators(cfg: EvaluateConfig, teacher_dir: str, student_dir: Path, batch_size: int) -> dict[str, Generator]:
    """The three generators of the comparison, on the same prompts and seeds."""
    from .onestep import generate as one_step
    from .teacher import alphas_cumprod, load_pipeline

    teacher = load_pipeline(teacher_dir)
    if not (student_dir / "model_index.json").is_file():
        raise UserError(f"{student_dir}: no student pipeline (run `dvc repro distill` first)")
    student = load_pipeline(str(student_dir))
    abar = alphas_cumprod(teacher)

    def teacher_gen(steps: int) -> Generator:
        def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
            out = teacher(prompts, num_inference_steps=steps, guidance_scale=cfg.guidance_scale, output_type="np",
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images
            return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        return run

    return {
        "teacher_1": teacher_gen(1),
        f"teacher_{cfg.teacher_steps}": teacher_gen(cfg.teacher_steps),
        "student_1": lambda p, s: one_step(student, student.unet, p, s, abar, batch_size),
    }


def evaluate(cfg: EvaluateConfig, teacher_dir: str, paths: Paths = Paths()) -> dict:
    """Generate (or reuse) every generator's images, compute the metrics, write the reports."""
    from transformers import CLIPModel, CLIPProcessor

    records = read_prepared(paths.eval_prompts, cfg.limit)
    if cfg.mode == "world" and not all("scene" in r for r in records):
        raise UserError(f"{paths.eval_prompts}: world mode needs world eval prompts (prepare.eval.source: world)")
    evaluator_dir = Path(cfg.evaluator)
    if not (evaluator_dir / "config.json").is_file():
        raise UserError(f"evaluate.evaluator: {evaluator_dir} is not a CLIPModel folder")
    clip = CLIPModel.from_pretrained(evaluator_dir, dtype=torch.float32).eval()
    processor = CLIPProcessor.from_pretrained(evaluator_dir)

    generators = make_generators(cfg, teacher_dir, paths.student, cfg.batch_size)
    prompts_digest = tree_digest(paths.eval_prompts, cfg.limit)
    teacher_digest = tree_digest(teacher_dir)
    made_by = {"teacher_1": (teacher_digest, 1, cfg.guidance_scale),
               f"teacher_{cfg.teacher_steps}": (teacher_digest, cfg.teacher_steps, cfg.guidance_scale),
               "student_1": (tree_digest(paths.student),)}
    timings: dict[str, float] = {}
    ref_dir = paths.images / "reference"
    _render_references(ref_dir, records, clip.config.vision_config.image_size, tree_digest("reference", prompts_digest))
    metrics: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {"ground truth": load_folder(ref_dir, records)}
    for name, gen in generators.items():
        folder = paths.images / name
        t0 = time.perf_counter()
        fill_folder(folder, records, gen, cfg.batch_size, name, tree_digest(name, prompts_digest, *made_by[name]))
        timings[name] = time.perf_counter() - t0
        imgs = load_folder(folder, records)
        images[name] = imgs
        metrics[name] = {"fid": world_fid(folder, ref_dir, clip),
                         "clip_score": clip_score(clip, processor, imgs, [r["prompt"] for r in records]),
                         **judge(imgs, records)}
    prompts = [r["prompt"] for r in records]
    metrics["ground_truth"] = {"clip_score": clip_score(clip, processor, images["ground truth"], prompts),
                               **judge(images["ground truth"], records)}
    write_json(paths.reports / "metrics.json", metrics)
    with atomic_file(paths.reports / "README.md") as f:
        f.write(report(metrics, len(records), cfg, timings))
    grid = sample_grid({k: v[:cfg.grid_rows] for k, v in images.items()}, prompts[:cfg.grid_rows])
    with atomic_file(paths.reports / "grid.png", "wb") as f:
        grid.save(f, format="PNG")
    return metrics


def _render_references(folder: Path, records: list[dict], resolution: int, fingerprint: str) -> None:
    from .world import render
    from .world.scene import Scene

    by_seed = {int(r["seed"]): r for r in records}
    fill_folder(folder, records, lambda prompts, seeds: np.stack(
        [render(Scene(**by_seed[s]["scene"]), resolution, seed=s) for s in seeds]), 256, "reference", fingerprint)


def report(metrics: dict, n: int, cfg: EvaluateConfig, timings: dict[str, float]) -> str:
    attrs = ["shape", "color", "position", "size", "background"]
    lines = [f"# Evaluation ({cfg.mode} mode, {n} eval prompts)", "",
             "Same prompts and per-prompt seeds for every generator. FID and CLIP score use the embedded "
             "evaluator CLIP; attribute accuracy is the analytic judge (all attributes right).", "",
             "| generator | FID | CLIP score | attribute accuracy | " + " | ".join(attrs) + " | s / image |",
             "|---|---|---|---|" + "---|" * (len(attrs) + 1)]
    for name, m in metrics.items():
        fid = f"{m['fid']:.2f}" if "fid" in m else "-"
        per = " | ".join(f"{m.get('attribute_accuracy_' + a, float('nan')):.3f}" for a in attrs)
        t = f"{timings[name] / n:.4f}" if name in timings else "-"
        lines.append(f"| {name} | {fid} | {m['clip_score']:.4f} | {m['attribute_accuracy']:.3f} | {per} | {t} |")
    lines += ["", "s / image: generation wall time of this run divided by the prompts (0 when the images were reused).",
              "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    args = parser.parse_args(argv)
    config: Config = load_config(args.params, args.overrides)
    if args.dry_run:
        print(dump(config.evaluate), end="")
        return
    metrics = evaluate(config.evaluate, config.distill.teacher)
    for name, m in metrics.items():
        print(f"{name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in ("fid", "clip_score", "attribute_accuracy") if k in m))


if __name__ == "__main__":
    run_cli(main)
