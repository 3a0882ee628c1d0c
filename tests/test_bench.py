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


def test_every_vsd_step_variant_computes_the_reference_gradient(tiny_unet):
    """The speed-ups of the VSD step keep its mathematics: same student gradient as the 4-call reference."""
    import torch

    from diffusers import DDPMScheduler

    from src.bench.vsd_step import VARIANTS, Variant, compare

    abar = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    unet = tiny_unet()
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)

    def wrong_guidance(cfg, *args):               # a variant that changes the maths must be caught
        from src.vsd import VSDLoss

        return VSDLoss(guidance_scale=1.0)(*args)[0]

    rows = compare(unet, cond, uncond, abar, repeats=1,
                   variants=VARIANTS + (Variant("wrong guidance", wrong_guidance),))
    by_name = {r["variant"]: r for r in rows}
    assert len(by_name) == len(VARIANTS) + 1
    for v in VARIANTS:
        assert by_name[v.name]["grad_max_rel_diff"] < 1e-4, v.name
        assert by_name[v.name]["s_per_step"] > 0
    assert by_name["wrong guidance"]["grad_max_rel_diff"] > 1e-2
