"""The embedded scene world: attributes, the seeded caption grammar and scene sampling.

A scene is one object (shape x colour x position x size) on a flat background colour.
Captions are produced by a small grammar with synonyms and several sentence templates, so
the same scene is described in many ways and a text encoder has something to learn.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator

# Palette in sRGB. Colours are kept at least ~80 apart (Euclidean RGB) so that the
# analytic judge can read them back from generated pixels by nearest-palette lookup.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (245, 222, 40),
    "green": (40, 170, 70),
    "blue": (35, 80, 215),
    "purple": (135, 60, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# 3x3 grid of positions; the value is the (x, y) centre as a fraction of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
# Object side as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.22, "large": 0.36}
# Largest random offset of the object centre, as a fraction of the image side. Small
# enough that the object never leaves its grid cell (cell borders sit at 1/3 and 2/3).
JITTER = 0.03

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "orange": ("orange", "tangerine", "amber"),
    "yellow": ("yellow", "golden", "lemon"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "purple": ("purple", "violet", "lilac"),
    "white": ("white", "snowy", "ivory"),
    "black": ("black", "jet", "ebony"),
}
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "dot", "round blob"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "triangular shape"),
    "cross": ("cross", "plus sign", "plus shape"),
}
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left corner", "at the upper left", "in the top-left"),
    "top": ("at the top", "near the top edge", "at the top middle"),
    "top right": ("in the top right corner", "at the upper right", "in the top-right"),
    "left": ("on the left", "at the left side", "on the left edge"),
    "center": ("in the center", "in the middle", "at the centre"),
    "right": ("on the right", "at the right side", "on the right edge"),
    "bottom left": ("in the bottom left corner", "at the lower left", "in the bottom-left"),
    "bottom": ("at the bottom", "near the bottom edge", "at the bottom middle"),
    "bottom right": ("in the bottom right corner", "at the lower right", "in the bottom-right"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big", "huge"),
}
BACKGROUND_NOUNS: tuple[str, ...] = ("background", "backdrop", "canvas")

# {obj} = "[size ]colour shape" noun phrase with its article, {pos} = position phrase,
# {bg} = background colour word, {bgn} = background noun.
TEMPLATES: tuple[str, ...] = (
    "{obj} {pos} on a {bg} {bgn}",
    "{obj} {pos}, {bg} {bgn}",
    "a {bg} {bgn} with {obj} {pos}",
    "{pos_cap}, {obj} on a {bg} {bgn}",
    "an image of {obj} {pos} against a {bg} {bgn}",
    "{obj} placed {pos}; the {bgn} is {bg}",
)


@dataclass(frozen=True)
class Scene:
    """One renderable scene; `size_named` says whether the caption mentions the size."""

    shape: str
    color: str
    position: str
    size: str
    background: str
    size_named: bool = True

    def attributes(self) -> dict[str, str]:
        """Attributes the caption commits to (what a judge may check)."""
        attrs = {
            "shape": self.shape,
            "color": self.color,
            "position": self.position,
            "background": self.background,
        }
        if self.size_named:
            attrs["size"] = self.size
        return attrs

    def to_dict(self) -> dict:
        return asdict(self)


def all_scenes() -> Iterator[Scene]:
    """Every attribute combination (object colour never equals the background)."""
    for shape in SHAPES:
        for color in COLORS:
            for background in COLORS:
                if background == color:
                    continue
                for position in POSITIONS:
                    for size in SIZES:
                        yield Scene(shape, color, position, size, background)


def sample_scene(rng: random.Random, p_size_named: float = 0.5) -> Scene:
    """Draw a uniformly random scene."""
    color = rng.choice(COLORS)
    background = rng.choice([c for c in COLORS if c != color])
    return Scene(
        shape=rng.choice(SHAPES),
        color=color,
        position=rng.choice(tuple(POSITIONS)),
        size=rng.choice(tuple(SIZES)),
        background=background,
        size_named=rng.random() < p_size_named,
    )


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(scene: Scene, rng: random.Random) -> str:
    """One random paraphrase of the scene (synonyms and sentence template drawn from rng)."""
    words = [rng.choice(COLOR_WORDS[scene.color]), rng.choice(SHAPE_WORDS[scene.shape])]
    if scene.size_named:
        words.insert(0, rng.choice(SIZE_WORDS[scene.size]))
    pos = rng.choice(POSITION_WORDS[scene.position])
    text = rng.choice(TEMPLATES).format(
        obj=_article(" ".join(words)),
        pos=pos,
        pos_cap=pos[0].upper() + pos[1:],
        bg=rng.choice(COLOR_WORDS[scene.background]),
        bgn=rng.choice(BACKGROUND_NOUNS),
    )
    return text


def vocabulary() -> list[str]:
    """Every word the grammar can emit (lower-case, punctuation split off), sorted."""
    words: set[str] = set()
    phrases = [t for group in (COLOR_WORDS, SHAPE_WORDS, POSITION_WORDS, SIZE_WORDS)
               for values in group.values() for t in values]
    phrases += list(BACKGROUND_NOUNS) + list(TEMPLATES) + ["a", "an"]
    for phrase in phrases:
        for token in phrase.replace("{", " ").replace("}", " ").replace("-", " - ").split():
            token = token.strip(",;").lower()
            if token and token not in {"obj", "pos", "pos_cap", "bg", "bgn"}:
                words.add(token)
    return sorted(words)
