"""Bootstrap intervals of the evaluation (src/scoring/metrics.py): their width and pairing follow the statistics."""

from __future__ import annotations

import numpy as np
import pytest

from src.evaluate import verdict
from src.scoring.metrics import feature_stats, frechet, mean_interval, resampled_interval


def test_mean_interval_matches_normal_theory():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, 900)
    low, high = mean_interval(x, resamples=2000)
    expected = 2 * 1.96 * 2.0 / np.sqrt(900)            # 95% width of a mean of 900 draws with sd 2
    assert low < x.mean() < high
    assert high - low == pytest.approx(expected, rel=0.15)
    assert low < 3.0 < high


def test_paired_difference_is_narrower_than_the_two_intervals():
    """Two generators scored on the same prompts share the prompts' difficulty: the paired difference
    interval sees only their disagreement."""
    rng = np.random.default_rng(1)
    difficulty = rng.normal(0, 1.0, 500)
    a = difficulty + 0.1 + rng.normal(0, 0.1, 500)
    b = difficulty + rng.normal(0, 0.1, 500)
    low, high = mean_interval(a, b)
    a_low, a_high = mean_interval(a)
    assert 0 < low < 0.1 < high                          # the true difference 0.1, and > 0
    assert (high - low) < 0.25 * (a_high - a_low)


def test_constant_and_missing_values():
    assert mean_interval(np.ones(50)) == (1.0, 1.0)
    x = np.array([1.0, 0.0, np.nan] * 40)               # NaN: the prompt does not name the attribute
    low, high = mean_interval(x)
    assert np.isfinite(low) and np.isfinite(high) and low < 0.5 < high


def test_fid_interval_is_recentred_and_as_wide_as_the_sampling_spread():
    """Resampled FID is biased up by the repeated images; the interval keeps its spread around the measured value.
    Its width matches the spread of FID over independent draws of the same distributions, and it holds their mean."""
    rng = np.random.default_rng(2)
    d, n = 8, 400
    shift = np.r_[0.3, np.zeros(d - 1)]

    def draw():
        return rng.normal(0, 1, (n, d)) + shift, rng.normal(0, 1, (n, d))

    gen, ref = draw()
    fid = lambda i: frechet(feature_stats(gen[i]), feature_stats(ref[i]))   # noqa: E731
    point = fid(np.arange(n))
    low, high = resampled_interval(fid, n, resamples=400, floor=0.0)
    reps = [fid(rng.integers(0, n, n)) for _ in range(100)]
    assert np.median(reps) > point                       # the bias the recentring removes
    assert low <= point <= high and low >= 0.0
    others = []
    for _ in range(60):
        g2, r2 = draw()
        others.append(frechet(feature_stats(g2), feature_stats(r2)))
    assert low < np.mean(others) < high
    assert 0.7 < (high - low) / (2 * 1.96 * np.std(others)) < 1.5


def test_verdicts():
    assert verdict("fid", -0.05, -0.01) == "better"
    assert verdict("fid", 0.01, 0.05) == "worse"
    assert verdict("attribute_accuracy", 0.01, 0.05) == "better"
    assert verdict("attribute_accuracy", -0.05, -0.01) == "worse"
    assert verdict("clip_score", -0.01, 0.01) == "level"
