"""The evaluate stage: teacher 1 step, teacher N steps with CFG and the student, side by side.

    python -m src.evaluate            # as the DVC stage `evaluate` runs it
    accelerate launch --num_processes 8 -m src.evaluate     # generation split over 8 processes (GPUs)

With several processes each draws its share of the missing images (the same images one
process would draw, batched the same way); the first process then computes the metrics.

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

import gc
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .core.config import EvaluateConfig, stage_config
from .core.errors import UserError, run_cli
from .core.figures import sample_grid
from .core.fileio import atomic_file, hash_file, write_json
from .core.prompts import read_prepared
from .method.noise import CONVENTION, initial_noise
from .scoring.metrics import (
    COCO_SIZE,
    center_crop_resize,
    clip_paths,
    clip_similarities,
    feature_stats,
    features,
    file_listing_key,
    folder_stats,
    frechet,
    judge_per_image,
    load_clip,
    load_inception,
    mean_interval,
    resampled_interval,
    world_features,
)


@dataclass(frozen=True)
class Paths:
    eval_prompts: Path = Path("prompts/eval.jsonl")
    student: Path = Path("models/student")
    images: Path = Path("eval_images")
    reports: Path = Path("reports/eval")
    tiny_decoder: Path | None = None      # the top-level tiny_decoder: adds "<student_name>_1_tiny"
    student_name: str = "student"         # the student's rows: <student_name>_1 (and _1_tiny)


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
                hash_file(h, f)
        else:
            h.update(repr(item).encode())
    return h.hexdigest()


def fill_folder(folder: Path, records: list[dict], generate: Generator, batch_size: int, desc: str,
                fingerprint: str, transform: Callable[[np.ndarray], np.ndarray] | None = None, shards=None) -> None:
    """Generate the images that are not in `folder` yet, each written atomically.

    The folder remembers what made it (`fingerprint`: models, settings, prompts): a rerun with
    the same inputs continues where an interrupted one stopped; other inputs start it afresh.
    `shards` (an accelerate PartialState): process k of N draws batches k, k + N, ... of the
    missing images, batched exactly as one process would batch them.
    """
    shards = shards or _single_process()
    marker = folder / ".fingerprint"
    if shards.is_main_process:
        if folder.exists() and (not marker.is_file() or marker.read_text() != fingerprint):
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(fingerprint)
    shards.wait_for_everyone()
    todo = [r for r in records if not image_path(folder, r).is_file()]
    shards.wait_for_everyone()        # every process has listed the same missing images before any is written
    starts = list(range(0, len(todo), batch_size))[shards.process_index::shards.num_processes]
    for i in tqdm(starts, desc=desc, disable=None if shards.is_main_process else True, mininterval=2):
        chunk = todo[i:i + batch_size]
        images = generate([r["prompt"] for r in chunk], [int(r["seed"]) for r in chunk])
        for r, img in zip(chunk, images):
            img = transform(img) if transform is not None else img
            with atomic_file(image_path(folder, r), "wb") as f:
                Image.fromarray(img).save(f, format="PNG")


class _single_process:
    """The PartialState interface for one process, without initialising accelerate."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self) -> None:
        pass


def process_state():
    """accelerate's process group when launched by `accelerate launch` / torchrun, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState()
    return _single_process()


def load_folder(folder: Path, records: list[dict]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(image_path(folder, r)).convert("RGB")) for r in records])


def image_batches(folder: Path, records: list[dict], batch_size: int):
    """(images, prompts) in batches, read lazily (30,000 images do not fit in memory at once)."""
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        yield list(load_folder(folder, chunk)), [r["prompt"] for r in chunk]


class OnePipeline:
    """Loads pipelines by name and holds one at a time: asking for another frees the first. An SDXL teacher
    and its student are ~14 GB each in float32; held together they pass a 24 GB machine."""

    def __init__(self, loaders: dict[str, Callable[[], object]]):
        self.loaders, self.name, self.pipe = loaders, None, None

    def __call__(self, name: str):
        if name != self.name:
            self.pipe = self.name = None
            gc.collect()
            self.pipe, self.name = self.loaders[name](), name
        return self.pipe


def make_generators(cfg: EvaluateConfig, teacher_dir: str, student_dir: Path, batch_size: int,
                    device: torch.device = torch.device("cpu"), tiny_decoder: Path | None = None,
                    student_name: str = "student") -> dict[str, Generator]:
    """The generators of the comparison, on the same prompts and seeds: the teacher in 1 and N steps, the
    student, and (with a tiny decoder) the student decoded by it, as `export.decoder: tiny` ships it. Each
    loads its pipeline when it first draws (a generator whose images are all reused loads nothing), one
    pipeline in memory at a time."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from .method.onestep import one_step_images
    from .method.teacher import (alphas_cumprod, check_pipeline_folder, load_pipeline, local_folder,
                                 with_tiny_decoder)

    if not (student_dir / "model_index.json").is_file():
        raise UserError(f"{student_dir}: no student pipeline (run `dvc repro distill` first)")
    teacher_path = local_folder(teacher_dir)
    check_pipeline_folder(teacher_path)                 # the folder is checked before anything is drawn
    abar = alphas_cumprod(SimpleNamespace(scheduler=DDPMScheduler.from_pretrained(teacher_path, subfolder="scheduler")))

    def config(folder: Path, part: str) -> dict:
        return json.loads((folder / part / "config.json").read_text())

    def load_student():
        return load_pipeline(str(student_dir)).to(device)

    pipes = OnePipeline({"teacher": lambda: load_pipeline(teacher_dir).to(device), "student": load_student,
                         "student_tiny": lambda: with_tiny_decoder(load_student(), tiny_decoder, "tiny_decoder")})

    # Every generator draws at the student's size (distill.resolution; the teacher's own unless set).
    side = config(student_dir, "unet")["sample_size"]
    shape = (config(teacher_path, "unet")["in_channels"], side, side)
    pixels = side * 2 ** (len(config(teacher_path, "vae")["block_out_channels"]) - 1)

    def teacher_gen(steps: int) -> Generator:
        # The same seed -> noise convention as the student (src/method/noise.py): the teacher and the
        # student start every prompt from the same latent (the pipeline scales it by init_noise_sigma).
        def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
            out = pipes("teacher")(prompts, num_inference_steps=steps, guidance_scale=cfg.guidance_scale,
                                   output_type="np", height=pixels, width=pixels,
                                   latents=torch.from_numpy(initial_noise(seeds, shape))).images
            return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        return run

    def student_gen(name: str) -> Generator:
        def run(prompts: list[str], seeds: list[int]) -> np.ndarray:
            pipe = pipes(name)
            return one_step_images(pipe, pipe.unet, prompts, seeds, abar, batch_size, device)
        return run

    gens = {
        "teacher_1": teacher_gen(1),
        f"teacher_{cfg.teacher_steps}": teacher_gen(cfg.teacher_steps),
        f"{student_name}_1": student_gen("student"),
    }
    if tiny_decoder is not None:
        gens[f"{student_name}_1_tiny"] = student_gen("student_tiny")   # the same modules, another decoder
    return gens


def evaluate(cfg: EvaluateConfig, teacher_dir: str, paths: Paths = Paths()) -> dict:
    """Generate (or reuse) every generator's images, compute the metrics, write the reports."""
    records = checked_records(cfg, paths)
    shards = process_state()
    if cfg.mode == "coco" and shards.num_processes > 1:
        device = shards.device                          # each process its own GPU (or the CPU)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.mode == "coco" else "cpu")
    names = generate_all(cfg, teacher_dir, paths, records, device, shards)
    shards.wait_for_everyone()
    if not shards.is_main_process:      # one process measures
        return {}

    # per prompt, then each metric with its bootstrap interval over the prompts
    scorer = load_clip(cfg.evaluator if cfg.mode == "world" else cfg.coco.clip, device)
    measure = measure_world if cfg.mode == "world" else measure_coco
    measured, reference_stats, reference = measure(cfg, paths, records, names, scorer, device)
    fids = {name: fid_statistic(m.features, reference_stats) for name, m in measured.items() if m.features is not None}
    metrics = {name: point_metrics(m, fids.get(name)) for name, m in measured.items()}
    teacher_n = f"teacher_{cfg.teacher_steps}"
    uncertainty = intervals(measured, fids, metrics, teacher_n, cfg) if cfg.bootstrap else {}
    write_reports(cfg, paths, records, names, metrics, uncertainty, reference, scorer.name)
    return metrics


def checked_records(cfg: EvaluateConfig, paths: Paths) -> list[dict]:
    """The eval prompts, refused by name when they do not fit the mode (or COCO's inputs are missing)."""
    if cfg.mode == "coco":
        check_coco_inputs(cfg, paths)
    records = read_prepared(paths.eval_prompts, cfg.limit)
    if cfg.mode == "world" and not all("scene" in r for r in records):
        raise UserError(f"{paths.eval_prompts}: world mode needs world eval prompts (prepare.eval.source: world)")
    if cfg.mode == "coco" and not all("image_id" in r for r in records):
        raise UserError(f"{paths.eval_prompts}: COCO mode needs COCO eval prompts (prepare.eval.source: coco, "
                        "path: captions_val2014.json, limit: 30000, dedupe: false)")
    return records


def generate_all(cfg: EvaluateConfig, teacher_dir: str, paths: Paths, records: list[dict], device: torch.device,
                 shards) -> list[str]:
    """Every generator's images, on the same prompts and per-prompt seeds (split over processes); a folder
    already drawn by the same model, prompts and settings is reused. Returns the generators' names."""
    generators = make_generators(cfg, teacher_dir, paths.student, cfg.batch_size, device, paths.tiny_decoder,
                                 paths.student_name)
    prompts_digest = tree_digest(paths.eval_prompts, cfg.limit, cfg.mode)
    side = json.loads((paths.student / "unet" / "config.json").read_text())["sample_size"]   # the drawn size
    teacher_digest = (tree_digest(teacher_dir), side)
    made_by = {"teacher_1": (*teacher_digest, 1, cfg.guidance_scale, CONVENTION),
               f"teacher_{cfg.teacher_steps}": (*teacher_digest, cfg.teacher_steps, cfg.guidance_scale, CONVENTION),
               f"{paths.student_name}_1": (tree_digest(paths.student), CONVENTION),
               f"{paths.student_name}_1_tiny": (tree_digest(paths.student), tree_digest(paths.tiny_decoder),
                                                CONVENTION)}
    transform = center_crop_resize if cfg.mode == "coco" else None
    for name, gen in generators.items():
        fill_folder(paths.images / name, records, gen, cfg.batch_size, name,
                    tree_digest(name, prompts_digest, *made_by[name]), transform, shards)
    return list(generators)             # the pipelines' memory goes with `generators`, before the scorers load


def measure_world(cfg: EvaluateConfig, paths: Paths, records: list[dict], names: list[str], scorer,
                  device: torch.device):
    """World mode: per-image CLIP similarity, judge scores and evaluator features of every generator and of
    the ground-truth renders; FID against the renders of the same prompts (paired per image)."""
    prompts = [r["prompt"] for r in records]
    ref_dir = paths.images / "reference"
    _render_references(ref_dir, records, scorer.model.config.vision_config.image_size,
                       tree_digest("reference", tree_digest(paths.eval_prompts, cfg.limit, cfg.mode)))
    ref_features = world_features([image_path(ref_dir, r) for r in records], scorer.model)   # once, for all
    measured: dict[str, Measured] = {}
    for name in [*names, "ground_truth"]:
        folder = ref_dir if name == "ground_truth" else paths.images / name
        imgs = load_folder(folder, records)
        feats = None if name == "ground_truth" else world_features([image_path(folder, r) for r in records],
                                                                    scorer.model)
        batches = [(list(imgs[i:i + 256]), prompts[i:i + 256]) for i in range(0, len(imgs), 256)]
        measured[name] = Measured(clip_similarities(scorer, batches), judge_per_image(imgs, records), feats)
    return measured, lambda i: feature_stats(ref_features[i]), load_folder(ref_dir, records[:cfg.grid_rows])


def measure_coco(cfg: EvaluateConfig, paths: Paths, records: list[dict], names: list[str], scorer,
                 device: torch.device):
    """COCO mode: CLIP similarity and Inception features of every generator; FID against all val2014 images."""
    inception = load_inception(cfg.coco.inception, device)
    workers = min(8, os.cpu_count() or 1)
    ref_stats = folder_stats(Path(cfg.coco.images), inception, device=device, image_transform=center_crop_resize,
                             num_workers=workers, cache=paths.images / "coco_reference_stats.npz",
                             cache_key=file_listing_key(Path(cfg.coco.images), COCO_SIZE,
                                                        Path(cfg.coco.inception).stat().st_size),
                             desc="reference features")
    measured: dict[str, Measured] = {}
    for name in names:
        folder = paths.images / name
        feats = features([image_path(folder, r) for r in records], inception, device=device,
                         image_transform=center_crop_resize, num_workers=workers, desc=f"{name} features")
        measured[name] = Measured(clip_similarities(scorer, image_batches(folder, records, 64)), {}, feats)
    reference = coco_images(Path(cfg.coco.images), records[:cfg.grid_rows])
    return measured, lambda i: ref_stats, reference      # every val2014 image: a fixed reference


def write_reports(cfg: EvaluateConfig, paths: Paths, records: list[dict], names: list[str], metrics: dict,
                  uncertainty: dict, reference: np.ndarray | None, clip_name: str) -> None:
    """metrics.json, intervals.json, the README table and the sample grid."""
    write_json(paths.reports / "metrics.json", metrics)
    write_json(paths.reports / "intervals.json", uncertainty)
    with atomic_file(paths.reports / "README.md") as f:
        f.write(report(metrics, uncertainty, len(records), cfg, clip_name))
    shown = {"reference": reference} if reference is not None else {}
    shown |= {name: load_folder(paths.images / name, records[:cfg.grid_rows]) for name in names}
    grid = sample_grid(shown, [r["prompt"] for r in records[:cfg.grid_rows]])
    with atomic_file(paths.reports / "grid.png", "wb") as f:
        grid.save(f, format="PNG")


@dataclass
class Measured:
    """One generator's per-prompt measurements, in the eval records' order."""

    clip: np.ndarray                    # (N,) cosine of each image with its own prompt
    judge: dict[str, np.ndarray]        # world: per attribute 1 / 0 / NaN (not named); COCO: empty
    features: np.ndarray | None         # (N, D) FID features (None: the references themselves)


def fid_statistic(feats: np.ndarray, reference_stats: Callable[[np.ndarray], tuple]) -> Callable[[np.ndarray], float]:
    """FID as a function of which prompts count: each image against the reference of its own prompt (world), or
    against the fixed val2014 statistics (COCO)."""
    return lambda i: frechet(feature_stats(feats[i]), reference_stats(i))


def point_metrics(m: Measured, fid: Callable[[np.ndarray], float] | None) -> dict[str, float]:
    """A generator's metrics over every prompt."""
    out = {"fid": fid(np.arange(len(m.clip)))} if fid is not None else {}
    return out | {"clip_score": float(m.clip.mean())} | {k: _nanmean(v) for k, v in m.judge.items()}


def _nanmean(values: np.ndarray) -> float:
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")


def columns(m: Measured) -> dict[str, np.ndarray]:
    """The per-prompt metrics (means over prompts): CLIP score and the judge's attributes."""
    return {"clip_score": m.clip, **m.judge}


def intervals(measured: dict[str, Measured], fids: dict[str, Callable[[np.ndarray], float]], point: dict,
              teacher: str, cfg: EvaluateConfig) -> dict:
    """Bootstrap intervals over the prompts of every metric, and of each student's difference from `teacher` on
    the same resampled prompts (paired: what says whether it is better, level or worse). Per-prompt means: BCa;
    FID: the resampled spread around the measured value (src/scoring/metrics.py, resampled_interval)."""
    n = len(next(iter(measured.values())).clip)
    fid_resamples = cfg.coco.fid_resamples if cfg.mode == "coco" else cfg.bootstrap   # COCO: 2048-d roots
    opts = {"confidence": cfg.confidence, "seed": 0}
    out: dict = {"confidence": cfg.confidence, "resamples": cfg.bootstrap, "fid_resamples": fid_resamples,
                 "prompts": n, "intervals": {}, "vs_teacher": {"teacher": teacher}}
    students = [k for k in measured if not k.startswith("teacher_") and k != "ground_truth"] \
        if teacher in measured else []
    with tqdm(total=len(measured) + len(students), desc="intervals", disable=None, mininterval=2) as bar:
        for name, m in measured.items():
            out["intervals"][name] = {k: list(mean_interval(v, resamples=cfg.bootstrap, **opts))
                                      for k, v in columns(m).items()}
            if name in fids and fid_resamples:
                out["intervals"][name]["fid"] = list(resampled_interval(fids[name], n, resamples=fid_resamples,
                                                                       floor=0.0, **opts))
            bar.update()
        for name in students:
            base = columns(measured[teacher])
            diff = {k: {"difference": point[name][k] - point[teacher][k],
                        "interval": list(mean_interval(v, base[k], resamples=cfg.bootstrap, **opts))}
                    for k, v in columns(measured[name]).items() if k in base}
            if name in fids and teacher in fids and fid_resamples:
                f, g = fids[name], fids[teacher]
                diff["fid"] = {"difference": point[name]["fid"] - point[teacher]["fid"],
                               "interval": list(resampled_interval(lambda i: f(i) - g(i), n,
                                                                   resamples=fid_resamples, **opts))}
            out["vs_teacher"][name] = diff
            bar.update()
    return out


def verdict(metric: str, low: float, high: float) -> str:
    """better / worse than the teacher when the whole interval of (generator - teacher) says so, else level."""
    lower_is_better = metric == "fid"
    if high < 0:
        return "better" if lower_is_better else "worse"
    if low > 0:
        return "worse" if lower_is_better else "better"
    return "level"


def check_coco_inputs(cfg: EvaluateConfig, paths: Paths) -> None:
    """One error naming every missing input of the COCO-30K protocol."""
    coco = cfg.coco
    wanted = [("eval prompts (run `dvc repro prepare` with prepare.eval.source: coco)", paths.eval_prompts),
              ("evaluate.coco.images (the val2014 image folder)", coco.images),
              ("evaluate.coco.inception (clean-fid's inception-2015-12-05.pt)", coco.inception),
              *[("evaluate.coco.clip (CLIP model)", p) for p in clip_paths(coco.clip or "")]]
    missing = [f"  {what}: {path}" for what, path in wanted if not path or not Path(path).exists()]
    if missing:
        raise UserError("COCO evaluation: missing inputs:\n" + "\n".join(missing))


def coco_images(folder: Path, records: list[dict]) -> np.ndarray | None:
    """The val2014 image behind each caption (COCO_val2014_<12-digit id>.jpg), cropped as measured."""
    out = []
    for r in records:
        found = list(folder.glob(f"*{int(r['image_id']):012d}.jpg"))
        if not found:
            return None
        out.append(center_crop_resize(np.asarray(Image.open(found[0]).convert("RGB"))))
    return np.stack(out) if out else None


def _render_references(folder: Path, records: list[dict], resolution: int, fingerprint: str) -> None:
    from .world import render
    from .world.scene import Scene

    by_seed = {int(r["seed"]): r for r in records}
    fill_folder(folder, records, lambda prompts, seeds: np.stack(
        [render(Scene(**by_seed[s]["scene"]), resolution, seed=s) for s in seeds]), 256, "reference", fingerprint)


HEADLINE = {"fid": "FID", "clip_score": "CLIP score", "attribute_accuracy": "attribute accuracy"}
ATTRIBUTES = ["shape", "color", "position", "size", "background"]


def report(metrics: dict, uncertainty: dict, n: int, cfg: EvaluateConfig, clip_name: str) -> str:
    """The markdown page: every metric with its interval, then each student against the teacher (paired)."""
    if cfg.mode == "world":
        intro = ("Same prompts and per-prompt seeds for every generator. FID (against ground-truth renders of the "
                 "same prompts) and CLIP score use the embedded evaluator CLIP; attribute accuracy is the analytic "
                 "judge (all attributes right, then per attribute).")
    else:
        intro = (f"COCO-30K protocol (docs/design.md, 'Evaluation protocol'): the first {n} val2014 captions, one image per caption "
                 f"with its own seed; generated and val2014 images centre-cropped and Lanczos-resized to "
                 f"{COCO_SIZE}; clean-fid (mode clean, Inception-v3) against every image in {cfg.coco.images}. "
                 f"CLIP score: cosine similarity, backbone {clip_name}.")
    ci = uncertainty.get("intervals", {})
    if ci:
        intro += (f" In brackets: {cfg.confidence:.0%} bootstrap interval ({cfg.bootstrap} resamples of the {n} "
                  "prompts, BCa; FID resamples each image with the reference of its own prompt"
                  + ("" if cfg.mode == "world" else
                     f"; COCO FID: {cfg.coco.fid_resamples} resamples against the fixed val2014 statistics"
                     if cfg.coco.fid_resamples else "; COCO FID: no interval (evaluate.coco.fid_resamples: 0)")
                  + "). Intervals come from this prompt set and these seeds; a retrained student moves by more "
                  "(reports/distill/seeds.md).")
    keys = [k for k in HEADLINE if any(k in m for m in metrics.values())]
    head = ["generator", *(HEADLINE[k] for k in keys)]
    lines = [f"# Evaluation ({cfg.mode} mode, {n} eval prompts)", "", intro, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        lines.append("| " + " | ".join([name, *(_cell(m, ci.get(name, {}), k) for k in keys)]) + " |")
    if cfg.mode == "world":
        lines += ["", "Per attribute (share of the prompts naming it that the judge reads right):", "",
                  "| generator | " + " | ".join(ATTRIBUTES) + " |", "|" + "---|" * (len(ATTRIBUTES) + 1)]
        for name, m in metrics.items():
            lines.append("| " + " | ".join([name, *(_cell(m, ci.get(name, {}), f"attribute_accuracy_{a}")
                                                   for a in ATTRIBUTES)]) + " |")
    versus = {k: v for k, v in uncertainty.get("vs_teacher", {}).items() if k != "teacher"}
    if versus:
        teacher = uncertainty["vs_teacher"]["teacher"]
        lines += ["", f"Against {teacher}, paired (generator minus teacher on the same resampled prompts; "
                      "better / worse only where the whole interval says so):", "",
                  "| generator | " + " | ".join(HEADLINE[k] for k in keys) + " |", "|" + "---|" * (len(keys) + 1)]
        for name, diffs in versus.items():
            cells = []
            for k in keys:
                if k not in diffs:               # COCO FID without resamples
                    cells.append(f"{metrics[name][k] - metrics[teacher][k]:+.3f}" if k in metrics[name] else "-")
                    continue
                low, high = diffs[k]["interval"]
                cells.append(f"{diffs[k]['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {verdict(k, low, high)}")
            lines.append("| " + " | ".join([name, *cells]) + " |")
    lines += ["", "Generation speed is measured by `python -m src.bench` (reports/bench/README.md), not here: "
              "a rerun reuses the images it already drew.", "", "![samples](grid.png)", ""]
    return "\n".join(lines)


def _cell(m: dict, ci: dict, key: str) -> str:
    if key not in m:
        return "-"
    digits = 4 if key == "clip_score" else 3
    text = f"{m[key]:.{digits}f}"
    if key in ci and ci[key][0] != ci[key][1]:
        text += f" [{ci[key][0]:.{digits}f}, {ci[key][1]:.{digits}f}]"
    return text


def cli_args(parser) -> None:
    """Evaluate another student, prompt set or folder than the DVC stage's (a merged student, a wider eval set)."""
    d = Paths()
    parser.add_argument("--student", type=Path, default=d.student, help="student pipeline folder")
    parser.add_argument("--name", default=d.student_name, help="the student's rows: NAME_1 (and NAME_1_tiny)")
    parser.add_argument("--prompts", type=Path, default=d.eval_prompts,
                        help="eval prompts (e.g. `python -m src.prepare --eval-only 2000 --out prompts/eval_2000.jsonl`)")
    parser.add_argument("--images", type=Path, default=d.images, help="image folder (resumable, reused by fingerprint)")
    parser.add_argument("--reports", type=Path, default=d.reports, help="where metrics.json, intervals.json, "
                        "README.md and grid.png go")


def main(argv: list[str] | None = None) -> None:
    config, args = stage_config(__doc__, "evaluate", argv, extra_args=cli_args, top_level=("tiny_decoder",))
    if config is None:
        return
    tiny = Path(config.tiny_decoder) if config.tiny_decoder else None
    paths = Paths(eval_prompts=args.prompts, student=args.student, images=args.images, reports=args.reports,
                  tiny_decoder=tiny, student_name=args.name)
    from .layout import resolve_teacher

    teacher = resolve_teacher(config.distill.teacher, config.distill.teacher_config)
    metrics = evaluate(config.evaluate, teacher, paths)
    for name, m in metrics.items():
        print(f"{name}: " + ", ".join(f"{k} {m[k]:.4f}" for k in ("fid", "clip_score", "attribute_accuracy") if k in m))


if __name__ == "__main__":
    run_cli(main)
