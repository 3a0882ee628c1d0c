"""A tiny autoencoder for the world VAE's latents, in the TAESD format (diffusers `AutoencoderTiny`).

    python -m src.world.build --only-tiny-decoder        # models/tiny_decoder (a few minutes on 2 cores)

TAESD is what Stable Diffusion users already have for their teachers (`madebyollin/taesd` for
SD 1.x/2.x): an `AutoencoderTiny` folder whose decoder turns the *scaled* latents the UNet works in
(scaling_factor 1.0) into images at a fraction of the full VAE decoder's cost (docs/design.md,
"Speed facts"). This module makes the same thing for the embedded world by distilling the world VAE:

- the decoder learns to reproduce the full VAE's decodes of the VAE's own latents of rendered
  scenes, and of those latents with added Gaussian noise (`latent_noise`), because a one-step
  student's latents are not exactly on the VAE's manifold and the tiny decoder must follow the full
  one there too;
- the encoder learns to map a scene to the VAE's (scaled) posterior mean, so the folder is a whole
  TAESD-format autoencoder, though only its decoder is used by distill (`distill.clip_decoder`),
  evaluate and export (`export.decoder`).

The loss is the VAE's own: object-weighted L1 + L2 (flat colours need no perceptual loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.fileio import atomic_dir
from ..core.images import psnr


@dataclass(frozen=True)
class TinySpec:
    """The tiny autoencoder's shape and its distillation from the VAE."""

    channels: int = 32                       # every level (TAESD: 64); AutoencoderTiny needs one width throughout
    decoder_blocks: tuple[int, ...] = (2, 2, 0)   # blocks per level, latent side first (TAESD: 3, 3, 3, 1)
    encoder_blocks: tuple[int, ...] = (1, 1, 1)
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    latent_noise: float = 0.5                # max std of the noise added to half the training latents
    object_weight: float = 10.0              # as the VAE's loss
    seed: int = 3


def make_tiny(spec: TinySpec, latent_channels: int):
    """An untrained AutoencoderTiny with len(decoder_blocks) - 1 upsamplings (the VAE's factor)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(spec.seed)
    levels = len(spec.decoder_blocks)
    return AutoencoderTiny(encoder_block_out_channels=(spec.channels,) * levels,
                           decoder_block_out_channels=(spec.channels,) * levels,
                           num_encoder_blocks=tuple(spec.encoder_blocks), num_decoder_blocks=tuple(spec.decoder_blocks),
                           latent_channels=latent_channels, scaling_factor=1.0)


def noisy(latents: torch.Tensor, max_std: float, gen: torch.Generator) -> torch.Tensor:
    """Half the rows (at random) get Gaussian noise of a random std in [0, max_std]."""
    b = latents.shape[0]
    std = torch.rand(b, generator=gen) * max_std * (torch.rand(b, generator=gen) < 0.5)
    return latents + std.view(b, 1, 1, 1) * torch.randn(latents.shape, generator=gen)


def train_tiny(spec: TinySpec, vae, data, desc: str = "tiny decoder"):
    """Distil `vae` (AutoencoderKL, frozen) into an AutoencoderTiny on the rendered scenes `data` (a SceneSet)."""
    from tqdm import tqdm

    from .training import encode_latents, object_weights, signed_from_uint8, update_step, warmup_cosine

    sf = vae.config.scaling_factor
    images = signed_from_uint8(data.images)
    latents = encode_latents(vae, data.images) * sf                          # the UNet's (scaled) latents
    tiny = make_tiny(spec, latents.shape[1]).train()
    opt = torch.optim.AdamW(tiny.parameters(), lr=spec.lr, weight_decay=0.0)
    sched = warmup_cosine(opt, spec.steps)
    gen = torch.Generator().manual_seed(spec.seed)
    for _ in (bar := tqdm(range(spec.steps), desc=desc, mininterval=2)):
        idx = torch.randint(0, len(latents), (spec.batch,), generator=gen)
        z = noisy(latents[idx], spec.latent_noise, gen)
        with torch.no_grad():
            target = vae.decode(z / sf).sample.clamp(-1, 1)
        out = tiny.decode(z).sample
        w = object_weights(target, spec.object_weight)
        loss_dec = ((out - target).abs() * w).mean() + ((out - target).pow(2) * w).mean()
        loss_enc = (tiny.encode(images[idx]).latents - latents[idx]).pow(2).mean()
        update_step(loss_dec + loss_enc, opt, sched, tiny.parameters())
        bar.set_postfix(dec=f"{loss_dec.item():.4f}", enc=f"{loss_enc.item():.4f}", refresh=False)
    return tiny.eval()


@torch.no_grad()
def check_tiny(tiny, vae, data, noise: float = 0.5) -> dict[str, float]:
    """Held-out scenes (a SceneSet): agreement with the full decoder on clean and noisy latents, judge accuracy."""
    from .judge import read_scene, score
    from .training import encode_latents, signed_from_uint8, uint8_from_signed

    sf = vae.config.scaling_factor
    images, scenes = signed_from_uint8(data.images), data.scenes
    z = encode_latents(vae, data.images) * sf
    z_noisy = noisy(z, noise, torch.Generator().manual_seed(0))          # half of them, std up to `noise`
    full, small = vae.decode(z / sf).sample, tiny.decode(z).sample

    def psnr_signed(a: torch.Tensor, b: torch.Tensor) -> float:    # images in [-1, 1], measured on [0, 1]
        return psnr(((a.clamp(-1, 1) + 1) / 2).numpy(), ((b.clamp(-1, 1) + 1) / 2).numpy())

    def accuracy(x: torch.Tensor) -> float:
        return float(np.mean([score(read_scene(im), s.attributes())["all"] for im, s in zip(uint8_from_signed(x), scenes)]))

    return {"tiny_psnr_vs_vae": psnr_signed(small, full),
            "tiny_psnr_vs_vae_noisy_latents": psnr_signed(tiny.decode(z_noisy).sample, vae.decode(z_noisy / sf).sample),
            "tiny_psnr_vs_render": psnr_signed(small, images), "vae_psnr_vs_render": psnr_signed(full, images),
            "tiny_judge_accuracy": accuracy(small), "vae_judge_accuracy": accuracy(full),
            "tiny_encoder_latent_rmse": float((tiny.encode(images).latents - z).pow(2).mean().sqrt())}


def save_tiny(out: Path, tiny) -> None:
    """The diffusers AutoencoderTiny folder (config.json + safetensors), written atomically. Its config is the
    published TAESD folders' key set: `block_out_channels`, which AutoencoderTiny records for itself and
    then warns about when loading, is left out."""
    import json

    with atomic_dir(out) as tmp:
        tiny.save_pretrained(tmp, safe_serialization=True)
        spec = json.loads((tmp / "config.json").read_text())
        spec.pop("block_out_channels", None)
        (tmp / "config.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
