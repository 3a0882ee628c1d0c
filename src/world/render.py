"""Deterministic renderer of world scenes (PIL, 4x supersampled for anti-aliased edges)."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from .scene import JITTER, PALETTE, POSITIONS, SIZES, Scene

SUPERSAMPLE = 4


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
               fill: int | tuple[int, int, int]) -> None:
    """Draw `shape` filling the axis-aligned `box` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        # Arms one third of the side wide.
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def object_box(scene: Scene, resolution: int, seed: int | None) -> tuple[float, float, float, float]:
    """Pixel-space box of the object; `seed` draws the small position jitter (None: no jitter)."""
    fx, fy = POSITIONS[scene.position]
    if seed is not None:
        rng = random.Random(seed)
        fx += rng.uniform(-JITTER, JITTER)
        fy += rng.uniform(-JITTER, JITTER)
    half = SIZES[scene.size] * resolution / 2
    cx, cy = fx * resolution, fy * resolution
    return (cx - half, cy - half, cx + half, cy + half)


def render(scene: Scene, resolution: int = 32, seed: int | None = None) -> np.ndarray:
    """Render `scene` to an (H, W, 3) uint8 array; same scene and seed give the same pixels."""
    ss = resolution * SUPERSAMPLE
    img = Image.new("RGB", (ss, ss), PALETTE[scene.background])
    box = tuple(v * SUPERSAMPLE for v in object_box(scene, resolution, seed))
    draw_shape(ImageDraw.Draw(img), scene.shape, box, PALETTE[scene.color])
    img = img.resize((resolution, resolution), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()
