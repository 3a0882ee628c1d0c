"""SwiftBrush v2's clamped CLIP loss: its formula, its clamp, its schedule and its use in distill."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from src.core.errors import UserError
from src.distill import clip_weight
from src.method.clip_loss import load_clip_loss


@pytest.fixture(scope="module")
def guide(micro_models):
    models, _ = micro_models
    return load_clip_loss(str(models / "guide"), tau=0.35)


def _cos_by_hand(guide, images, prompts):
    """Independent computation: processor-style normalisation at the CLIP's size, towers, cosine."""
    from transformers import CLIPProcessor

    proc = CLIPProcessor.from_pretrained(guide.model.name_or_path).image_processor
    mean, std = torch.tensor(proc.image_mean).view(1, 3, 1, 1), torch.tensor(proc.image_std).view(1, 3, 1, 1)
    assert images.shape[-1] == proc.crop_size["height"]        # no resize on this path
    img = guide.model.get_image_features(pixel_values=(images - mean) / std)
    ids = guide.tokenizer(prompts, padding="max_length", max_length=guide.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    txt = guide.model.get_text_features(input_ids=ids)
    img, txt = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (img, txt))
    return F.cosine_similarity(img, txt, dim=-1)


def test_clip_loss_is_the_clamped_cosine(guide):
    g = torch.Generator().manual_seed(0)
    prompts = ["a red circle at the top", "a big blue box on the left, white background", "a green cross"]
    images = torch.rand(3, 3, guide.size, guide.size, generator=g)
    cos = _cos_by_hand(guide, images, prompts)
    for tau in (float(cos.min()) - 0.1, float(cos.mean()), float(cos.max()) + 0.1):
        guide.tau = tau
        loss, stats = guide(images, guide.text_features(prompts))
        assert torch.allclose(loss, torch.clamp(tau - cos, min=0).mean(), atol=1e-5)
        assert torch.allclose(stats["clip_cos"], cos.mean(), atol=1e-5)
    guide.tau = 0.35


def test_clip_loss_pushes_only_images_below_the_clamp(guide):
    prompts = ["a red circle at the top", "a green cross"]
    images = torch.rand(2, 3, guide.size, guide.size, generator=torch.Generator().manual_seed(1))
    cos = _cos_by_hand(guide, images, prompts).detach()
    guide.tau = float(cos.mean())                              # between the two cosines
    assert cos.min() < guide.tau < cos.max()
    images.requires_grad_(True)
    loss, _ = guide(images, guide.text_features(prompts))
    loss.backward()
    below = int(cos.argmin())
    assert images.grad[below].abs().sum() > 0 and images.grad[1 - below].abs().sum() == 0
    guide.tau = 0.35


def test_images_of_another_size_are_resized_for_the_clip(guide):
    small = torch.rand(1, 3, guide.size // 2, guide.size // 2)
    loss, _ = guide(small, guide.text_features(["a red circle"]))
    assert torch.isfinite(loss)


def test_clip_weight_schedule():
    assert clip_weight(0.1, 0, 100, "linear_decay") == pytest.approx(0.1)
    assert clip_weight(0.1, 50, 100, "linear_decay") == pytest.approx(0.05)
    assert clip_weight(0.1, 100, 100, "linear_decay") == 0.0
    assert clip_weight(0.1, 70, 100, "constant") == 0.1


def test_a_folder_that_is_not_a_clip_is_refused(tmp_path):
    with pytest.raises(UserError, match="distill.clip_model.*no config.json"):
        load_clip_loss(str(tmp_path), tau=0.35)


def test_distill_with_the_clip_loss_logs_it_and_moves_the_student(tmp_path, micro_models, world_prompts):
    from src.core.config import DistillConfig
    from src.distill import Paths, distill

    models, _ = micro_models
    paths = Paths(train_prompts=world_prompts / "train.jsonl", eval_prompts=world_prompts / "eval.jsonl",
                  checkpoints=tmp_path / "ck", student=tmp_path / "student", reports=tmp_path / "reports")
    cfg = DistillConfig(teacher=str(models / "teacher"), steps=2, batch_size=2, lora_rank=4, lora_alpha=8,
                        log_every=1, val_every=2, val_prompts=2, clip_model=str(models / "guide"), clip_tau=1.0)
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    rows = (paths.reports / "live" / "plots" / "metrics" / "train" / "loss_clip.tsv").read_text().split()
    assert len(rows) == 2 * 3                                  # header + 2 steps, two columns each
    weights = (paths.reports / "live" / "plots" / "metrics" / "train" / "clip_weight.tsv").read_text().split()
    assert float(weights[3]) == pytest.approx(0.1) and float(weights[5]) == pytest.approx(0.05)
    assert json.loads((paths.reports / "metrics.json").read_text())["skipped_steps"] == 0
