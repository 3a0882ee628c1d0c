"""Few-step students (distill.student_steps): the sampling chain, backward simulation, the stock LCM call,
and the ONNX graph that runs all N steps behind the unchanged infer contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from src.method.onestep import student_sample, student_timesteps, student_x0


@pytest.fixture
def schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_timesteps_are_the_students_and_evenly_below():
    assert student_timesteps(999, 4) == [999, 749, 499, 249]          # DMD2's four steps
    assert student_timesteps(599, 2) == [599, 299]
    assert student_timesteps(599, 1) == [599]


def test_each_step_noises_the_last_x0_again_to_the_next_timestep(schedule, tiny_unet):
    unet = tiny_unet()
    abar = schedule.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        got = student_sample(unet, noise, text, abar, "epsilon", [599, 299])
        x0 = student_x0(unet, noise[:, :4], text, abar, "epsilon", 599)
        x1 = abar[299].sqrt() * x0 + (1 - abar[299]).sqrt() * noise[:, 4:]
        expected = student_x0(unet, x1, text, abar, "epsilon", 299)
        assert torch.allclose(got, expected, atol=1e-6)
        first = student_sample(unet, noise, text, abar, "epsilon", [599, 299], stop_at=0)
        assert torch.allclose(first, x0, atol=1e-6)
        # One step reads only the initial latent: the first channels, drawn as a one-step student draws them.
        assert torch.equal(student_sample(unet, noise[:, :4], text, abar, "epsilon", [599]), x0)


def test_backward_simulation_trains_the_last_step_only(schedule, tiny_unet):
    """stop_at = k: gradient through step k, none through the earlier steps that made its input."""
    unet = tiny_unet()
    abar = schedule.alphas_cumprod
    g = torch.Generator().manual_seed(1)
    noise, text = torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    student_sample(unet, noise, text, abar, "epsilon", [599, 299], stop_at=1).square().sum().backward()
    got = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    with torch.no_grad():
        x0 = student_x0(unet, noise[:, :4], text, abar, "epsilon", 599)
    x1 = abar[299].sqrt() * x0 + (1 - abar[299]).sqrt() * noise[:, 4:]
    student_x0(unet, x1, text, abar, "epsilon", 299).square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, unet.parameters()))
    unet.zero_grad()                      # through both steps, the gradient would differ
    x0 = student_x0(unet, noise[:, :4], text, abar, "epsilon", 599)
    x1 = abar[299].sqrt() * x0 + (1 - abar[299]).sqrt() * noise[:, 4:]
    student_x0(unet, x1, text, abar, "epsilon", 299).square().sum().backward()
    assert not all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(got, unet.parameters()))


def test_a_two_step_student_trains_exports_and_matches_stock_lcm(tmp_path, micro_models, world_prompts):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from src.core.config import DistillConfig, ExportConfig
    from src.distill import Paths as DistillPaths
    from src.distill import distill
    from src.export import Paths as ExportPaths
    from src.export import export
    from src.method.noise import initial_noise
    from src.method.onestep import one_step_images, steps_of
    from src.method.teacher import alphas_cumprod
    from src.serving.runtime import load_artifact, stream_images

    models, _ = micro_models
    student = tmp_path / "student"
    distill(DistillConfig(teacher=str(models / "teacher"), student_steps=2, student_timestep=899, steps=4,
                          batch_size=2, lora_rank=4, lora_alpha=8, checkpoint_every=2, val_every=2, val_prompts=2),
            lr=1e-4, seed=0, paths=DistillPaths(train_prompts=world_prompts / "train.jsonl",
                                                eval_prompts=world_prompts / "eval.jsonl", checkpoints=tmp_path / "ck",
                                                student=student, reports=tmp_path / "rep"))
    made = json.loads((student / "swiftbrush.json").read_text())
    assert made["num_inference_steps"] == 2 and made["timesteps"] == [899, 449]
    card = (student / "README.md").read_text()
    assert "2-step" in card and "timesteps=[899, 449]" in card

    pipe = StableDiffusionPipeline.from_pretrained(student, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert steps_of(pipe) == 2
    prompts, seeds = ["a red circle in the center on a blue background", "a big white box at the top"], [3, 4]
    abar = alphas_cumprod(pipe)
    ours = one_step_images(pipe, pipe.unet, prompts, seeds, abar)
    # The card's stock call, fed the same initial latent and the noise LCM draws from its generator.
    c, side = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    latents = torch.from_numpy(initial_noise(seeds, (c, side, side)))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    lcm = pipe(prompts, num_inference_steps=2, timesteps=[899, 449], guidance_scale=0, output_type="np",
               latents=latents, generator=torch.Generator().manual_seed(7)).images
    added = torch.randn((2, c, side, side), generator=torch.Generator().manual_seed(7))
    from src.method.conditioning import encode
    from src.method.onestep import decode

    with torch.no_grad():
        x0 = student_sample(pipe.unet, torch.cat([latents, added], 1), encode(pipe, prompts, "cpu", side), abar,
                            "epsilon", [899, 449])
        same_noise = decode(pipe.vae, x0).permute(0, 2, 3, 1).numpy()
    assert np.abs(lcm - same_noise).max() <= 1 / 255
    assert not np.allclose(same_noise * 255, ours, atol=2)    # other added noise: another picture

    # Export: the N steps inside one graph; infer's runtime draws the N latents of noise by the contract.
    out = tmp_path / "onnx"
    metrics = export(ExportConfig(parity_prompts=2, exporter="torchscript", opset=17),   # 2 s (dynamo: 27 s)
                     ExportPaths(student=student, out=out, reports=tmp_path / "erep",
                                 eval_prompts=world_prompts / "eval.jsonl"))
    assert metrics["psnr_fp32"] >= 40
    contract = json.loads((out / "onestep.json").read_text())
    assert contract["steps"] == 2 and contract["timesteps"] == [899, 449] and contract["latent_shape"][0] == 2 * c
    assert "2-step" in (out / "README.md").read_text()
    art = load_artifact(Path(out))
    onnx_images = np.stack([img for _, img in stream_images(art, prompts, seeds)])
    assert np.abs(onnx_images.astype(int) - ours.astype(int)).max() <= 2
