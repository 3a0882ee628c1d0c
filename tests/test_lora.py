"""The student as a LoRA: the truncated-SVD math, and the folder read by stock diffusers in both formats."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from src.artifact.lora import DIFFUSERS_FILE, apply, extract, low_rank, write

PROMPTS, SEEDS, T_S = ["a red circle at the top on a blue background", "a big white box"], [3, 4], 899


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3)])
def test_low_rank_is_the_eckart_young_optimum(shape):
    """||dW - up @ down||^2 is exactly the energy of the dropped singular values (numpy's own SVD), the
    kept fraction is the rest, and at full rank the difference is reproduced."""
    rng = np.random.default_rng(0)
    delta = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    s = np.linalg.svd(delta.reshape(shape[0], -1).double().numpy(), compute_uv=False)
    for r in (1, 5, 100):
        down, up, kept = low_rank(delta, r)
        k = min(r, len(s))
        assert down.shape == (k, *shape[1:]) and up.shape == (shape[0], k, *([1] * (len(shape) - 2)))
        approx = up.reshape(shape[0], k).double() @ down.reshape(k, -1).double()
        err = float(((delta.reshape(shape[0], -1).double() - approx) ** 2).sum())
        assert err == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-4, abs=1e-6)
        assert kept == pytest.approx(float((s[:k] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    np.testing.assert_allclose(approx.numpy(), delta.reshape(shape[0], -1).numpy(), atol=1e-4)


def _perturbed(unet, seed: int = 0):
    """A 'student': every Linear / Conv2d weight of `unet` moved by a random amount (biases kept)."""
    student = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                m.weight += 0.2 * m.weight.std() * torch.randn(m.weight.shape, generator=g)
    return student


@pytest.fixture(scope="module")
def lora_folder(micro_models, tmp_path_factory):
    """A full-rank LoRA of a perturbed micro UNet on the micro teacher (per-module ranks differ)."""
    from diffusers import UNet2DConditionModel

    teacher_dir = micro_models[0] / "teacher"
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet")
    student = _perturbed(teacher)
    lora = extract(student, teacher, rank=10**6)
    out = tmp_path_factory.mktemp("lora") / "student_lora"
    write(out, lora, "StableDiffusionPipeline", T_S, "student_lora")
    return teacher_dir, student, lora, out


def _ours(teacher_dir, unet):
    """Our one-step images of `unet` at T_S on the teacher's pipeline (what src.infer draws)."""
    from src.method.onestep import one_step_images
    from src.method.teacher import alphas_cumprod, load_pipeline

    pipe = load_pipeline(str(teacher_dir))
    return one_step_images(pipe, unet, PROMPTS, SEEDS, alphas_cumprod(pipe), timestep=T_S)


def _stock(teacher_dir, folder, **load):
    """Stock diffusers: the teacher + load_lora_weights + the documented one-step LCM call."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from src.method.noise import initial_noise

    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(folder, **load)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    c = pipe.unet.config
    latents = torch.from_numpy(initial_noise(SEEDS, (c.in_channels, c.sample_size, c.sample_size)))
    images = pipe(PROMPTS, num_inference_steps=1, timesteps=[T_S], guidance_scale=0, latents=latents,
                  output_type="np").images
    return pipe, (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def test_full_rank_extraction_reproduces_the_student_weights(lora_folder):
    teacher_dir, student, lora, out = lora_folder
    from diffusers import UNet2DConditionModel

    ours = apply(UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet"), lora)
    for (name, a), b in zip(ours.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    assert lora.kept == pytest.approx(1.0) and lora.left_out == 0.0
    assert len(set(lora.ranks.values())) > 1                     # per-module ranks: the metadata must carry them
    m = json.loads((out / "metrics.json").read_text())
    assert m["modules"] == len(lora.ranks) and m["timestep"] == T_S
    assert "timesteps=[899]" in (out / "README.md").read_text()


def test_stock_load_lora_weights_draws_the_students_image(lora_folder):
    teacher_dir, student, _, out = lora_folder
    _, stock = _stock(teacher_dir, out)
    ours = _ours(teacher_dir, student)
    assert np.abs(stock.astype(int) - ours.astype(int)).max() <= 1


def test_the_kohya_file_gives_the_same_image(lora_folder):
    from safetensors.torch import load_file

    teacher_dir, _, _, out = lora_folder
    keys = load_file(str(out / "student_lora_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert all(f"{k.split('.')[0]}.alpha" in keys for k in keys if k.endswith("lora_down.weight"))
    _, via_diffusers = _stock(teacher_dir, out, weight_name=DIFFUSERS_FILE)
    pipe, via_kohya = _stock(teacher_dir, out, weight_name="student_lora_kohya.safetensors")
    assert np.abs(via_kohya.astype(int) - via_diffusers.astype(int)).max() <= 1


def test_unfuse_gives_the_teacher_back(lora_folder):
    from diffusers import UNet2DConditionModel

    teacher_dir, _, _, out = lora_folder
    pipe, _ = _stock(teacher_dir, out)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet").state_dict()
    pipe.fuse_lora()
    pipe.unfuse_lora()
    base = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    for k, v in teacher.items():
        torch.testing.assert_close(base[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_low_rank_loses_weight_energy_and_the_cli_reports_it(lora_folder, tmp_path, micro_student, micro_models):
    """The CLI on a distilled student: a smaller rank keeps less of the change; bias and norm changes are
    reported as left out."""
    import subprocess
    import sys

    from tests.test_serve import REPO

    teacher_dir = micro_models[0] / "teacher"
    from src.lora import main

    kept = []
    for rank in (1, 4):
        out = tmp_path / f"r{rank}"
        main(["--student", str(micro_student), "--teacher", str(teacher_dir), "--rank", str(rank), "--out", str(out)])
        kept.append(json.loads((out / "metrics.json").read_text())["kept_energy"])
    assert 0 < kept[0] < kept[1] <= 1
    bad = subprocess.run([sys.executable, "-m", "src.lora", "--student", str(teacher_dir), "--teacher",
                          str(teacher_dir), "--out", str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "not a one-step student" in bad.stderr and "Traceback" not in bad.stderr


def test_a_lora_student_ships_its_adapter_for_the_teacher(micro_models, world_prompts, tmp_path):
    """distill.student: lora writes lora/ beside the merged pipeline: the stock teacher with it draws the
    merged student's image."""
    from diffusers import UNet2DConditionModel

    from src.core.config import DistillConfig
    from src.distill import Paths, distill

    teacher_dir = micro_models[0] / "teacher"
    distill(DistillConfig(teacher=str(teacher_dir), steps=2, batch_size=2, lora_rank=4, lora_alpha=8, val_every=100,
                          val_prompts=2, student_timestep=T_S, student="lora", student_lora_rank=4,
                          student_lora_alpha=8),
            lr=1e-2, seed=0, paths=Paths(train_prompts=world_prompts / "train.jsonl",
                                         eval_prompts=world_prompts / "eval.jsonl", checkpoints=tmp_path / "ck",
                                         student=tmp_path / "student", reports=tmp_path / "rep"))
    folder = tmp_path / "student" / "lora"
    assert (folder / DIFFUSERS_FILE).is_file() and (folder / "student_lora_kohya.safetensors").is_file()
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "student", subfolder="unet")
    _, stock = _stock(teacher_dir, folder)
    ours = _ours(teacher_dir, merged)
    assert np.abs(stock.astype(int) - ours.astype(int)).max() <= 1
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir, subfolder="unet").state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in merged.state_dict().items())   # it did train
