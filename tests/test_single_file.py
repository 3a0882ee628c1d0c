"""Single-file checkpoints (the original key layout) out and in, checked by diffusers' own loader."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from src.artifact.single_file import write_single_file
from src.core.errors import UserError
from src.method.teacher import load_pipeline

PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _same_weights(a, b) -> None:
    for name in PARTS:
        if getattr(a, name, None) is None:
            continue
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert torch.equal(sa[k].float(), sb[k].float()), f"{name}.{k}"


def _read_back(path, config):
    import diffusers

    index = json.loads((config / "model_index.json").read_text())
    extra = {} if index["_class_name"] == "StableDiffusionXLPipeline" else {"safety_checker": None}
    return getattr(diffusers, index["_class_name"]).from_single_file(str(path), config=str(config),
                                                                      local_files_only=True, **extra)


@pytest.mark.parametrize("arch", ["world", "sd21", "sdxl"])
def test_a_pipeline_goes_out_as_one_file_and_diffusers_reads_back_the_same_weights(arch, micro_models, sdxl_folder,
                                                                                  tmp_path):
    """SD 1.x text encoders go out in CLIP's Hugging Face keys, SD 2.x's in OpenCLIP's (q|k|v in one
    in_proj), SDXL's first and second in theirs; VAE attention as 1x1 convolutions."""
    from src.layout import write_layout

    if arch == "world":
        folder = micro_models[0] / "teacher"
    elif arch == "sdxl":
        folder = sdxl_folder("micro")
    else:
        folder = tmp_path / arch
        write_layout(arch, folder, scale="micro")
    pipe = load_pipeline(str(folder))
    out = tmp_path / "model.safetensors"
    assert write_single_file(pipe, out) == out.stat().st_size
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.0.block.") for k in keys)
    text = {"world": "cond_stage_model.transformer.text_model.", "sd21": "cond_stage_model.model.transformer.resblocks.",
            "sdxl": "conditioner.embedders.1.model.transformer.resblocks."}[arch]
    assert any(k.startswith(text) for k in keys)
    _same_weights(pipe, _read_back(out, folder))


# Keys of the original SD 1.5 checkpoint (v1-5-pruned.safetensors) at the places where the layout is easiest to
# get wrong: diffusers' loader reads both upsampler positions, ComfyUI and AUTOMATIC1111 only the original's.
SD15_LANDMARKS = {
    "model.diffusion_model.input_blocks.3.0.op.weight": 4,          # the first downsampler
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": 4,
    "model.diffusion_model.output_blocks.2.1.conv.weight": 4,       # upsampler of the block without attention
    "model.diffusion_model.output_blocks.5.2.conv.weight": 4,       # ... and of one with attention
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": 2,
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": 2,
    "model.diffusion_model.time_embed.2.weight": 2,
    "model.diffusion_model.out.2.weight": 4,
    "first_stage_model.encoder.down.3.block.1.conv2.weight": 4,
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": 4,  # 512 -> 256 channels (up.3 is the widest)
    "first_stage_model.decoder.up.1.upsample.conv.weight": 4,
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": 4,      # attention as 1x1 convolutions
    "first_stage_model.encoder.norm_out.weight": 1,
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": 2,
}


def test_an_sd15_file_has_the_original_checkpoints_keys(tmp_path):
    from safetensors import safe_open

    from src.layout import write_layout

    write_layout("sd15", tmp_path / "sd15", scale="tiny")        # every config value but the widths
    out = tmp_path / "sd15.safetensors"
    write_single_file(load_pipeline(str(tmp_path / "sd15")), out)
    with safe_open(str(out), framework="pt") as f:
        dims = {k: len(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: dims.get(k) for k in SD15_LANDMARKS} == SD15_LANDMARKS


def test_a_single_file_teacher_distils_to_the_same_student_as_its_folder(micro_models, world_prompts, tmp_path,
                                                                         monkeypatch):
    from src.core.config import DistillConfig
    from src.distill import Paths, distill

    monkeypatch.setenv("SWIFTBRUSH_CACHE", str(tmp_path / "cache"))
    folder = micro_models[0] / "teacher"
    single = tmp_path / "teacher.safetensors"
    write_single_file(load_pipeline(str(folder)), single)
    students = []
    for name, teacher, config in (("folder", str(folder), None), ("file", str(single), str(folder))):
        out = tmp_path / name
        distill(DistillConfig(teacher=teacher, teacher_config=config, steps=2, batch_size=2, lora_rank=4,
                              lora_alpha=8, val_every=100, val_prompts=2),
                lr=1e-4, seed=0, paths=Paths(train_prompts=world_prompts / "train.jsonl",
                                             eval_prompts=world_prompts / "eval.jsonl", checkpoints=out / "ck",
                                             student=out / "student", reports=out / "rep"))
        students.append(load_pipeline(str(out / "student")))
    _same_weights(*students)
    assert len(list((tmp_path / "cache" / "single_file").iterdir())) == 1        # converted once, kept


def test_a_file_that_does_not_fit_its_architecture_is_one_clear_error(micro_models, sdxl_folder, tmp_path):
    from src.layout import single_file_teacher

    single = tmp_path / "world.safetensors"
    write_single_file(load_pipeline(str(micro_models[0] / "teacher")), single)
    with pytest.raises(UserError, match="does not (load as|fit)"):
        single_file_teacher(single, str(sdxl_folder("micro")), cache=tmp_path / "cache")
    with pytest.raises(UserError, match="expected one of sd15, sd21-base, sd21, sdxl"):
        single_file_teacher(single, "sd3", cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "single_file").exists() or not any((tmp_path / "cache" / "single_file").iterdir())
    from src.core.config import DistillConfig

    with pytest.raises(ValueError, match="set teacher_config"):
        DistillConfig(teacher=str(single))


def test_named_architectures_are_config_folders_diffusers_reads(tmp_path):
    """The published configs written without weights: what from_single_file needs offline."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from src.layout import TEXT_ENCODER_2, UNET, write_configs

    for arch in ("sd15", "sdxl"):
        folder = write_configs(arch, tmp_path / arch)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == ("StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline")
        unet = UNet2DConditionModel.load_config(folder, subfolder="unet")
        assert unet["block_out_channels"] == list(UNET[arch]["block_out_channels"])
        assert AutoencoderKL.load_config(folder, subfolder="vae")["latent_channels"] == 4
        assert not list(folder.rglob("*.safetensors"))
    from transformers import CLIPTextConfig

    assert CLIPTextConfig.from_pretrained(tmp_path / "sdxl" / "text_encoder_2").hidden_size == \
        TEXT_ENCODER_2["sdxl"]["hidden_size"]


def test_export_writes_the_student_as_one_file(micro_student, tmp_path):
    from tests.test_serve import REPO

    out = tmp_path / "student.safetensors"
    run = subprocess.run([sys.executable, "-m", "src.export", "--student", str(micro_student), "--single-file",
                          str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    _same_weights(load_pipeline(str(micro_student)), _read_back(out, micro_student))
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["swiftbrush_timestep"] == "899"
