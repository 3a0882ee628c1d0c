"""One conditioning path for both teacher families, pinned against diffusers' stock pipelines, and the
SDXL teacher layout (`python -m src.layout --arch sdxl`)."""

from __future__ import annotations

import json

import pytest
import torch

from src.method.conditioning import Conditioning, encode, encode_empty, family_of, pixel_size

PROMPTS = ["a red circle at the top on a blue background", "a cat"]


@pytest.fixture(scope="module")
def sdxl_dir(sdxl_folder):
    return sdxl_folder("tiny")              # the published configs, narrowed


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)


def stock_encoding(pipe, prompts):
    """What StableDiffusionXLPipeline.__call__ hands its UNet, for the conditional and unconditional branch."""
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
    size = pixel_size(pipe)
    ids = pipe._get_add_time_ids((size, size), (0, 0), (size, size), dtype=emb.dtype,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return emb, neg, pooled, neg_pooled, ids


def test_the_sdxl_conditioning_is_the_stock_pipelines(sdxl):
    emb, neg, pooled, neg_pooled, ids = stock_encoding(sdxl, PROMPTS)
    ours, empty = encode(sdxl, PROMPTS), encode_empty(sdxl)
    assert family_of(sdxl) == "sdxl"
    assert ours.context.shape[-1] == sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    torch.testing.assert_close(ours.context, emb, rtol=0, atol=0)
    torch.testing.assert_close(ours.text_embeds, pooled, rtol=0, atol=0)
    torch.testing.assert_close(ours.time_ids, ids.repeat(len(PROMPTS), 1), rtol=0, atol=0)
    # force_zeros_for_empty_prompt (SDXL base): the unconditional branch is zeros, with the same time ids
    assert sdxl.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(empty.expand(len(PROMPTS)).context, neg, rtol=0, atol=0)
    torch.testing.assert_close(empty.expand(len(PROMPTS)).text_embeds, neg_pooled, rtol=0, atol=0)
    assert not torch.any(empty.context) and torch.equal(empty.time_ids, ids)


def test_without_forced_zeros_the_empty_prompt_is_encoded(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    _, neg, _, neg_pooled, _ = stock_encoding(pipe, [PROMPTS[0]])
    empty = encode_empty(pipe)
    assert torch.any(empty.context != 0)
    torch.testing.assert_close(empty.context, neg, rtol=0, atol=0)
    torch.testing.assert_close(empty.text_embeds, neg_pooled, rtol=0, atol=0)


def test_the_sd_conditioning_is_the_stock_pipelines(micro_models):
    from diffusers import StableDiffusionPipeline

    models, _ = micro_models
    pipe = StableDiffusionPipeline.from_pretrained(models / "teacher", local_files_only=True)
    emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert family_of(pipe) == "sd"
    ours, empty = encode(pipe, PROMPTS), encode_empty(pipe)
    assert ours.text_embeds is None and ours.unet_kwargs().keys() == {"encoder_hidden_states"}
    torch.testing.assert_close(ours.context, emb, rtol=0, atol=0)
    torch.testing.assert_close(empty.expand(len(PROMPTS)).context, neg, rtol=0, atol=0)


def test_our_unet_call_is_the_stock_pipelines(sdxl):
    """The UNet sees what the stock pipeline gives it: one denoising step of each, from the same latent,
    without guidance, lands on the same latent."""
    from diffusers import EulerDiscreteScheduler

    side = sdxl.unet.config.sample_size
    latents = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    sdxl.scheduler = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    stock = sdxl(PROMPTS[:1], num_inference_steps=1, guidance_scale=1.0, latents=latents.clone(),
                 output_type="latent").images
    sched = EulerDiscreteScheduler.from_config(sdxl.scheduler.config)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    x = sched.scale_model_input(latents * sched.init_noise_sigma, t)
    with torch.no_grad():
        out = sdxl.unet(x, t, **encode(sdxl, PROMPTS[:1]).unet_kwargs()).sample
    torch.testing.assert_close(sched.step(out, t, latents * sched.init_noise_sigma).prev_sample, stock)


def test_conditioning_batches_select_and_cast_every_part():
    a = Conditioning(torch.zeros(2, 3, 4), torch.zeros(2, 5), torch.zeros(2, 6))
    b = Conditioning(torch.ones(1, 3, 4), torch.ones(1, 5), torch.ones(1, 6))
    both = b.expand(2).cat(a)
    assert len(both) == 4 and both.text_embeds[:2].eq(1).all() and both.time_ids[2:].eq(0).all()
    mixed = a.where(torch.tensor([True, False]), b.expand(2))
    assert mixed.context[0].eq(1).all() and mixed.context[1].eq(0).all()
    assert mixed.text_embeds[0].eq(1).all() and mixed.time_ids[1].eq(0).all()
    half = a.to(dtype=torch.float16)
    assert {half.context.dtype, half.text_embeds.dtype, half.time_ids.dtype} == {torch.float16}
    assert Conditioning(torch.zeros(1, 2, 3)).expand(3).text_embeds is None


def test_the_sdxl_layout_is_the_published_one(sdxl_dir):
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    assert {k for k, v in index.items() if isinstance(v, list)} == {
        "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae"}
    unet = json.loads((sdxl_dir / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["transformer_layers_per_block"] == [1, 2, 10]
    vae = json.loads((sdxl_dir / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] == 0.13025 and vae["force_upcast"] is True
    pads = [json.loads((sdxl_dir / t / "tokenizer_config.json").read_text())["pad_token"]
            for t in ("tokenizer", "tokenizer_2")]
    assert pads == ["<|endoftext|>", "!"]


def test_the_sdxl_configs_give_the_published_parameter_counts():
    """The full-size configs, built on the meta device (no memory): SDXL base 1.0's published sizes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from src.layout import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**UNET["sdxl"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER["sdxl"])),
                 "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2["sdxl"])),
                 "vae": AutoencoderKL(**VAE["sdxl"])}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}
    assert counts == {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                      "vae": 83_653_863}


def test_the_tiny_sdxl_folder_draws_with_the_stock_pipeline(sdxl):
    image = sdxl(PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, height=256, width=256, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (256, 256, 3) and torch.isfinite(torch.from_numpy(image)).all()
