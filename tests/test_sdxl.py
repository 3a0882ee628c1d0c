"""SDXL teachers through the stages, at tiny size: distill trains a one-step SDXL student that the stock
StableDiffusionXLPipeline loads and draws exactly as our one-step generator does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate_coco import coco, coco_cfg  # noqa: F401 (the COCO-format set fixture)


@pytest.fixture(scope="module")
def sdxl_teacher(sdxl_folder):
    return sdxl_folder("micro")             # shallow: whole stages in seconds


@pytest.fixture(scope="module")
def sdxl_student(tmp_path_factory, sdxl_teacher, world_prompts):
    from src.core.config import DistillConfig
    from src.distill import Paths, distill

    out = tmp_path_factory.mktemp("sdxl_student")
    metrics = distill(DistillConfig(teacher=str(sdxl_teacher), steps=2, batch_size=2, lora_rank=4, lora_alpha=8,
                                    resolution=128, val_every=100, val_prompts=2, student_timestep=899),
                      lr=1e-4, seed=0, paths=Paths(train_prompts=world_prompts / "train.jsonl",
                                                   eval_prompts=world_prompts / "eval.jsonl",
                                                   checkpoints=out / "ck", student=out / "student",
                                                   reports=out / "rep"))
    return out / "student", metrics


def test_distill_on_an_sdxl_teacher_trains_and_saves_an_sdxl_student(sdxl_student, sdxl_teacher):
    from diffusers import StableDiffusionXLPipeline

    student, metrics = sdxl_student
    assert metrics["steps"] == 2 and np.isfinite(metrics["student_digest"])
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(student, local_files_only=True)
    teacher = StableDiffusionXLPipeline.from_pretrained(sdxl_teacher, local_files_only=True)
    assert pipe.unet.config.sample_size == 16                      # distill.resolution 128 / 8
    moved = [n for n, p in pipe.unet.state_dict().items() if not torch.equal(p, teacher.unet.state_dict()[n])]
    assert moved                                                   # the student is not the teacher
    for part in ("text_encoder", "text_encoder_2", "vae"):         # the frozen parts ship unchanged
        a, b = getattr(pipe, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_the_stock_sdxl_pipeline_draws_our_one_step_image(sdxl_student):
    from diffusers import StableDiffusionXLPipeline

    from src.method.noise import initial_noise
    from src.method.onestep import one_step_images, timestep_of
    from src.method.teacher import alphas_cumprod, load_pipeline

    student, _ = sdxl_student
    prompts, seeds = ["a red circle at the top on a blue background", "a green square"], [3, 4]
    ours_pipe = load_pipeline(str(student))
    ours = one_step_images(ours_pipe, ours_pipe.unet, prompts, seeds, alphas_cumprod(ours_pipe))
    stock = StableDiffusionXLPipeline.from_pretrained(student, local_files_only=True)
    assert timestep_of(stock) == 899
    latents = torch.from_numpy(initial_noise(seeds, (4, 16, 16)))
    theirs = stock(prompts, num_inference_steps=1, guidance_scale=1.0, latents=latents, output_type="np").images
    theirs = (np.clip(theirs, 0, 1) * 255).round().astype(np.uint8)
    assert theirs.shape == ours.shape == (2, 128, 128, 3)
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 1
    from diffusers import LCMScheduler                      # the model card's call with a stock scheduler

    stock.scheduler = LCMScheduler.from_config(stock.scheduler.config)
    lcm = stock(prompts, num_inference_steps=1, timesteps=[899], guidance_scale=0, latents=latents,
                output_type="np").images
    lcm = (np.clip(lcm, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(lcm.astype(int) - ours.astype(int)).max() <= 1


def test_a_teacher_folder_missing_its_second_encoder_is_refused_by_name(sdxl_teacher, tmp_path):
    import shutil

    from src.core.errors import UserError
    from src.method.teacher import load_pipeline

    broken = tmp_path / "teacher"
    shutil.copytree(sdxl_teacher, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UserError, match="not a Stable Diffusion XL pipeline: missing text_encoder_2"):
        load_pipeline(str(broken))


@pytest.fixture(scope="module")
def sdxl_onnx(tmp_path_factory, sdxl_student, world_prompts):
    from src.core.config import ExportConfig
    from src.export import Paths, export

    student, _ = sdxl_student
    out = tmp_path_factory.mktemp("sdxl_onnx")
    metrics = export(ExportConfig(fuse="none", parity_prompts=2),
                     Paths(student=student, out=out / "onnx", reports=out / "rep",
                           eval_prompts=world_prompts / "eval.jsonl"))
    return out / "onnx", metrics


def test_the_sdxl_artifact_takes_both_token_inputs_and_keeps_parity(sdxl_onnx):
    import onnx

    folder, metrics = sdxl_onnx
    assert metrics["psnr_fp32"] >= 40 and metrics["psnr_fp16"] >= 30
    contract = json.loads((folder / "onestep.json").read_text())
    assert contract["family"] == "sdxl" and contract["resolution"] == 128
    assert contract["time_ids"] == [128, 128, 0, 0, 128, 128]
    assert contract["tokenizer_2"]["pad_id"] == 0 and (folder / "tokenizer_2.json").is_file()
    model = onnx.load(str(folder / "fp16" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "input_ids_2", "noise"]
    dtype = {t.name: t.data_type for t in model.graph.initializer}
    # the VAE overflows in float16 (force_upcast): its convolutions run in float32 (their half-stored weights
    # cast up), the UNet's in float16
    vae = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/vae/")]
    unet = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith("/unet/")]
    assert vae and all(n.input[1].endswith("_cast_to_fp32") for n in vae)
    assert unet and {dtype.get(n.input[1]) for n in unet} == {onnx.TensorProto.FLOAT16}
    assert "`input_ids_2`" in (folder / "README.md").read_text()


def test_infer_and_the_service_draw_the_pytorch_students_images(sdxl_onnx, sdxl_student):
    from src.method.onestep import one_step_images
    from src.method.teacher import alphas_cumprod, load_pipeline
    from src.serving.runtime import load_artifact, stream_images
    from src.serving.service import load_model

    folder, _ = sdxl_onnx
    prompts, seeds = ["a red circle at the top on a blue background", "a green square"], [3, 4]
    pipe = load_pipeline(str(sdxl_student[0]))
    ours = one_step_images(pipe, pipe.unet, prompts, seeds, alphas_cumprod(pipe))
    art = load_artifact(folder, "fp32", "cpu")
    ids, _ = art.token_ids(prompts)
    assert ids.shape == (2, 2, 77)
    onnx_images = np.stack([img for _, img in stream_images(art, prompts, seeds, batch_size=2)])
    assert np.abs(onnx_images.astype(int) - ours.astype(int)).max() <= 1
    served = load_model(folder, "fp16", "cpu", threads=1)            # verified, loaded and warmed up
    assert served.tokenizer_2 is not None and served.version == art.version


def test_coco_mode_evaluates_an_sdxl_teacher_and_its_student(tmp_path, coco, micro_models, sdxl_teacher,  # noqa: F811 (the fixture)
                                                               sdxl_student):
    """The paper's protocol with an SDXL teacher: every generator drawn at the student's resolution and resized
    to COCO's 256 px as for SD (the scoring itself is SD's, run end to end by tests/test_evaluate_coco.py)."""
    import torch

    from src.evaluate import Paths, checked_records, generate_all, process_state

    models, _ = micro_models
    paths = Paths(eval_prompts=coco / "prompts" / "eval.jsonl", student=sdxl_student[0], images=tmp_path / "img",
                  reports=tmp_path / "rep")
    cfg = coco_cfg(coco, models)
    records = checked_records(cfg, paths)
    names = generate_all(cfg, str(sdxl_teacher), paths, records, torch.device("cpu"), process_state())
    assert set(names) == {"teacher_1", "teacher_2", "student_1"}
    for name in names:
        drawn = [np.asarray(Image.open(p)) for p in sorted((paths.images / name).glob("*.png"))]
        assert len(drawn) == len(records) and all(d.shape == (256, 256, 3) for d in drawn), name
    assert not np.array_equal(*(np.asarray(Image.open(next((paths.images / n).glob("*.png"))))
                                for n in ("teacher_2", "student_1")))
