"""Shared fixtures. Tests never touch the network: hub access is switched off here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _make_tiny_unet(seed: int = 0):
    """A tiny Stable-Diffusion-layout UNet (8x8 latents, 16-d text), seeded: fast enough for autograd checks."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)


@pytest.fixture
def tiny_unet():
    """Builder of the tiny seeded UNet: `tiny_unet(seed=0)` gives a fresh model on every call."""
    return _make_tiny_unet


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """Builder of SDXL base teacher folders with random weights (src.layout): `sdxl_folder("tiny")` or
    `sdxl_folder("micro")`, each written once per session."""
    from src.layout import write_layout

    made: dict[str, Path] = {}

    def build(scale: str) -> Path:
        if scale not in made:
            made[scale] = tmp_path_factory.mktemp(f"sdxl_{scale}") / "teacher"
            write_layout("sdxl", made[scale], scale=scale, seed=0)
        return made[scale]
    return build


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A freshly built world tokenizer (the same code that made the committed one)."""
    from src.world.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def micro_models(tmp_path_factory, tokenizer_dir):
    """Teacher + evaluator from the real build code at micro scale: (folder, build record)."""
    from src.world.build import MICRO, build

    out = tmp_path_factory.mktemp("models")
    record = build(MICRO, out, tokenizer_dir)
    return out, record


@pytest.fixture(scope="session")
def world_prompts(tmp_path_factory, tokenizer_dir) -> Path:
    """A small prepared prompt folder (train.jsonl, eval.jsonl) from the world grammar."""
    from src.core.config import PrepareConfig, SourceConfig, WorldConfig
    from src.prepare import prepare

    out = tmp_path_factory.mktemp("prompts")
    prepare(PrepareConfig(tokenizer=str(tokenizer_dir), train=SourceConfig(limit=64), eval=SourceConfig(limit=8)),
            WorldConfig(), 0, out)
    return out


@pytest.fixture(scope="session")
def micro_student(tmp_path_factory, micro_models, world_prompts) -> Path:
    """A student pipeline from two real distillation steps on the micro teacher, at a student timestep
    other than T-1 so that export and inference have to carry it."""
    from src.core.config import DistillConfig
    from src.distill import Paths as DistillPaths
    from src.distill import distill

    models, _ = micro_models
    out = tmp_path_factory.mktemp("student")
    distill(DistillConfig(teacher=str(models / "teacher"), steps=2, batch_size=2, lora_rank=4, lora_alpha=8,
                          val_every=100, val_prompts=2, student_timestep=899),
            lr=1e-4, seed=0, paths=DistillPaths(train_prompts=world_prompts / "train.jsonl",
                                                eval_prompts=world_prompts / "eval.jsonl",
                                                checkpoints=out / "ck", student=out / "student",
                                                reports=out / "rep"))
    return out / "student"


@pytest.fixture(scope="session")
def micro_onnx(tmp_path_factory, micro_student, world_prompts):
    """The micro student exported as the stage does by default (dynamo exporter; fp32 + fp16 + manifest):
    (folder, export metrics)."""
    from src.core.config import ExportConfig
    from src.export import Paths, export

    root = tmp_path_factory.mktemp("export")
    metrics = export(ExportConfig(parity_prompts=4), Paths(student=micro_student, out=root / "onnx",
                                                           reports=root / "rep",
                                                           eval_prompts=world_prompts / "eval.jsonl"))
    return root / "onnx", metrics


@pytest.fixture(scope="session")
def micro_onnx_b(tmp_path_factory, micro_student, world_prompts) -> Path:
    """A second, different export: the micro student with its UNet's output bias shifted (other images)."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from src.core.config import ExportConfig
    from src.export import Paths, export

    root = tmp_path_factory.mktemp("export_b")
    student = root / "student"
    shutil.copytree(micro_student, student)
    unet = UNet2DConditionModel.from_pretrained(student / "unet")
    with torch.no_grad():
        unet.conv_out.bias += 0.5
    unet.save_pretrained(student / "unet")
    export(ExportConfig(parity_prompts=1, exporter="torchscript", opset=17), Paths(student=student, out=root / "onnx", reports=root / "rep",
                                                 eval_prompts=world_prompts / "eval.jsonl"))
    return root / "onnx"
