"""The real-size rehearsal's own code at --scale tiny: every stage as its own process on an SD layout."""

from __future__ import annotations

import pytest

from src.bench.fullsize import Settings, lora_student_params, rehearse, report, static_gb


@pytest.mark.timeout(900)
def test_rehearsal_runs_every_stage_on_a_tiny_sd21_layout(tmp_path):
    """SD 2.1's layout (DDIM, v-prediction, upcast attention, the real tokenizer) through layout ->
    prepare -> distill (killed after its checkpoint, resumed) -> stock diffusers -> export -> infer -> serve, as
    `python -m src.bench.fullsize --scale tiny` runs it. COCO evaluate is left out here (its three 2048-d
    FID square roots cost ~45 s): tests/test_evaluate_coco.py runs it end to end, in one process and two. The
    legacy TorchScript exporter keeps it ~30 s shorter; the default dynamo exporter is exercised by the export
    tests and, at full size, by `python -m src.bench.exporter --arch sd21-base`."""
    s = Settings(resolution=64, steps=3, eval_prompts=2, teacher_steps=2, evaluate=False, exporter="torchscript")
    entry = rehearse("sd21", "micro", tmp_path / "w", s, limit_gb=20.0)
    stages = entry["stages"]
    assert stages["distill_killed"]["note"].startswith("killed"), stages
    failed = {k: v for k, v in stages.items() if k != "distill_killed" and not v["ok"]}
    assert not failed, failed
    assert entry["checkpoint"]["resumed_at_step"] == 2
    assert entry["export"]["psnr_fp32"] >= 40 and entry["export"]["psnr_fp16"] >= 30
    assert entry["psnr_fp32"] >= 40                         # infer (ONNX) vs stock diffusers, uint8 images
    assert "evaluate" not in stages
    assert stages["serve"]["ok"] and entry["serve"]["same_image_as_infer"] is True, entry.get("serve")
    text = report({"sd21-tiny": entry}, "test machine")
    assert "| distill_resume | ok |" in text


def test_static_memory_arithmetic():
    """Full student: teacher + student weights (4 B each) + grads and Adam (12 B per trainable weight)."""
    full = static_gb("sd21-base", {"student": "full", "frozen_dtype": "float32"})
    n = 865_910_724 / 2**30
    assert full["teacher_unet"] == pytest.approx(4 * n) and full["student_grads_adam"] == pytest.approx(12 * n)
    lora = static_gb("sd21-base", {"student": "lora", "frozen_dtype": "bfloat16"})
    assert lora["student_weights"] == 0 and lora["student_grads_adam"] < full["student_grads_adam"] / 5
    # r (in + out) per adapted Linear: q, k, v, out of 16 transformer blocks x 2 attentions
    assert lora_student_params("sd21-base", rank=1) > 0


@pytest.mark.parametrize("arch", ["sd21-base", "sdxl"])
def test_activation_count_on_meta_is_what_a_real_forward_saves(arch):
    """The meta-device count equals the bytes autograd saves in a real CPU forward (math attention),
    and gradient checkpointing shrinks it; SDXL's forward takes its pooled embedding and time ids."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from src.bench.fullsize import saved_bytes
    from src.layout import UNET, narrow

    cfg = {**narrow(UNET[arch], "unet"), "cross_attention_dim": 64}
    torch.manual_seed(0)
    real = UNet2DConditionModel(**cfg)
    with torch.device("meta"):
        meta = UNet2DConditionModel(**cfg)
    with sdpa_kernel(SDPBackend.MATH):
        counted = saved_bytes(real, 64, 2, fused_attention=False)
    assert saved_bytes(meta, 64, 2, fused_attention=False) == counted > 0
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):           # the CPU's fused kernel saves what a GPU's does
        fused = saved_bytes(real, 64, 2, fused_attention=False)
    assert saved_bytes(meta, 64, 2) == fused < counted
    meta.enable_gradient_checkpointing()
    assert saved_bytes(meta, 64, 2) < fused / 4


def test_a_linear_layers_weight_is_counted_as_a_weight_not_as_an_activation():
    """A linear layer saves its input and its weight transposed (a view of the weight): only the input is an
    activation; counting the view would add the weight's bytes once per use."""
    import torch

    from src.bench.fullsize import counting_saved

    layer = torch.nn.Linear(8, 16)
    x = torch.randn(3, 8, requires_grad=True)
    with counting_saved(layer) as count:
        layer(x)
    assert count[0] == x.numel() * 4


def test_sdxl_static_memory_counts_both_text_encoders():
    lora = static_gb("sdxl", {"student": "lora", "frozen_dtype": "bfloat16"})
    assert lora["text_encoder_vae"] == pytest.approx(2 * (123_060_480 + 694_659_840 + 83_653_863) / 2**30)
    assert lora["teacher_unet"] == pytest.approx(4 * 2_567_463_684 / 2**30)


def test_gpu_cards_and_the_decoders_cost():
    from src.bench.fullsize import card_for, decoder_saved_gb

    assert [card_for(g) for g in (20, 30, 60, 80)] == ["24 GB", "48 GB", "80 GB", "over 80 GB"]
    vae, tiny = decoder_saved_gb("sdxl", 256, 1), decoder_saved_gb("sdxl", 256, 1, tiny=True)
    assert 0 < tiny < vae / 4
    assert decoder_saved_gb("sdxl", 256, 2) == pytest.approx(2 * vae)
