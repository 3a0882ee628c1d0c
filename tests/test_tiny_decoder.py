"""The tiny decoder (TAESD format): the world build makes one, it learns the VAE's decoder, and distill,
export and inference use it where the parameters say so."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.core.errors import UserError
from src.method.teacher import load_tiny_decoder


def _vae(models):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(models / "teacher" / "vae").eval()


def test_micro_build_writes_a_taesd_format_folder_that_decodes_the_teachers_latents(micro_models):
    from diffusers import AutoencoderTiny

    models, record = micro_models
    assert json.loads((models / "tiny_decoder" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    assert {"tiny_psnr_vs_vae", "tiny_judge_accuracy", "vae_judge_accuracy"} <= set(record["metrics"])
    vae = _vae(models)
    tiny = load_tiny_decoder(models / "tiny_decoder", vae)
    assert isinstance(tiny, AutoencoderTiny) and tiny.config.scaling_factor == 1.0
    z = torch.randn(2, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        assert tiny.decode(z).sample.shape == vae.decode(z).sample.shape == (2, 3, 32, 32)


def test_distilling_the_vae_brings_the_tiny_decoder_close_to_it(micro_models):
    """Training must move the decoder's output onto the VAE's: PSNR against the VAE's decodes rises a lot."""
    from src.world.build import render_scenes
    from src.world.tiny_decoder import TinySpec, check_tiny, make_tiny, train_tiny

    models, _ = micro_models
    vae = _vae(models).requires_grad_(False)
    data = render_scenes(256, 32, 0, 0.5)
    held = render_scenes(32, 32, 1, 0.5)
    spec = TinySpec(channels=16, steps=150, batch=16, lr=3e-3)
    before = check_tiny(make_tiny(spec, vae.config.latent_channels).eval(), vae, held)["tiny_psnr_vs_vae"]
    after = check_tiny(train_tiny(spec, vae, data), vae, held)
    assert after["tiny_psnr_vs_vae"] > before + 6, (before, after)
    assert after["tiny_psnr_vs_vae_noisy_latents"] > before + 6


def test_bad_tiny_decoder_folders_are_named(micro_models, tmp_path):
    from src.world.tiny_decoder import TinySpec, make_tiny, save_tiny

    models, _ = micro_models
    vae = _vae(models)
    with pytest.raises(UserError, match="no config.json"):
        load_tiny_decoder(tmp_path / "absent", vae)
    with pytest.raises(UserError, match="AutoencoderKL.*expected 'AutoencoderTiny'"):
        load_tiny_decoder(models / "teacher" / "vae", vae)
    save_tiny(tmp_path / "eightfold", make_tiny(TinySpec(channels=4, decoder_blocks=(1, 1, 1, 1),
                                                        encoder_blocks=(1, 1, 1, 1)), 4))
    with pytest.raises(UserError, match="8x.*4x"):
        load_tiny_decoder(tmp_path / "eightfold", vae)


def test_distill_with_the_tiny_clip_decoder_trains_through_it(tmp_path, micro_models, world_prompts):
    """distill.clip_decoder: tiny runs, and the CLIP loss's gradient really goes through the tiny decoder: the
    student differs from one trained with the VAE as the CLIP decoder, with everything else equal."""
    from src.core.config import DistillConfig
    from src.distill import Paths, distill

    models, _ = micro_models
    digests = {}
    for decoder in ("vae", "tiny"):
        cfg = DistillConfig(teacher=str(models / "teacher"), steps=1, batch_size=2, lora_rank=4, lora_alpha=8,
                            val_every=100, clip_model=str(models / "guide"), clip_weight=100.0, clip_tau=1.0,
                            clip_decoder=decoder)
        out = tmp_path / decoder
        r = distill(cfg, lr=1e-2, seed=0, paths=Paths(train_prompts=world_prompts / "train.jsonl",
                                                      eval_prompts=tmp_path / "none.jsonl", checkpoints=out / "ck",
                                                      student=out / "student", reports=out / "rep",
                                                      tiny_decoder=models / "tiny_decoder"))
        assert r["skipped_steps"] == 0
        digests[decoder] = r["student_digest"]
    assert digests["vae"] != digests["tiny"]


def test_export_with_the_tiny_decoder_holds_parity_and_infers(tmp_path, micro_models, micro_student, world_prompts):
    from src.core.config import ExportConfig
    from src.export import Paths, export
    from src.serving.runtime import load_artifact, stream_images

    models, _ = micro_models
    out = tmp_path / "onnx"
    m = export(ExportConfig(parity_prompts=4, decoder="tiny", exporter="torchscript", opset=17),
               Paths(student=micro_student, out=out, reports=tmp_path / "rep",
                     eval_prompts=world_prompts / "eval.jsonl", tiny_decoder=models / "tiny_decoder"))
    assert m["psnr_fp32"] >= 40 and m["psnr_fp16"] >= 30
    assert json.loads((out / "onestep.json").read_text())["decoder"] == "AutoencoderTiny"
    assert "tiny decoder (TAESD format)" in (out / "README.md").read_text()
    art = load_artifact(out, "fp32", "cpu")
    [(index, image)] = list(stream_images(art, ["a red circle"], [0], 1))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    with pytest.raises(UserError, match="tiny_decoder"):
        export(ExportConfig(decoder="tiny"), Paths(student=micro_student, out=tmp_path / "o2", reports=tmp_path / "r2"))


def test_only_tiny_decoder_adds_it_to_an_existing_build(micro_models, tmp_path):
    """--only-tiny-decoder: the same scenes and seed as the full build give the same decoder; the build record
    keeps what it had and gains the tiny decoder's settings, metrics and wall time."""
    import shutil

    from safetensors.torch import load_file

    from src.world.build import MICRO, build_tiny_decoder, main

    models, _ = micro_models
    with pytest.raises(UserError, match="no VAE at"):
        build_tiny_decoder(MICRO, tmp_path)
    shutil.copytree(models / "teacher" / "vae", tmp_path / "teacher" / "vae")
    shutil.copy(models / "build.json", tmp_path / "build.json")
    main(["--scale", "micro", "--out", str(tmp_path), "--only-tiny-decoder"])
    record = json.loads((tmp_path / "build.json").read_text())
    assert record["config"]["unet_steps"] == MICRO.unet_steps and record["wall_s"]["tiny_decoder"] > 0
    assert "block_out_channels" not in json.loads((tmp_path / "tiny_decoder" / "config.json").read_text())
    name = "diffusion_pytorch_model.safetensors"
    rebuilt, built = load_file(tmp_path / "tiny_decoder" / name), load_file(models / "tiny_decoder" / name)
    assert all(torch.equal(rebuilt[k], built[k]) for k in built)
