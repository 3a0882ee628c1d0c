"""Generation with a SwiftBrush student: the single function evaluate, export and validation all use,
so the three can never disagree on what "the student's image" is.

    z ~ N(0, I) (one generator per sample)  ->  UNet(z, t_s, text)  ->  x0  ->  VAE decode

t_s is T-1 (999 for SD) in the paper. `distill.student_timestep` can set it lower: x0 is then read
with abar at t_s. For an epsilon-prediction teacher, x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)
carries an error of the student's eps into x0 multiplied by sqrt((1 - abar) / abar): 14.6 at
t = 999 on SD's schedule (abar = 0.0047), 2.3 at 599. A saved student carries its t_s in its
one-step scheduler (`one_step_scheduler`, read back by `timestep_of`).

A few-step student (`distill.student_steps` N) repeats the step at N timesteps from t_s down
(`student_timesteps`), noising each x0 again to the next one (`student_sample`); its per-sample noise
is N times the latent's channels, drawn by the same seed convention, so its first step starts from the
very latent a one-step student would.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..core.errors import UserError
from ..core.images import uint8_from_unit
from . import noise
from .conditioning import Conditioning, as_conditioning
from .vsd import add_noise, x0_from_output


def student_timestep(alphas_cumprod: torch.Tensor, timestep: int | None = None) -> int:
    """The timestep the student's pure-noise input is labelled with: `timestep`, or T - 1 (999 for
    SD, the paper) when None."""
    last = len(alphas_cumprod) - 1
    if timestep is None:
        return last
    if not 0 < timestep <= last:
        raise UserError(f"distill.student_timestep = {timestep}: expected 1..{last} (the teacher's scheduler "
                        f"has {last + 1} training timesteps) or null for T-1")
    return int(timestep)


def one_step_scheduler(scheduler, timestep: int):
    """A DDIM scheduler (from the teacher's `scheduler`) whose one step feeds the UNet `timestep` and
    returns its x0 (alpha_prev = 1), so that diffusers' `pipe(..., num_inference_steps=1,
    guidance_scale=1.0)` draws what `generate` draws. x0 is neither clipped nor thresholded."""
    from diffusers import DDIMScheduler

    last = scheduler.config.num_train_timesteps - 1
    schedule = {}
    if timestep != last:
        # "trailing" puts one step at the schedule's last timestep, so the schedule ends at `timestep`:
        # its first betas, the same alphas_cumprod up to there. (Diffusers' pipelines reset any
        # steps_offset other than 1, so that cannot place the step.)
        schedule = {"num_train_timesteps": timestep + 1, "trained_betas": scheduler.betas[:timestep + 1].tolist()}
    return DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=True, timestep_spacing="trailing",
                                     clip_sample=False, thresholding=False, **schedule)


def timestep_of(pipe) -> int:
    """The timestep of a student pipeline saved by distill (its one-step scheduler ends there); T-1
    for an unmodified teacher pipeline."""
    return int(pipe.scheduler.config.num_train_timesteps) - 1


def student_timesteps(timestep: int, steps: int = 1) -> list[int]:
    """The timesteps of an N-step student: its t_s, then evenly spaced below it (t_s = 999, N = 4: DMD2's
    [999, 749, 499, 249]); [t_s] for one step."""
    if steps < 1:
        raise ValueError(f"steps = {steps}: expected 1 or more")
    return [round(timestep - k * (timestep + 1) / steps) for k in range(steps)]


def steps_of(pipe) -> int:
    """How many steps a student pipeline saved by distill takes (its swiftbrush.json); 1 for any other."""
    folder = Path(str(pipe.config.get("_name_or_path", "") or ""))
    made = folder / "swiftbrush.json"
    return int(json.loads(made.read_text()).get("num_inference_steps", 1)) if made.is_file() else 1


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, h, w) Gaussian noise, sample i from its own seed (the numpy convention of src/method/noise.py,
    shared with ONNX inference)."""
    return torch.from_numpy(noise.initial_noise(seeds, shape))


def student_x0(unet, z: torch.Tensor, text: Conditioning | torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str = "epsilon", timestep: int | None = None) -> torch.Tensor:
    """The student's clean latent (scaled latent space): its output for z at t_s (`student_timestep`)
    turned into x0 with abar_{t_s}."""
    t_s = student_timestep(alphas_cumprod, timestep)
    t = torch.full((z.shape[0],), t_s, dtype=torch.long, device=z.device)
    out = unet(z, t, **as_conditioning(text).unet_kwargs()).sample
    return x0_from_output(z, out, alphas_cumprod[t_s].to(z.device), prediction_type)


def student_sample(unet, noise: torch.Tensor, text: Conditioning | torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction_type: str = "epsilon", timesteps: list[int] | None = None,
                   stop_at: int | None = None) -> torch.Tensor:
    """An N-step student's clean latent. `noise` is (B, N*C, h, w): its first C channels are the initial
    latent, the k-th C the noise added before step k. Step k maps x at t_k to x0 (student_x0); the next
    input is that x0 noised again to t_{k+1} (DMD2's and LCM's multi-step sampling); the last x0 is
    returned. One step (N = 1) is student_x0 itself. `stop_at` = k returns step k's x0 instead, with
    gradient through that step alone: DMD2's backward simulation, where the student's own earlier steps
    make the input of the step being trained."""
    timesteps = timesteps or [student_timestep(alphas_cumprod)]
    if len(timesteps) == 1:
        return student_x0(unet, noise, text, alphas_cumprod, prediction_type, timesteps[0])
    last = len(timesteps) - 1 if stop_at is None else stop_at
    chunks = noise.chunk(len(timesteps), dim=1)
    x0 = noise
    for k in range(last + 1):
        x = chunks[0] if k == 0 else add_noise(x0, chunks[k], alphas_cumprod[timesteps[k]])
        with torch.set_grad_enabled(torch.is_grad_enabled() and k == last):
            x0 = student_x0(unet, x, text, alphas_cumprod, prediction_type, timesteps[k])
    return x0


def decode(vae, x0: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], (B, 3, H, W)."""
    return (vae.decode(x0 / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def one_step_images(pipe, unet, prompts: list[str], seeds: list[int], alphas_cumprod: torch.Tensor,
                    batch_size: int = 32, device: torch.device | str = "cpu", timestep: int | None = None,
                    steps: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) student images for `prompts`; image i depends only on prompts[i], seeds[i].
    `timestep`: the student's t_s; None reads it from `pipe` (`timestep_of`: a saved student's own
    t_s, T-1 for a teacher pipeline). `steps`: its step count; None reads it from `pipe` (`steps_of`)."""
    from .conditioning import encode

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    timesteps = student_timesteps(timestep_of(pipe) if timestep is None else timestep,
                                  steps_of(pipe) if steps is None else steps)
    c, side = unet.config.in_channels, unet.config.sample_size
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    dtype = next(unet.parameters()).dtype
    out = []
    for i in range(0, len(prompts), batch_size):
        text = encode(pipe, prompts[i:i + batch_size], device, side).to(dtype=dtype)
        z = initial_latents(seeds[i:i + batch_size], (c * len(timesteps), side, side)).to(device, dtype)
        x0 = student_sample(unet, z, text, alphas_cumprod.to(device), prediction, timesteps)
        out.append(uint8_from_unit(decode(pipe.vae, x0.to(pipe.vae.dtype)).float().cpu().numpy()))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
