"""Benchmark commands run at toy size (they are measured elsewhere, never timed here)."""

from __future__ import annotations

import json


def test_gpu_profile_runs_at_tiny_size_on_cpu(tmp_path):
    from src.bench.gpu_profile import main

    main(["--scale", "tiny", "--batch", "2", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)])
    p = json.loads((tmp_path / "profile.json").read_text())
    assert [r["gradient_checkpointing"] for r in p["vsd_step"]] == [False, True]
    assert all(r["s_per_step"] > 0 for r in p["vsd_step"])
    assert [r["batch"] for r in p["one_step"]] == [1, 2]
    assert p["one_step"][0]["image_size"] == [64, 64]           # VAE upsamples the 8x8 latent 8x
    assert "SwiftBrush step" in (tmp_path / "README.md").read_text()
