"""Real-layout teacher folders (src/layout.py): the published configs, file set and tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from src.layout import TEXT_ENCODER, UNET, VAE, write_layout

ARCHES = ("sd15", "sd21-base", "sd21")        # SDXL's folder: tests/test_conditioning.py


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    return {arch: (root / arch, write_layout(arch, root / arch, "tiny")) for arch in ARCHES}


def test_full_configs_give_the_published_parameter_counts():
    """The configs as numbers reproduce the parameter counts of the published checkpoints
    (SD 1.5 UNet 859,520,964; SD 2.x UNet 865,910,724; CLIP ViT-L/14 text 123,060,480; OpenCLIP
    ViT-H/14 text 340,387,840; the SD VAE 83,653,863). Built on the meta device: no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    published = {"sd15": (859_520_964, 123_060_480), "sd21-base": (865_910_724, 340_387_840),
                 "sd21": (865_910_724, 340_387_840)}
    with torch.device("meta"):
        for arch, (unet_n, text_n) in published.items():
            count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
            assert count(UNet2DConditionModel(**UNET[arch])) == unet_n, arch
            assert count(CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER[arch]))) == text_n, arch
            assert count(AutoencoderKL(**VAE[arch])) == 83_653_863, arch


@pytest.mark.parametrize("arch,scheduler,prediction,safety", [
    ("sd15", "PNDMScheduler", "epsilon", True),
    ("sd21-base", "PNDMScheduler", "epsilon", False),
    ("sd21", "DDIMScheduler", "v_prediction", False)])
def test_model_index_and_configs_as_published(tiny_folders, arch, scheduler, prediction, safety):
    folder, _ = tiny_folders[arch]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", scheduler]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert (folder / "feature_extractor" / "preprocessor_config.json").is_file()
    if safety:
        assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
        assert index["requires_safety_checker"] is True
        assert (folder / "safety_checker" / "model.safetensors").is_file()
    else:
        assert index["safety_checker"] == [None, None] and not (folder / "safety_checker").exists()
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched.get("prediction_type", "epsilon") == prediction
    assert (sched["beta_start"], sched["beta_end"], sched["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    # Tiny keeps every value but the widths.
    widths = {"block_out_channels", "norm_num_groups", "cross_attention_dim"}
    assert {k: v for k, v in unet.items() if k in UNET[arch] and k not in widths} == \
        {k: v for k, v in UNET[arch].items() if k not in widths}
    assert unet["block_out_channels"] == [w // 8 for w in UNET[arch]["block_out_channels"]]
    assert unet["cross_attention_dim"] == json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_size"]
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert text["num_hidden_layers"] == TEXT_ENCODER[arch]["num_hidden_layers"]
    assert text["hidden_act"] == TEXT_ENCODER[arch]["hidden_act"]
    for part in ("unet", "vae"):
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()


def test_the_tokenizer_is_clips_real_vocabulary(tiny_folders):
    """The ids of the published CLIP tokenizer (facts of its vocabulary, not of our code):
    <|startoftext|> 49406, 'a' 320, 'photo' 1125, 'of' 539, 'cat' 2368, <|endoftext|> 49407;
    SD 2.x pads with '!' (id 0), SD 1.5 with <|endoftext|>."""
    from transformers import CLIPTokenizer

    for arch, pad in (("sd15", 49407), ("sd21-base", 0)):
        tok = CLIPTokenizer.from_pretrained(tiny_folders[arch][0] / "tokenizer")
        assert len(tok) == 49408
        ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
        assert ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert ids[7] == pad and len(ids) == 77
        assert (tiny_folders[arch][0] / "tokenizer" / "merges.txt").is_file()


@pytest.mark.parametrize("arch", ARCHES)
def test_stock_diffusers_loads_and_draws(tiny_folders, arch):
    """What a user does with a real folder: from_pretrained without a dtype, then one call."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_folders[arch][0], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_the_loader_accepts_every_layout(tiny_folders):
    from src.method.teacher import load_pipeline

    for arch in ARCHES:
        pipe = load_pipeline(str(tiny_folders[arch][0]))
        assert pipe.safety_checker is None
        assert pipe.scheduler.config.get("prediction_type", "epsilon") == ("v_prediction" if arch == "sd21" else "epsilon")
