"""Pictures people look at: sample grids comparing generators prompt by prompt."""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw


def sample_grid(columns: dict[str, np.ndarray], prompts: list[str], scale: int = 4) -> Image.Image:
    """Prompt text, then one upscaled image per generator, a row per prompt (header row on top)."""
    n, h, _, _ = next(iter(columns.values())).shape
    cell, text_w, head = h * scale, 330, 18
    grid = Image.new("RGB", (text_w + cell * len(columns), head + cell * n), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((text_w + j * cell + 4, 3), name, fill="black")
    for i, prompt in enumerate(prompts):
        y = head + i * cell
        draw.multiline_text((4, y + 4), textwrap.fill(prompt, 52), fill="black")
        for j, imgs in enumerate(columns.values()):
            grid.paste(Image.fromarray(imgs[i]).resize((cell, cell), Image.Resampling.NEAREST), (text_w + j * cell, y))
    return grid
