"""Build the embedded teacher and evaluator from rendered scenes only ("pretraining").

    python -m src.world.build                 # full build into models/ (about an hour on 2 cores)
    python -m src.world.build --scale micro   # seconds; what CI runs, into a folder you name

Writes, each atomically:
  models/teacher/    a Stable Diffusion pipeline (CLIP tokenizer + CLIPTextModel + UNet2DConditionModel
                     + AutoencoderKL + DDIM scheduler), fp16 safetensors, loadable with the stock
                     `StableDiffusionPipeline.from_pretrained`;
  models/evaluator/  a separate tiny CLIPModel + CLIPProcessor (CLIP score and FID features);
  models/guide/      a third CLIP (own seed), for distill's optional SwiftBrush-v2 CLIP loss: training
                     never sees the evaluator;
  models/tiny_decoder/  a TAESD-format AutoencoderTiny distilled from the VAE (src/world/tiny_decoder.py),
                     for distill.clip_decoder / export.decoder: tiny;
  models/build.json  the build record: command, seeds, steps, wall times, measured numbers.

    python -m src.world.build --only-sdxl-teacher     # models/teacher_sdxl next to an existing build

  models/teacher_sdxl/  an SDXL-layout teacher (StableDiffusionXLPipeline): the SD teacher's text encoder and
                     VAE, a second CLIP's text tower with its projection as text_encoder_2 (pooled embedding),
                     a UNet with SDXL's "text_time" added conditioning. `--set layout=sdxl` makes the whole
                     build's teacher this layout instead (what the micro-scale tests do).

Order and why: (1) a CLIP trained contrastively on scenes gives the teacher a pretrained,
frozen text tower (as SD's text encoder is a pretrained CLIP); (2) a second CLIP with another
seed and shape is the evaluator, kept apart so evaluation stays independent of the teacher;
(3) the VAE is trained and checked (PSNR, judge accuracy on reconstructions) before (4) the
UNet learns epsilon on its latents, with 10% empty captions so classifier-free guidance works.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..core.config import parse_override
from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_dir, write_json
from ..core.text import padded_token_ids
from ..method.conditioning import Conditioning, encode, encode_empty, family_of
from .judge import read_scene, score
from .render import render
from .scene import Scene, caption, sample_scene
from .tiny_decoder import TinySpec, check_tiny, save_tiny, train_tiny
from .training import encode_latents, object_weights, signed_from_uint8, uint8_from_signed, update_step, warmup_cosine

# Stable Diffusion's training noise schedule (scaled-linear betas, 1000 steps).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass(frozen=True)
class ClipSpec:
    """A tiny CLIP: both towers' width/depth and its contrastive training."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    patch: int = 4
    steps: int = 1500
    batch: int = 128
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of the build; `FULL` is what made the committed models, `MICRO` is for CI."""

    resolution: int = 32
    n_scenes: int = 40_000          # pre-rendered training scenes (captions are drawn fresh each step)
    n_heldout: int = 512            # scenes for the VAE's held-out PSNR / judge check
    p_size_named: float = 0.5
    seed: int = 0
    text: ClipSpec = ClipSpec()                                    # teacher's text tower comes from this
    evaluator: ClipSpec = ClipSpec(seed=1)                         # independent evaluator CLIP (own seed)
    guide: ClipSpec = ClipSpec(seed=2)                             # CLIP for distill's optional CLIP loss
    layout: str = "sd"              # teacher layout: sd (one text encoder) | sdxl (two, pooled + time ids)
    text_2: ClipSpec = ClipSpec(seed=3)                            # sdxl: the second text encoder's CLIP
    time_embed_dim: int = 8         # sdxl: the UNet's addition_time_embed_dim (SDXL base: 256)
    vae_channels: tuple[int, ...] = (16, 32, 64)                   # 3 levels: downsampling factor 4
    vae_steps: int = 4000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6
    vae_norm_groups: int = 1        # per-channel GroupNorm (groups = channels) erases flat colours; 1 keeps them
    vae_object_weight: float = 10.0  # loss weight of object pixels vs background
    unet_channels: tuple[int, ...] = (64, 64, 128)
    unet_steps: int = 7000
    unet_batch: int = 64
    unet_lr: float = 5e-4
    p_uncond: float = 0.1           # caption dropout, so classifier-free guidance works
    val_every: int = 1000           # UNet steps between quick validations (judge accuracy, 10 DDIM steps)
    val_prompts: int = 64
    tiny: TinySpec = TinySpec()     # the tiny decoder distilled from the VAE
    threads: int = 2


FULL = BuildConfig()
MICRO = BuildConfig(
    n_scenes=256, n_heldout=32,
    text=ClipSpec(hidden=32, layers=1, heads=2, steps=3, batch=16),
    evaluator=ClipSpec(hidden=32, layers=1, heads=2, steps=3, batch=16, seed=1),
    guide=ClipSpec(hidden=32, layers=1, heads=2, steps=3, batch=16, seed=2),
    text_2=ClipSpec(hidden=32, layers=1, heads=2, steps=3, batch=16, seed=3),
    vae_channels=(8, 16, 16), vae_steps=3, vae_batch=8,
    unet_channels=(32, 32, 32), unet_steps=3, unet_batch=8, val_every=3, val_prompts=4,
    tiny=TinySpec(channels=8, steps=3, batch=8),
)
SCALES = {"full": FULL, "micro": MICRO}
LAYOUTS = ("sd", "sdxl")


# --------------------------------------------------------------------------- data


@dataclass
class SceneSet:
    """Rendered scenes: uint8 images (N, H, W, 3), the scenes and their render seeds."""

    images: np.ndarray
    scenes: list[Scene]
    seeds: list[int]


def render_scenes(n: int, resolution: int, seed: int, p_size_named: float) -> SceneSet:
    rng = random.Random(seed)
    scenes = [sample_scene(rng, p_size_named) for _ in range(n)]
    seeds = [seed * 10_000_019 + i for i in range(n)]
    images = np.stack([render(s, resolution, seed=k) for s, k in zip(scenes, seeds)])
    return SceneSet(images, scenes, seeds)


# --------------------------------------------------------------------------- CLIP


def make_clip(spec: ClipSpec, tokenizer, resolution: int):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=4 * spec.hidden,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=spec.hidden, intermediate_size=4 * spec.hidden, num_hidden_layers=spec.layers,
                  num_attention_heads=spec.heads, image_size=resolution, patch_size=spec.patch)
    torch.manual_seed(spec.seed)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec.hidden))


def train_clip(spec: ClipSpec, data: SceneSet, tokenizer, resolution: int, desc: str):
    """Contrastive training on (render, fresh caption) pairs; returns the model in eval mode."""
    model = make_clip(spec, tokenizer, resolution)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, spec.steps)
    rng = random.Random(spec.seed)
    pixels = signed_from_uint8(data.images)
    model.train()
    for _ in (bar := tqdm(range(spec.steps), desc=desc, mininterval=2)):
        idx = rng.sample(range(len(data.scenes)), spec.batch)
        ids = padded_token_ids(tokenizer, [caption(data.scenes[i], rng) for i in idx])
        loss = model(input_ids=ids, pixel_values=pixels[idx], return_loss=True).loss
        update_step(loss, opt, sched, model.parameters())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images: np.ndarray, prompts: list[str],
                       attributes: list[dict]) -> dict[str, float]:
    """Image-to-text top-1 over the given prompts: exact caption, and any caption with the same attributes."""
    img = F.normalize(model.get_image_features(pixel_values=signed_from_uint8(images)).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=padded_token_ids(tokenizer, prompts)).pooler_output, dim=-1)
    top = (img @ txt.T).argmax(dim=1).tolist()
    exact = np.mean([t == i for i, t in enumerate(top)])
    same = np.mean([attributes[t] == attributes[i] for i, t in enumerate(top)])
    return {"exact": float(exact), "attributes": float(same)}


# --------------------------------------------------------------------------- VAE


def make_vae(channels: tuple[int, ...], resolution: int, seed: int, norm_groups: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels), layers_per_block=1, latent_channels=4,
        norm_num_groups=norm_groups, sample_size=resolution)


def train_vae(cfg: BuildConfig, data: SceneSet):
    """Object-weighted L1 + L2 reconstruction with a tiny KL term (flat colours need no perceptual loss)."""
    vae = make_vae(cfg.vae_channels, cfg.resolution, cfg.seed, cfg.vae_norm_groups)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = warmup_cosine(opt, cfg.vae_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    pixels = signed_from_uint8(data.images)
    vae.train()
    for _ in (bar := tqdm(range(cfg.vae_steps), desc="vae", mininterval=2)):
        x = pixels[torch.randint(0, len(pixels), (cfg.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        w = object_weights(x, cfg.vae_object_weight)
        loss = ((rec - x).abs() * w).mean() + ((rec - x).pow(2) * w).mean() + cfg.vae_kl * post.kl().mean()
        update_step(loss, opt, sched, vae.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return vae.eval()


@torch.no_grad()
def check_vae(vae, data: SceneSet) -> dict[str, float]:
    """PSNR (dB, on [0, 1] images) and judge accuracy of reconstructions."""
    z = encode_latents(vae, data.images)
    rec = torch.cat([vae.decode(z[i:i + 256]).sample for i in range(0, len(z), 256)])
    x = signed_from_uint8(data.images)
    mse = ((rec.clamp(-1, 1) - x) / 2).pow(2).mean().item()
    imgs = uint8_from_signed(rec)
    acc = np.mean([score(read_scene(im), s.attributes())["all"] for im, s in zip(imgs, data.scenes)])
    return {"vae_psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "vae_judge_accuracy": float(acc)}


# --------------------------------------------------------------------------- UNet


def make_unet(channels: tuple[int, ...], latent_size: int, cross_dim: int, seed: int,
              pooled_dim: int | None = None, time_embed_dim: int = 8):
    """The world's UNet; with `pooled_dim`, SDXL's "text_time" added conditioning (the pooled text embedding
    and six time ids, each embedded sinusoidally in `time_embed_dim`) on top of the cross-attention."""
    from diffusers import UNet2DConditionModel

    text_time = {} if pooled_dim is None else dict(
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_embed_dim)
    torch.manual_seed(seed)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=min(32, channels[0]), **text_time)


def caption_conditioning(pipe, texts: list[str]) -> Conditioning:
    """What the UNet learns from: the pipeline's own encoding of `texts` (src/method/conditioning.py, the path
    distill and export use). For SDXL a dropped (empty) caption is the unconditional branch as the pipeline
    builds it: zeros for the context and the pooled embedding (`force_zeros_for_empty_prompt`)."""
    cond = encode(pipe, texts)
    dropped = torch.tensor([t == "" for t in texts])
    if family_of(pipe) == "sdxl" and dropped.any():
        cond = cond.where(dropped, encode_empty(pipe).expand(len(texts)))
    return cond


def train_unet(cfg: BuildConfig, latents: torch.Tensor, data: SceneSet, pipe, val: SceneSet, curve: list):
    """Epsilon-prediction on SD's schedule for `pipe.unet`, conditioned by the pipeline's frozen text
    encoder(s), with `p_uncond` empty captions.

    Every `val_every` steps, appends (step, judge accuracy of 10-step CFG-4.5 samples on `val`) to `curve`.
    """
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**SD_SCHEDULE, prediction_type="epsilon")
    unet = pipe.unet
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    sched = warmup_cosine(opt, cfg.unet_steps)
    rng = random.Random(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    for i in (bar := tqdm(range(cfg.unet_steps), desc="unet", mininterval=2)):
        idx = [rng.randrange(len(latents)) for _ in range(cfg.unet_batch)]
        texts = ["" if rng.random() < cfg.p_uncond else caption(data.scenes[i], rng) for i in idx]
        cond = caption_conditioning(pipe, texts)                                  # context (B, 77, D), ...
        x0 = latents[idx]                                                         # (B, 4, h, w), scaled
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=gen)
        pred = unet(noise_sched.add_noise(x0, noise, t), t, **cond.unet_kwargs()).sample
        loss = F.mse_loss(pred, noise)
        update_step(loss, opt, sched, unet.parameters())
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        step = i + 1
        if cfg.val_every and (step % cfg.val_every == 0 or step == cfg.unet_steps):
            unet.eval()
            acc = validate(pipe, val, cfg.seed)
            curve.append({"step": step, "loss": round(loss.item(), 5), "attribute_accuracy_10": acc})
            tqdm.write(f"unet step {step}: judge accuracy (10 steps, CFG 4.5) {acc:.3f}")
            unet.train()
    return unet.eval()


def text_encoder_with_projection(clip):
    """A CLIPModel's text tower and text projection as a CLIPTextModelWithProjection (SDXL's text_encoder_2)."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(clip.config.text_config)
    config.projection_dim = clip.config.projection_dim
    encoder = CLIPTextModelWithProjection(config)
    encoder.load_state_dict({k: v for k, v in clip.state_dict().items()
                             if k.startswith(("text_model.", "text_projection."))}, strict=True)
    return encoder.eval().requires_grad_(False)


def train_teacher(cfg: BuildConfig, data: SceneSet, held: SceneSet, tokenizer, text_encoder, vae,
                  latents: torch.Tensor, record: dict):
    """The teacher pipeline of `cfg.layout` around the frozen text encoder and VAE: for sdxl a second text
    CLIP is trained first (its text tower with projection becomes text_encoder_2), then the UNet."""
    if cfg.layout not in LAYOUTS:
        raise UserError(f"--set layout={cfg.layout!r}: expected one of {', '.join(LAYOUTS)}")
    text_encoder_2, pooled_dim, cross_dim = None, None, text_encoder.config.hidden_size
    if cfg.layout == "sdxl":
        clock = time.perf_counter()
        clip_2 = train_clip(cfg.text_2, data, tokenizer, cfg.resolution, "second text tower (clip)")
        rng = random.Random(cfg.seed + 7)
        record["metrics"]["text_clip_2_retrieval_accuracy"] = retrieval_accuracy(
            clip_2, tokenizer, held.images, [caption(s, rng) for s in held.scenes],
            [s.attributes() for s in held.scenes])["attributes"]
        text_encoder_2 = text_encoder_with_projection(clip_2)
        pooled_dim = text_encoder_2.config.projection_dim
        cross_dim += text_encoder_2.config.hidden_size
        record["wall_s"]["text_clip_2"] = round(time.perf_counter() - clock, 1)
    unet = make_unet(cfg.unet_channels, latents.shape[-1], cross_dim, cfg.seed, pooled_dim, cfg.time_embed_dim)
    pipe = make_pipeline(tokenizer, text_encoder, vae, unet, text_encoder_2)
    record["unet_curve"] = []
    val = SceneSet(held.images[:cfg.val_prompts], held.scenes[:cfg.val_prompts], held.seeds[:cfg.val_prompts])
    clock = time.perf_counter()
    train_unet(cfg, latents, data, pipe, val, record["unet_curve"])
    record["wall_s"]["unet"] = round(time.perf_counter() - clock, 1)
    return pipe


@torch.no_grad()
def validate(pipe, val: SceneSet, seed: int, steps: int = 10, cfg: float = 4.5) -> float:
    """Judge accuracy of teacher samples for `val`'s scenes (one fixed caption each)."""
    rng = random.Random(seed + 99)
    prompts = [caption(s, rng) for s in val.scenes]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    pipe.set_progress_bar_config(disable=True)
    imgs = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="np").images
    imgs = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
    return float(np.mean([score(read_scene(im), s.attributes())["all"] for im, s in zip(imgs, val.scenes)]))


# --------------------------------------------------------------------------- assembly


def make_pipeline(tokenizer, text_encoder, vae, unet, text_encoder_2=None):
    """The components as a StableDiffusionPipeline with SD's DDIM scheduler (trailing spacing); with a second
    text encoder, a StableDiffusionXLPipeline (both encoders read the world tokenizer; empty prompts give
    zeros, as SDXL base's `force_zeros_for_empty_prompt`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULE, prediction_type="epsilon", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_teacher(out: Path, pipe, tokenizer_dir: Path) -> None:
    """Save a teacher pipeline in fp16 safetensors (DDIM, trailing spacing); it stays float32 in memory.

    The tokenizer's vocab.json / merges.txt are copied along, so that the folder also loads
    with tokenizer-file readers that predate tokenizer.json.
    """
    extra = {name: (tokenizer_dir / name).read_bytes() for name in ("vocab.json", "merges.txt")}
    pipe.to(torch.float16)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        declare_float32(tmp)
        for folder in ("tokenizer", "tokenizer_2"):
            if (tmp / folder).is_dir():
                for name, data in extra.items():
                    (tmp / folder / name).write_bytes(data)
    pipe.to(torch.float32)


def declare_float32(folder: Path) -> None:
    """Mark the transformers components of a saved pipeline as float32 (the weights stay fp16 on disk).

    transformers 5 loads a model in the dtype its config.json names, diffusers loads its models in
    float32: left as "float16", `StableDiffusionPipeline.from_pretrained(folder)` without a dtype
    pairs a half text encoder with a float UNet and the first call fails ("mat1 and mat2 must have
    the same dtype"). Declared float32, every part loads as float32, as an SD checkpoint's main
    branch does.
    """
    for config in folder.glob("*/config.json"):
        spec = json.loads(config.read_text(encoding="utf-8"))
        if "transformers_version" in spec and spec.get("dtype") not in (None, "float32"):
            spec["dtype"] = "float32"
            config.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_evaluator(out: Path, model, tokenizer, resolution: int) -> None:
    """CLIPModel + CLIPProcessor (tokenizer + image processor for `resolution`-px scenes)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": resolution},
                                         crop_size={"height": resolution, "width": resolution},
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with atomic_dir(out) as tmp:
        model.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)
    model.float()


def train_guide(cfg: BuildConfig, data: SceneSet, held: SceneSet, tokenizer, record: dict):
    """The guide CLIP (distill's CLIP loss), trained like the evaluator with its own seed; retrieval recorded."""
    guide = train_clip(cfg.guide, data, tokenizer, cfg.resolution, "guide (clip)")
    rng = random.Random(cfg.seed + 7)
    prompts = [caption(s, rng) for s in held.scenes]
    record["metrics"]["guide_clip_retrieval_accuracy"] = retrieval_accuracy(
        guide, tokenizer, held.images, prompts, [s.attributes() for s in held.scenes])["attributes"]
    return guide


def build_part(cfg: BuildConfig, out_dir: Path, spec: str, wall_key: str, command_key: str, make) -> dict:
    """One model next to existing ones: `make(data, held, record)` trains and saves it on the build's scenes;
    its settings (cfg.<spec>), wall time and command are added to out_dir/build.json."""
    torch.set_num_threads(cfg.threads)
    path = out_dir / "build.json"
    record = json.loads(path.read_text()) if path.is_file() else {"config": asdict(cfg), "wall_s": {}, "metrics": {}}
    record["config"][spec] = asdict(getattr(cfg, spec))
    clock = time.perf_counter()
    data = render_scenes(cfg.n_scenes, cfg.resolution, cfg.seed, cfg.p_size_named)
    held = render_scenes(cfg.n_heldout, cfg.resolution, cfg.seed + 1000, cfg.p_size_named)
    make(data, held, record)
    record["wall_s"][wall_key] = round(time.perf_counter() - clock, 1)
    record[command_key] = " ".join(["python -m src.world.build", *sys.argv[1:]])
    write_json(path, record)
    return record


def build_guide(cfg: BuildConfig, out_dir: Path, tokenizer_dir: Path) -> dict:
    """Only the guide CLIP (same scenes as the full build), added to an existing out_dir/build.json."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    def make(data: SceneSet, held: SceneSet, record: dict) -> None:
        save_evaluator(out_dir / "guide", train_guide(cfg, data, held, tokenizer, record), tokenizer, cfg.resolution)

    return build_part(cfg, out_dir, "guide", "guide_clip", "guide_command", make)


def saved_vae(out_dir: Path):
    """out_dir/teacher/vae, frozen, in float32."""
    from diffusers import AutoencoderKL

    vae_dir = out_dir / "teacher" / "vae"
    if not (vae_dir / "config.json").is_file():
        raise UserError(f"--only-tiny-decoder: no VAE at {vae_dir} (build the world first, or give --out)")
    return AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval().requires_grad_(False)


def build_tiny_decoder(cfg: BuildConfig, out_dir: Path) -> dict:
    """Only the tiny decoder, distilled from out_dir/teacher/vae on the build's scenes; added to build.json."""
    vae = saved_vae(out_dir)

    def make(data: SceneSet, held: SceneSet, record: dict) -> None:
        tiny = train_tiny(cfg.tiny, vae, data)
        record["metrics"].update(check_tiny(tiny, vae, held))
        save_tiny(out_dir / "tiny_decoder", tiny)

    return build_part(cfg, out_dir, "tiny", "tiny_decoder", "tiny_decoder_command", make)


def build_sdxl_teacher(cfg: BuildConfig, out_dir: Path, tokenizer_dir: Path) -> dict:
    """Only an SDXL-layout teacher, out_dir/teacher_sdxl, next to an existing build: the SD teacher's frozen
    text encoder and VAE (so both teachers see the same text tower and latents), a second text CLIP as
    text_encoder_2 and a text-time UNet trained like the SD one. Recorded under "teacher_sdxl" in build.json."""
    from transformers import CLIPTextModel, CLIPTokenizer

    encoder_dir = out_dir / "teacher" / "text_encoder"
    if not (encoder_dir / "config.json").is_file():
        raise UserError(f"--only-sdxl-teacher: no text encoder at {encoder_dir} (build the world first, or give --out)")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel.from_pretrained(encoder_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
    vae = saved_vae(out_dir)
    sdxl = replace(cfg, layout="sdxl")

    def make(data: SceneSet, held: SceneSet, record: dict) -> None:
        latents = encode_latents(vae, data.images) * vae.config.scaling_factor
        part = record["teacher_sdxl"] = {"wall_s": {}, "metrics": {}, "config": {
            k: getattr(sdxl, k) for k in ("time_embed_dim", "unet_channels", "unet_steps", "unet_batch", "unet_lr",
                                          "p_uncond")}}
        pipe = train_teacher(sdxl, data, held, tokenizer, text_encoder, vae, latents, part)
        save_teacher(out_dir / "teacher_sdxl", pipe, tokenizer_dir)

    return build_part(sdxl, out_dir, "text_2", "teacher_sdxl", "teacher_sdxl_command", make)


def build(cfg: BuildConfig, out_dir: Path, tokenizer_dir: Path) -> dict:
    """Run the whole build; return the build record (also written to out_dir/build.json)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(cfg.threads)
    if not (tokenizer_dir / "vocab.json").is_file():
        raise UserError(f"--tokenizer {tokenizer_dir}: no vocab.json (build it with python -m src.world.tokenizer)")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    record: dict = {"command": " ".join(["python -m src.world.build", *sys.argv[1:]]),
                    "config": asdict(cfg), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                    "wall_s": {}, "metrics": {}}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        record["wall_s"][name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    data = render_scenes(cfg.n_scenes, cfg.resolution, cfg.seed, cfg.p_size_named)
    held = render_scenes(cfg.n_heldout, cfg.resolution, cfg.seed + 1000, cfg.p_size_named)
    lap("render")

    text_clip = train_clip(cfg.text, data, tokenizer, cfg.resolution, "text tower (clip)")
    text_encoder = CLIPTextModel(text_clip.config.text_config)
    text_encoder.load_state_dict(text_clip.text_model.state_dict(), strict=False)
    text_encoder.eval().requires_grad_(False)
    lap("text_clip")

    evaluator = train_clip(cfg.evaluator, data, tokenizer, cfg.resolution, "evaluator (clip)")
    rng = random.Random(cfg.seed + 7)
    held_prompts = [caption(s, rng) for s in held.scenes]
    held_attrs = [s.attributes() for s in held.scenes]
    record["metrics"]["clip_retrieval_accuracy"] = retrieval_accuracy(
        evaluator, tokenizer, held.images, held_prompts, held_attrs)["attributes"]
    record["metrics"]["text_clip_retrieval_accuracy"] = retrieval_accuracy(
        text_clip, tokenizer, held.images, held_prompts, held_attrs)["attributes"]
    lap("evaluator_clip")

    guide = train_guide(cfg, data, held, tokenizer, record)
    lap("guide_clip")

    vae = train_vae(cfg, data)
    record["metrics"].update(check_vae(vae, held))
    latents = encode_latents(vae, data.images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    lap("vae")

    pipe = train_teacher(cfg, data, held, tokenizer, text_encoder, vae, latents, record)
    clock = time.perf_counter()

    save_teacher(out_dir / "teacher", pipe, tokenizer_dir)
    saved = saved_vae(out_dir)          # the VAE as users load it (its weights are saved in fp16)
    tiny = train_tiny(cfg.tiny, saved, data)
    record["metrics"].update(check_tiny(tiny, saved, held))
    save_tiny(out_dir / "tiny_decoder", tiny)
    lap("tiny_decoder")
    save_evaluator(out_dir / "evaluator", evaluator, tokenizer, cfg.resolution)
    save_evaluator(out_dir / "guide", guide, tokenizer, cfg.resolution)
    record["wall_s"]["total"] = round(sum(record["wall_s"].values()), 1)
    write_json(out_dir / "build.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full", help="full (committed models) or micro")
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder for teacher/, evaluator/, build.json")
    parser.add_argument("--tokenizer", type=Path, default=Path("models/teacher/tokenizer"),
                        help="the world tokenizer folder (python -m src.world.tokenizer)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one BuildConfig field, e.g. --set unet_steps=100")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved build config and exit")
    parser.add_argument("--only-guide", action="store_true",
                        help="build only models/guide (the CLIP of distill's optional CLIP loss) next to existing models")
    parser.add_argument("--only-tiny-decoder", action="store_true",
                        help="build only models/tiny_decoder (TAESD format) from the existing models/teacher/vae")
    parser.add_argument("--only-sdxl-teacher", action="store_true",
                        help="build only models/teacher_sdxl (an SDXL-layout teacher on the same text encoder and "
                             "VAE) next to existing models")
    args = parser.parse_args(argv)
    cfg = apply_build_overrides(SCALES[args.scale], args.overrides)
    if args.dry_run:
        print(json.dumps(asdict(cfg), indent=2))
        return
    if args.only_tiny_decoder:
        m = build_tiny_decoder(cfg, args.out)["metrics"]
        print(f"wrote {args.out}/tiny_decoder: {m['tiny_psnr_vs_vae']:.1f} dB against the VAE's decodes, judge "
              f"accuracy {m['tiny_judge_accuracy']:.3f} (VAE {m['vae_judge_accuracy']:.3f})")
        return
    if args.only_sdxl_teacher:
        record = build_sdxl_teacher(cfg, args.out, args.tokenizer)["teacher_sdxl"]
        print(f"wrote {args.out}/teacher_sdxl: judge accuracy (10 steps, CFG 4.5) "
              f"{record['unet_curve'][-1]['attribute_accuracy_10']:.3f} in {record['wall_s']['unet']:.0f} s")
        return
    if args.only_guide:
        record = build_guide(cfg, args.out, args.tokenizer)
        print(f"wrote {args.out}/guide (retrieval accuracy {record['metrics']['guide_clip_retrieval_accuracy']:.3f})")
        return
    record = build(cfg, args.out, args.tokenizer)
    print(json.dumps(record["metrics"], indent=2))
    print(f"wrote {args.out}/teacher, {args.out}/evaluator, {args.out}/build.json "
          f"in {record['wall_s']['total']:.0f} s")


def apply_build_overrides(cfg: BuildConfig, overrides: list[str]) -> BuildConfig:
    """`field=value` or `text.steps=value` overrides (the `--set` syntax of every command, parsed by
    src/core/config.py), type-checked against the defaults."""
    for text in overrides:
        parts, new = parse_override(text)
        key = ".".join(parts)
        target = cfg if len(parts) == 1 else getattr(cfg, parts[0], None)
        name = parts[-1]
        if target is None or len(parts) > 2 or name not in target.__dataclass_fields__:
            raise UserError(f"--set {text!r}: unknown build key {key!r}")
        old = getattr(target, name)
        if isinstance(old, tuple):
            new = tuple(new) if isinstance(new, list) else None
        elif isinstance(old, float) and isinstance(new, (int, str)):
            try:
                new = float(new)
            except ValueError:
                new = None
        if new is None or not isinstance(new, type(old)):
            raise UserError(f"--set {text!r}: expected {type(old).__name__} for {key!r}")
        target = replace(target, **{name: new})
        cfg = target if len(parts) == 1 else replace(cfg, **{parts[0]: target})
    return cfg


if __name__ == "__main__":
    run_cli(main)
