"""The seed -> initial-noise convention, in numpy only, so that ONNX inference (no torch)
and the PyTorch student draw the very same latent for the same seed.

Sample i gets its own generator seeded with seeds[i], so an image never depends on the
batch it was drawn in.
"""

from __future__ import annotations

import numpy as np

CONVENTION = "numpy-default_rng-standard_normal-float32"   # part of every cached image's fingerprint


def initial_noise(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """(B, *shape) float32 standard normal noise; row i from np.random.default_rng(seeds[i])."""
    out = np.empty((len(seeds), *shape), np.float32)
    for i, seed in enumerate(seeds):
        out[i] = np.random.default_rng(int(seed)).standard_normal(shape, dtype=np.float32)
    return out
