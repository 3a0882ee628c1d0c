"""The SDXL-layout world at micro scale: the build makes an SDXL teacher (two text encoders, text-time UNet)
that stock diffusers loads, trained on the conditioning the stock pipeline draws with, and its one-step
student goes through distill, evaluate (world mode), export and the ONNX runtime."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sdxl_world(tmp_path_factory, tokenizer_dir):
    from src.world.build import MICRO, build

    out = tmp_path_factory.mktemp("sdxl_world")
    record = build(replace(MICRO, layout="sdxl"), out, tokenizer_dir)
    return out, record


def test_the_build_makes_an_sdxl_teacher_that_stock_diffusers_loads_and_draws(sdxl_world):
    from diffusers import StableDiffusionXLPipeline

    from src.method.teacher import check_pipeline_folder

    models, record = sdxl_world
    teacher = models / "teacher"
    assert check_pipeline_folder(teacher) == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(teacher, local_files_only=True)
    cfg = pipe.unet.config
    hidden_1, hidden_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert cfg.addition_embed_type == "text_time" and cfg.cross_attention_dim == hidden_1 + hidden_2
    assert cfg.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 8
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert (teacher / "tokenizer_2" / "vocab.json").is_file()
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert "text_clip_2_retrieval_accuracy" in record["metrics"] and record["unet_curve"]


def test_the_second_text_encoder_is_the_clips_text_tower_and_projection(tokenizer_dir):
    from transformers import CLIPTokenizer

    from src.core.text import padded_token_ids
    from src.world.build import ClipSpec, make_clip, text_encoder_with_projection

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    clip = make_clip(ClipSpec(hidden=32, layers=1, heads=2, seed=5), tokenizer, 32).eval()
    encoder = text_encoder_with_projection(clip)
    ids = padded_token_ids(tokenizer, ["a red circle", "a small blue square at the top"])
    with torch.no_grad():
        ours = encoder(ids, output_hidden_states=True)
        text = clip.text_model(ids, output_hidden_states=True)
        projected = clip.text_projection(text.pooler_output)
    assert torch.equal(ours.text_embeds, projected)
    assert torch.equal(ours.hidden_states[-2], text.hidden_states[-2])


def test_dropped_captions_are_trained_as_the_pipelines_unconditional_branch(sdxl_world):
    """For SDXL the empty caption's conditioning is zeros (force_zeros_for_empty_prompt), as the stock
    pipeline's negative branch: the teacher learns the unconditional score it is later guided with."""
    from diffusers import StableDiffusionXLPipeline

    from src.method.conditioning import encode
    from src.world.build import caption_conditioning

    models, _ = sdxl_world
    pipe = StableDiffusionXLPipeline.from_pretrained(models / "teacher", local_files_only=True)
    ours = caption_conditioning(pipe, ["a red circle", ""])
    plain = encode(pipe, ["a red circle", ""])
    assert torch.equal(ours.context[0], plain.context[0]) and torch.equal(ours.text_embeds[0], plain.text_embeds[0])
    assert plain.context[1].abs().sum() > 0                           # the encoder's own "" is not zeros
    _, negative, _, negative_pooled = pipe.encode_prompt("a red circle", do_classifier_free_guidance=True)
    assert torch.equal(ours.context[1], negative[0]) and torch.equal(ours.text_embeds[1], negative_pooled[0])
    assert torch.equal(ours.time_ids, plain.time_ids)


def test_an_sdxl_world_student_goes_through_every_stage(sdxl_world, world_prompts, tmp_path):
    from src.core.config import DistillConfig, EvaluateConfig, ExportConfig
    from src.distill import Paths as DistillPaths
    from src.distill import distill
    from src.evaluate import Paths as EvalPaths
    from src.evaluate import evaluate
    from src.export import Paths as ExportPaths
    from src.export import export
    from src.method.onestep import one_step_images
    from src.method.teacher import alphas_cumprod, load_pipeline
    from src.serving.runtime import load_artifact, stream_images

    models, _ = sdxl_world
    teacher = str(models / "teacher")
    student = tmp_path / "student"
    result = distill(DistillConfig(teacher=teacher, steps=2, batch_size=2, lora_rank=4, lora_alpha=8,
                                   clip_model=str(models / "guide"), val_every=100, val_prompts=2),
                     lr=1e-4, seed=0, paths=DistillPaths(train_prompts=world_prompts / "train.jsonl",
                                                         eval_prompts=world_prompts / "eval.jsonl",
                                                         checkpoints=tmp_path / "ck", student=student,
                                                         reports=tmp_path / "rep_distill"))
    assert result["steps"] == 2 and np.isfinite(result["student_digest"])
    assert json.loads((student / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    metrics = evaluate(EvaluateConfig(evaluator=str(models / "evaluator"), teacher_steps=2, batch_size=4,
                                      bootstrap=20, grid_rows=2),
                       teacher, EvalPaths(eval_prompts=world_prompts / "eval.jsonl", student=student,
                                          images=tmp_path / "img", reports=tmp_path / "rep_eval"))
    assert {"teacher_1", "teacher_2", "student_1"} <= set(metrics)
    assert all(np.isfinite(metrics[k]["fid"]) for k in ("teacher_1", "teacher_2", "student_1"))
    intervals = json.loads((tmp_path / "rep_eval" / "intervals.json").read_text())
    assert "fid" in intervals["vs_teacher"]["student_1"]

    exported = export(ExportConfig(parity_prompts=2, exporter="torchscript", opset=17, fuse="none"),
                      ExportPaths(student=student, out=tmp_path / "onnx", reports=tmp_path / "rep_export",
                                  eval_prompts=world_prompts / "eval.jsonl"))
    assert exported["psnr_fp32"] >= 40 and exported["psnr_fp16"] >= 30
    prompts, seeds = ["a red circle at the top on a blue background", "a green square"], [3, 4]
    pipe = load_pipeline(str(student))
    ours = one_step_images(pipe, pipe.unet, prompts, seeds, alphas_cumprod(pipe))
    art = load_artifact(tmp_path / "onnx", "fp32", "cpu")
    drawn = np.stack([img for _, img in stream_images(art, prompts, seeds, batch_size=2)])
    assert drawn.shape == (2, 32, 32, 3) and np.abs(drawn.astype(int) - ours.astype(int)).max() <= 1
