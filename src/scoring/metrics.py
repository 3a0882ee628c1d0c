"""Image-generation metrics shared by both evaluation modes (docs/design.md, "Evaluation protocol").

- FID through clean-fid: folder features -> (mu, sigma) -> Frechet distance. The feature
  extractor is the embedded evaluator CLIP's image tower (world mode) or clean-fid's own
  Inception-v3 loaded from a user-supplied weights file (COCO-30K mode, never downloaded).
  Reference statistics can be cached next to the images they describe.
- CLIP score: mean cosine similarity between each image and its own prompt, with a
  transformers CLIPModel folder or an open_clip model (`open_clip:<arch>:<weights file>`).
- The COCO protocol's preprocessing: centre crop, then Lanczos resize to 256, both sides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from PIL import Image

from ..core.errors import UserError
from ..core.fileio import atomic_file

INCEPTION_FILE = "inception-2015-12-05.pt"   # the name clean-fid gives its TorchScript Inception-v3
COCO_SIZE = 256                              # docs/design.md, "Evaluation protocol"


def center_crop_resize(img: np.ndarray, size: int = COCO_SIZE) -> np.ndarray:
    """Largest centred square, then Lanczos to size x size (uint8 HxWx3 in and out)."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(img[top:top + side, left:left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.LANCZOS))


# --------------------------------------------------------------------------- FID


class EvaluatorFeatures(torch.nn.Module):
    """clean-fid feature extractor: evaluator CLIP image embeddings of [0, 255] float batches."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.float() / 127.5 - 1.0  # the evaluator's input range (mean 0.5, std 0.5)
        return self.clip.get_image_features(pixel_values=pixels).pooler_output


def load_inception(path: str | Path, device: torch.device):
    """clean-fid's Inception-v3 from a local `inception-2015-12-05.pt` (no download)."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = Path(path)
    if path.name != INCEPTION_FILE or not path.is_file():
        raise UserError(f"evaluate.coco.inception: expected clean-fid's {INCEPTION_FILE} file, got {path}")
    try:
        return InceptionV3W(str(path.parent), download=False).to(device).eval()
    except RuntimeError as err:
        raise UserError(f"evaluate.coco.inception: {path} is not a TorchScript Inception-v3: {err}") from None


def folder_stats(folder: Path, model: Callable, *, device: torch.device, image_transform=None, resize=None,
                 batch_size: int = 64, num_workers: int = 0, cache: Path | None = None,
                 cache_key: str = "", desc: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of `model`'s features over every image under `folder` (clean mode).

    `image_transform` runs on each uint8 image first (e.g. the COCO crop); `resize` replaces
    clean-fid's resize to 299 (world mode keeps the evaluator's own resolution). With `cache`,
    the statistics are stored there with `cache_key` and reused while the key matches.
    """
    if cache is not None and cache.is_file():
        stored = np.load(cache)
        if str(stored["key"]) == cache_key:
            return stored["mu"], stored["sigma"]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    mu, sigma = feature_stats(features(files, model, device=device, image_transform=image_transform, resize=resize,
                                       batch_size=batch_size, num_workers=num_workers, desc=desc))
    if cache is not None:
        with atomic_file(cache, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, key=np.array(cache_key))
    return mu, sigma


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}  # clean-fid's


def features(files: list[Path], model: Callable, *, device: torch.device, image_transform=None, resize=None,
             batch_size: int = 64, num_workers: int = 0, desc: str = "") -> np.ndarray:
    """(N, D) features of `files`, in the order given (clean-fid's clean mode)."""
    from cleanfid import fid

    return fid.get_files_features([str(f) for f in files], model, num_workers=num_workers, batch_size=batch_size,
                                  device=device, mode="clean", custom_fn_resize=resize,
                                  custom_image_tranform=image_transform, description=desc, verbose=False)


def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    import warnings

    from cleanfid import fid

    with warnings.catch_warnings():     # clean-fid passes sqrtm's `disp`, deprecated by SciPy 1.17: once per
        warnings.simplefilter("ignore", DeprecationWarning)        # resample otherwise (thousands per evaluate)
        return float(fid.frechet_distance(a[0], a[1], b[0], b[1]))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of (N, D) features, as clean-fid computes them."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def world_features(files: list[Path], clip, batch_size: int = 128) -> np.ndarray:
    """(N, D) evaluator features of `files`, in that order (images stay at the world resolution)."""
    return features(files, EvaluatorFeatures(clip), device=torch.device("cpu"), resize=_identity,
                    batch_size=batch_size)


def _identity(x):
    return x


# --------------------------------------------------------------------------- confidence intervals


def mean_interval(values: np.ndarray, baseline: np.ndarray | None = None, *, resamples: int = 1000,
                  confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap interval (scipy.stats.bootstrap) of a per-prompt mean, NaNs left out (attributes a prompt
    does not name); with `baseline`, of mean(values) - mean(baseline) on the same resampled prompts (paired).
    Where every resample agrees (e.g. accuracy 1.0), the interval is that value."""
    import warnings

    from scipy.stats import bootstrap

    data = (values,) if baseline is None else (values, baseline)

    def statistic(*columns, axis=-1):
        means = [np.nanmean(c, axis=axis) for c in columns]
        return means[0] if len(means) == 1 else means[0] - means[1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # all-NaN resamples, degenerate (constant) data: handled below
        res = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=resamples,
                        confidence_level=confidence, method="BCa", rng=np.random.default_rng(seed))
        point = float(statistic(*data))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        return point, point
    return low, high


def resampled_interval(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0, floor: float | None = None) -> tuple[float, float]:
    """Bootstrap interval of a set statistic such as FID: `statistic(indices)` on `resamples` resamples of the n
    prompts (so each image stays paired with its prompt's reference, and two generators with each other), and
    the percentile spread placed around the full-set value.

    FID of a resampled set is biased up (repeated images shrink its spread: on 500 world prompts the resampled
    median is ~0.1 above the measured value), so its raw percentiles can miss the measured value altogether, and
    BCa's bias correction breaks down when no resample falls below it. The spread (quantiles minus the
    resampled median) is what is kept, recentred on the measured value; `floor` bounds it below (FID: 0)."""
    rng = np.random.default_rng(seed)
    point = float(statistic(np.arange(n)))
    reps = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    tail = (1 - confidence) / 2 * 100
    low, mid, high = np.percentile(reps, [tail, 50, 100 - tail])
    low, high = float(point - (mid - low)), float(point + (high - mid))
    return (low if floor is None else max(low, floor)), high


# --------------------------------------------------------------------------- CLIP score


class ClipScorer(Protocol):
    name: str

    def similarity(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        """Cosine similarity of each image with its own prompt."""


class TransformersClip:
    """A transformers CLIPModel folder (the embedded evaluator, or e.g. openai/clip-vit-large-patch14 saved locally)."""

    def __init__(self, folder: str | Path, device: torch.device = torch.device("cpu")):
        from transformers import CLIPModel, CLIPProcessor

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(f"CLIP model: {folder} is not a transformers CLIPModel folder (no config.json)")
        self.model = CLIPModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        self.device = device
        self.name = f"transformers:{folder.name}"

    @torch.no_grad()
    def similarity(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        inputs = self.processor(text=prompts, images=list(images), return_tensors="pt", padding="max_length",
                                truncation=True).to(self.device)
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        txt = self.model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
        return torch.nn.functional.cosine_similarity(img, txt).float().cpu().numpy()


class OpenClip:
    """open_clip model from a local weights file: spec `open_clip:<arch>:<weights>` (e.g. ViT-g-14)."""

    def __init__(self, arch: str, weights: str | Path, device: torch.device = torch.device("cpu")):
        try:
            import open_clip
        except ImportError:
            raise UserError("evaluate.coco.clip: an open_clip spec needs the open_clip_torch package "
                            "(pip install open_clip_torch), or give a transformers CLIPModel folder") from None
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=str(weights),
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device = device
        self.name = f"open_clip:{arch}"

    @torch.no_grad()
    def similarity(self, images: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images]).to(self.device)
        img = self.model.encode_image(pixels)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device))
        return torch.nn.functional.cosine_similarity(img, txt).float().cpu().numpy()


def clip_paths(spec: str) -> list[Path]:
    """The local files a CLIP spec needs (for the missing-input check)."""
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        return [Path(parts[2])] if len(parts) == 3 else []
    return [Path(spec)]


def load_clip(spec: str, device: torch.device = torch.device("cpu")) -> ClipScorer:
    """`open_clip:<arch>:<weights file>` or a transformers CLIPModel folder."""
    if spec.startswith("open_clip:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UserError(f"evaluate.coco.clip: {spec!r}: expected open_clip:<arch>:<weights file>, "
                            "e.g. open_clip:ViT-g-14:/models/open_clip_pytorch_model.bin")
        return OpenClip(parts[1], parts[2], device)
    return TransformersClip(spec, device)


def clip_similarities(scorer: ClipScorer, batches) -> np.ndarray:
    """Each image's cosine with its own prompt, over (images, prompts) batches."""
    return np.concatenate([scorer.similarity(images, prompts) for images, prompts in batches])


# --------------------------------------------------------------------------- the world judge


def judge_per_image(images: np.ndarray, records: list[dict]) -> dict[str, np.ndarray]:
    """Per image: 1.0 where the judge reads the attribute right, 0.0 where wrong, NaN where the prompt does not
    name it; keys attribute_accuracy (all named attributes right) and attribute_accuracy_<attribute>."""
    from ..world import read_scene, score

    scores = [score(read_scene(im), r["attributes"]) for im, r in zip(images, records)]
    keys = sorted({k for s in scores for k in s})
    return {("attribute_accuracy" if k == "all" else f"attribute_accuracy_{k}"):
            np.array([float(s[k]) if k in s else np.nan for s in scores]) for k in keys}


def file_listing_key(folder: Path, *extra: object) -> str:
    """A cheap identity of a large image folder: names and sizes of its files, plus `extra`."""
    import hashlib

    h = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(f"{os.path.relpath(os.path.join(root, name), folder)}:"
                     f"{os.path.getsize(os.path.join(root, name))}\n".encode())
    return h.hexdigest()
