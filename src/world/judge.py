"""Analytic attribute judge: reads background, colour, shape, position and size from pixels.

No learning is involved (in the spirit of GenEval's detector-based checks, but exact for
this world): the background is the median border colour, the object is the largest
connected region that differs from it, its colour is the nearest palette entry of its
interior, and its shape, position and size come from fitting each shape to the object's
per-pixel coverage (area and centroid) and keeping the rendering that matches best.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .render import SUPERSAMPLE, draw_shape
from .scene import PALETTE, SHAPES, SIZES

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float32)
# A pixel belongs to the object candidate when it is this far (RGB) from the background.
_DETECT_THRESHOLD = 40.0
# Side threshold between "small" and "large", halfway between the two rendered sides.
_SIZE_SPLIT = (SIZES["small"] + SIZES["large"]) / 2
# Blur (pixels) applied to both the observed and the template coverage before comparing.
_FIT_BLUR = 0.7
ATTRIBUTES: tuple[str, ...] = ("shape", "color", "position", "size", "background")


@dataclass(frozen=True)
class Reading:
    """What the judge sees; attributes are None when no object could be found."""

    background: str
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the palette colour closest (Euclidean RGB) to `rgb`."""
    d = ((_PALETTE_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(d.argmin())]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _grid_cell(fx: float, fy: float) -> str:
    col = ("left", "", "right")[min(max(int(fx * 3), 0), 2)]
    row = ("top", "", "bottom")[min(max(int(fy * 3), 0), 2)]
    return " ".join(p for p in (row, col) if p) or "center"


def read_scene(image: np.ndarray) -> Reading:
    """Read the attributes of an (H, W, 3) uint8 image."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    h, w, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = nearest_color(bg_rgb)

    # Detection on a median-filtered copy: robust to pixel noise, keeps edges in place.
    dist = np.linalg.norm(ndimage.median_filter(img, size=(3, 3, 1)) - bg_rgb, axis=2)
    candidate = _largest_component(dist > _DETECT_THRESHOLD)
    if candidate.sum() < 3:
        return Reading(background=background)
    # Object colour from its most saturated (interior) pixels, away from anti-aliased edges.
    strong = candidate & (dist >= 0.75 * dist[candidate].max())
    obj_rgb = np.median(img[strong], axis=0)
    color = nearest_color(obj_rgb)

    # Per-pixel coverage: projection of (pixel - background) onto (object - background).
    axis = obj_rgb - bg_rgb
    # Left unclipped (up to a margin), so that pixel noise averages out of area and centroid.
    coverage = np.clip(((img - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), -0.5, 1.5)
    near = ndimage.binary_dilation(candidate, iterations=2)
    coverage = np.where(near, coverage, 0.0)
    area = float(coverage.sum())
    if area < 2.0:
        return Reading(background=background, color=color)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    centroid = (float((coverage * xs).sum()) / area, float((coverage * ys).sum()) / area)
    # Fit each shape by its area and centroid, then keep the one whose rendering matches best.
    fits = {s: _fit_box(s, area, centroid) for s in SHAPES}
    # Compared at a common blur, so that a softly drawn object still matches its shape.
    seen = ndimage.gaussian_filter(coverage, _FIT_BLUR)

    def misfit(s: str) -> float:
        return float(((ndimage.gaussian_filter(_coverage(s, fits[s], (h, w)), _FIT_BLUR) - seen) ** 2).sum())

    shape = min(SHAPES, key=misfit)
    x0, y0, x1, y1 = fits[shape]
    position = _grid_cell((x0 + x1) / 2 / w, (y0 + y1) / 2 / h)
    size = "large" if (x1 - x0) / w >= _SIZE_SPLIT else "small"
    return Reading(background=background, color=color, shape=shape, position=position, size=size)


# Area of each shape as a fraction of its square box (see render.draw_shape).
_AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 5 / 9}


def _fit_box(shape: str, area: float, centroid: tuple[float, float]) -> tuple[float, float, float, float]:
    """Square box of `shape` with the given area whose shape centroid is `centroid`."""
    side = float(np.sqrt(area / _AREA_FRACTION[shape]))
    cx, cy = centroid
    if shape == "triangle":  # apex up: the centroid sits 2/3 of the way down the box
        cy -= side / 6
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def _coverage(shape: str, box: tuple[float, float, float, float], hw: tuple[int, int]) -> np.ndarray:
    """Fractional pixel coverage of `shape` in `box`, rasterised as the renderer does."""
    h, w = hw
    img = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw_shape(ImageDraw.Draw(img), shape, tuple(v * SUPERSAMPLE for v in box), 255)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0


def score(reading: Reading, attributes: Mapping[str, str]) -> dict[str, bool]:
    """Per-attribute correctness for the attributes a prompt commits to, plus `all`."""
    result = {k: getattr(reading, k) == v for k, v in attributes.items()}
    result["all"] = all(result.values())
    return result


def accuracy(scores: Iterable[Mapping[str, bool]]) -> dict[str, float]:
    """Mean correctness per attribute (over prompts that name it) and overall (`all`)."""
    totals: dict[str, list[int]] = {}
    for s in scores:
        for k, ok in s.items():
            totals.setdefault(k, [0, 0])
            totals[k][0] += int(ok)
            totals[k][1] += 1
    return {k: hit / n for k, (hit, n) in sorted(totals.items())}
