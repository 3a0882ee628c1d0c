"""The embedded text-to-image world: scene grammar, renderer, analytic judge and tokenizer."""

from .judge import Reading, accuracy, read_scene, score
from .render import render
from .scene import Scene, all_scenes, caption, sample_scene

__all__ = ["Reading", "Scene", "accuracy", "all_scenes", "caption", "read_scene", "render",
           "sample_scene", "score"]
