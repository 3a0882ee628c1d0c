"""The embedded teacher/evaluator build, run at micro scale: real classes, real loading path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.core.errors import UserError
from src.world.build import MICRO, apply_build_overrides
from src.world.training import object_weights


def test_teacher_loads_with_the_stock_pipeline_and_is_sd_shaped(micro_models):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    out, _ = micro_models
    pipe = StableDiffusionPipeline.from_pretrained(out / "teacher", dtype=torch.float32, local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    sc = pipe.scheduler.config
    assert (sc.num_train_timesteps, sc.beta_schedule, sc.prediction_type) == (1000, "scaled_linear", "epsilon")
    assert (sc.beta_start, sc.beta_end) == (0.00085, 0.012)
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    # Weights are stored in fp16 safetensors.
    from safetensors import safe_open
    with safe_open(out / "teacher" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    # Same seed, same image; the image has the world's resolution.
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe("a red circle in the center on a blue background", num_inference_steps=2,
                       generator=torch.Generator().manual_seed(0), output_type="np").images
    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)


def test_teacher_text_encoder_is_the_contrastive_text_tower_frozen(micro_models):
    from transformers import CLIPTextModel

    out, _ = micro_models
    te = CLIPTextModel.from_pretrained(out / "teacher" / "text_encoder")
    assert te.config.eos_token_id == 728 and te.config.max_position_embeddings == 77


def test_evaluator_is_a_clip_model_with_processor(micro_models):
    from transformers import CLIPModel, CLIPProcessor

    out, record = micro_models
    model = CLIPModel.from_pretrained(out / "evaluator")
    proc = CLIPProcessor.from_pretrained(out / "evaluator")
    inputs = proc(text=["a red circle"], images=[np.zeros((32, 32, 3), np.uint8)], return_tensors="pt",
                  padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model(**inputs).logits_per_image.shape == (1, 1)
    assert set(record["metrics"]) >= {"clip_retrieval_accuracy", "vae_psnr", "vae_judge_accuracy"}
    on_disk = json.loads((out / "build.json").read_text())
    assert on_disk["config"]["unet_steps"] == MICRO.unet_steps and on_disk["wall_s"]["total"] > 0


def test_guide_clip_is_its_own_model_and_can_be_built_alone(micro_models, tmp_path, tokenizer_dir):
    """models/guide (distill's CLIP loss) is a third CLIP, not the evaluator; --only-guide adds it to a build."""
    import shutil

    from safetensors.torch import load_file

    from src.world.build import build_guide

    out, record = micro_models
    guide = load_file(out / "guide" / "model.safetensors")
    evaluator = load_file(out / "evaluator" / "model.safetensors")
    assert guide.keys() == evaluator.keys()
    assert any(not torch.equal(guide[k], evaluator[k]) for k in guide)     # another seed, other weights
    assert "guide_clip_retrieval_accuracy" in record["metrics"]

    shutil.copy(out / "build.json", tmp_path / "build.json")
    again = build_guide(MICRO, tmp_path, tokenizer_dir)
    assert (tmp_path / "guide" / "model.safetensors").is_file()
    assert again["config"]["unet_steps"] == MICRO.unet_steps                 # the existing record is kept
    assert again["wall_s"]["guide_clip"] > 0
    rebuilt = load_file(tmp_path / "guide" / "model.safetensors")
    assert all(torch.equal(rebuilt[k], guide[k]) for k in guide)           # same seed, same scenes: same model


def test_measure_writes_metrics_table_and_grid(micro_models, tmp_path, tokenizer_dir):
    from src.core.config import PrepareConfig, SourceConfig, WorldConfig
    from src.prepare import prepare
    from src.world.measure import measure

    out, _ = micro_models
    prepare(PrepareConfig(tokenizer=str(tokenizer_dir), train=SourceConfig(limit=2), eval=SourceConfig(limit=3)),
            WorldConfig(), 0, tmp_path / "prompts")
    m = measure(out / "teacher", out / "evaluator", tmp_path / "prompts" / "eval.jsonl", tmp_path / "rep",
                steps=2, grid_rows=3)
    assert {"attribute_accuracy_2", "attribute_accuracy_1", "vae_psnr", "clip_retrieval_accuracy"} <= set(m)
    assert m["truth_judge_accuracy"] == 1.0  # ground truth is read correctly, so the metric can be trusted
    assert (tmp_path / "rep" / "grid.png").stat().st_size > 0
    assert "attribute accuracy" in (tmp_path / "rep" / "README.md").read_text()


def test_measure_names_missing_inputs(tmp_path):
    from src.world.measure import load_eval_prompts, load_teacher

    with pytest.raises(UserError, match="dvc repro prepare"):
        load_eval_prompts(tmp_path / "eval.jsonl")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        load_teacher(tmp_path)


def test_object_weights_mark_pixels_unlike_the_background():
    x = torch.full((1, 3, 8, 8), -1.0)
    x[0, 0, 2:4, 2:4] = 1.0  # a red 2x2 object
    w = object_weights(x, 10.0)
    assert w.shape == (1, 1, 8, 8) and w.sum().item() == 60 + 4 * 10


def test_build_overrides_are_type_checked():
    cfg = apply_build_overrides(MICRO, ["unet_steps=7", "text.steps=2", "vae_lr=1e-3", "vae_channels=[8,8]"])
    assert (cfg.unet_steps, cfg.text.steps, cfg.vae_lr, cfg.vae_channels) == (7, 2, 1e-3, (8, 8))
    with pytest.raises(UserError, match="unknown build key"):
        apply_build_overrides(MICRO, ["unet_stps=7"])
    with pytest.raises(UserError, match="expected int"):
        apply_build_overrides(MICRO, ["unet_steps=many"])
