"""One-step generation with a SwiftBrush student: the single function evaluate, export and
validation all use, so the three can never disagree on what "the student's image" is.

    z ~ N(0, I) (one generator per sample)  ->  UNet(z, T-1, text)  ->  x0  ->  VAE decode
"""

from __future__ import annotations

import numpy as np
import torch

from . import noise
from .vsd import x0_from_output


def student_timestep(alphas_cumprod: torch.Tensor) -> int:
    """T - 1 (999 for SD): the student always sees pure noise at the last training timestep."""
    return len(alphas_cumprod) - 1


def initial_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, h, w) Gaussian noise, sample i from its own seed (the numpy convention of src/noise.py,
    shared with ONNX inference)."""
    return torch.from_numpy(noise.initial_noise(seeds, shape))


def student_x0(unet, z: torch.Tensor, text: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """The student's clean latent (scaled latent space): its output at t = T-1 turned into x0."""
    t_last = student_timestep(alphas_cumprod)
    t = torch.full((z.shape[0],), t_last, dtype=torch.long, device=z.device)
    out = unet(z, t, encoder_hidden_states=text).sample
    return x0_from_output(z, out, alphas_cumprod[t_last].to(z.device), prediction_type)


def decode(vae, x0: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], (B, 3, H, W)."""
    return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> uint8 (B, H, W, 3)."""
    return (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def generate(pipe, unet, prompts: list[str], seeds: list[int], alphas_cumprod: torch.Tensor,
             batch_size: int = 32, device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) one-step images for `prompts`; image i depends only on prompts[i], seeds[i]."""
    from .teacher import encode_prompts

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    dtype = next(unet.parameters()).dtype
    out = []
    for i in range(0, len(prompts), batch_size):
        text = encode_prompts(pipe, prompts[i:i + batch_size], device).to(dtype)
        z = initial_noise(seeds[i:i + batch_size], shape).to(device, dtype)
        x0 = student_x0(unet, z, text, alphas_cumprod.to(device), prediction)
        out.append(to_uint8(decode(pipe.vae, x0.to(pipe.vae.dtype))))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
