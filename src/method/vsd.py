"""SwiftBrush's variational score distillation: the mathematics, as small pure pieces.

Notation (docs/design.md, "The method"): `abar` is the teacher scheduler's `alphas_cumprod`, T = 1000.
The student is a copy of the teacher UNet fed pure noise z at t = T-1 (the paper; or at
`distill.student_timestep`, src/method/onestep.py); its output, read in the teacher's
parametrisation, gives a clean latent x0. The VSD gradient on x0 is

    grad = (1 - abar_t) * (eps_teacher(x_t, t, c) - eps_lora(x_t, t, c)),    x_t = q(x0, t)

with classifier-free guidance on both scores. We apply it through the usual stop-gradient
trick: loss = 0.5 * mse(x0, (x0 - grad).detach()), whose gradient w.r.t. x0 is grad / N with
N = x0.numel() under reduction "mean" (the official SwiftBrush code; its lr 1e-6 is tuned
for this), or grad / B under "sum_over_batch" (threestudio's choice).

The "LoRA teacher" is a LoRA adapter on the teacher UNet: adapters disabled = the frozen
teacher, enabled = the student-score network, so one UNet serves both roles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .adapters import adapters
from .conditioning import Conditioning, as_conditioning

PredictionType = Literal["epsilon", "v_prediction"]
Reduction = Literal["mean", "sum_over_batch"]
SUPPORTED_PREDICTIONS = ("epsilon", "v_prediction")


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) broadcast to `like`'s shape (B, C, H, W)."""
    return a.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def x0_from_output(z: torch.Tensor, out: torch.Tensor, abar: torch.Tensor,
                   prediction_type: PredictionType = "epsilon") -> torch.Tensor:
    """Clean latent from a UNet output at noise level `abar` (per sample or scalar).

    epsilon:      x0 = (z - sqrt(1 - abar) * eps) / sqrt(abar)
    v_prediction: x0 = sqrt(abar) * z - sqrt(1 - abar) * v
    """
    abar = _bcast(torch.as_tensor(abar), z)  # (B,) or a scalar; no batch-size constant in traced graphs
    if prediction_type == "epsilon":
        return (z - (1 - abar).sqrt() * out) / abar.sqrt()
    if prediction_type == "v_prediction":
        return abar.sqrt() * z - (1 - abar).sqrt() * out
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (expected one of {SUPPORTED_PREDICTIONS})")


def eps_from_output(x_t: torch.Tensor, out: torch.Tensor, abar: torch.Tensor,
                    prediction_type: PredictionType = "epsilon") -> torch.Tensor:
    """Noise estimate from a UNet output (identity for epsilon; eps = sqrt(abar) v + sqrt(1-abar) x_t for v)."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        abar = _bcast(abar, x_t)
        return abar.sqrt() * out + (1 - abar).sqrt() * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (expected one of {SUPPORTED_PREDICTIONS})")


def add_noise(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (as DDPMScheduler.add_noise)."""
    abar_t = _bcast(abar_t, x0)
    return abar_t.sqrt() * x0 + (1 - abar_t).sqrt() * eps


def noise_draw(x0: torch.Tensor, t_min: int, t_max: int, alphas_cumprod: torch.Tensor,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A distillation loss's draws, in this order from `generator`: t ~ U{t_min..t_max} per sample, noise
    eps ~ N(0, I) shaped like x0, and abar_t."""
    t = torch.randint(t_min, t_max + 1, (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return t, eps, alphas_cumprod.to(x0.device)[t]


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guided_eps(unet, x_t: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor, cond: Conditioning | torch.Tensor,
               uncond: Conditioning | torch.Tensor, scale: float, prediction_type: PredictionType) -> torch.Tensor:
    """CFG noise estimate; both branches in one batched UNet call (B -> 2B), or only the conditional
    one at scale 1. `uncond` may be a batch of one. A bare tensor is a Stable Diffusion context."""
    cond = as_conditioning(cond)
    if scale == 1.0:          # uncond + 1 * (cond - uncond) is the conditional branch: one call of B
        return eps_from_output(x_t, unet(x_t, t, **cond.unet_kwargs()).sample, abar_t, prediction_type)
    both = as_conditioning(uncond).expand(len(cond)).cat(cond)
    out = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), **both.unet_kwargs()).sample
    eps = eps_from_output(torch.cat([x_t, x_t]), out, torch.cat([abar_t, abar_t]), prediction_type)
    eps_u, eps_c = eps.chunk(2)
    return cfg_combine(eps_u, eps_c, scale)


def vsd_grad(eps_teacher: torch.Tensor, eps_lora: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """(1 - abar_t) * (eps_teacher - eps_lora), with NaN/inf mapped to finite values (as the official code)."""
    return torch.nan_to_num((1 - _bcast(abar_t, eps_teacher)) * (eps_teacher - eps_lora))


def surrogate_loss(x0: torch.Tensor, grad: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """0.5 * ||x0 - sg(x0 - grad)||^2 reduced so that d loss / d x0 = grad / N ("mean") or grad / B."""
    target = (x0 - grad).detach()
    if reduction == "mean":
        return 0.5 * F.mse_loss(x0, target, reduction="mean")
    if reduction == "sum_over_batch":
        return 0.5 * F.mse_loss(x0, target, reduction="sum") / x0.shape[0]
    raise ValueError(f"reduction {reduction!r} is not supported (expected 'mean' or 'sum_over_batch')")


@dataclass(frozen=True)
class VSDLoss:
    """Student loss: score distillation between the frozen teacher and the LoRA teacher.

    Call with the teacher UNet (carrying the LoRA adapter), the student's x0 (with grad), the
    prompts' and the empty prompt's conditioning (src/method/conditioning.py; a bare tensor is a Stable
    Diffusion context) and the teacher's alphas_cumprod.
    """

    guidance_scale: float = 4.5          # paper: 4.5, on both scores
    t_min: int = 20                      # paper: t ~ U{20..980}
    t_max: int = 980
    reduction: Reduction = "mean"        # official SwiftBrush code
    prediction_type: PredictionType = "epsilon"
    lora_guidance_scale: float | None = None   # None: guidance_scale (paper); ProlificDreamer uses 1.0
    adapter: str | None = None           # the LoRA teacher's adapter name (None: the active one)

    @property
    def lora_scale(self) -> float:
        """The CFG scale of the LoRA teacher's score (the teacher's unless set apart)."""
        return self.guidance_scale if self.lora_guidance_scale is None else self.lora_guidance_scale

    def __call__(self, unet, x0: torch.Tensor, cond: Conditioning | torch.Tensor, uncond: Conditioning | torch.Tensor,
                 alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None):
        b = x0.shape[0]
        t, eps, abar_t = noise_draw(x0, self.t_min, self.t_max, alphas_cumprod, generator)
        with torch.no_grad():
            x_t = add_noise(x0.detach(), eps, abar_t)
            with adapters(unet, enabled=False):
                eps_teacher = guided_eps(unet, x_t, t, abar_t, cond, uncond, self.guidance_scale,
                                         self.prediction_type)
            with adapters(unet, enabled=True, name=self.adapter):
                eps_lora = guided_eps(unet, x_t, t, abar_t, cond, uncond, self.lora_scale,
                                      self.prediction_type)
            grad = vsd_grad(eps_teacher.float(), eps_lora.float(), abar_t)
        loss = surrogate_loss(x0.float(), grad, self.reduction)
        return loss, {"loss_vsd": loss.detach(), "vsd_grad_norm": grad.norm() / b ** 0.5}


@dataclass(frozen=True)
class LoRALoss:
    """LoRA-teacher loss: denoising score matching on the (detached) student samples.

    t ~ U{t_min..t_max} (SwiftBrush: 0..T-1); each prompt is replaced by the empty prompt with
    probability `p_uncond`; the per-sample epsilon MSE is weighted by abar_t (the official code's
    weighting) or not. `guidance_scale` != 1 fits the LoRA teacher's CFG combination of its two branches
    to the noise instead of its conditional branch (SiD-LSG's kappa_1).
    """

    p_uncond: float = 0.1                # paper: 0.1
    prediction_type: PredictionType = "epsilon"
    weighting: Literal["abar", "uniform"] = "abar"   # official code: abar_t; uniform = plain DDPM loss (SiD)
    adapter: str | None = None           # the LoRA teacher's adapter name (None: the active one)
    guidance_scale: float = 1.0          # SwiftBrush: 1 (the conditional branch alone)
    t_min: int = 0
    t_max: int | None = None             # None: T-1

    def __call__(self, unet, x0: torch.Tensor, cond: Conditioning | torch.Tensor, uncond: Conditioning | torch.Tensor,
                 alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None):
        b = x0.shape[0]
        x0 = x0.detach()
        high = len(alphas_cumprod) - 1 if self.t_max is None else self.t_max
        t, eps, abar_t = noise_draw(x0, self.t_min, high, alphas_cumprod, generator)
        drop = torch.rand(b, generator=generator).to(x0.device) < self.p_uncond
        emb = as_conditioning(cond).where(drop, as_conditioning(uncond).expand(b))
        x_t = add_noise(x0, eps, abar_t)
        with adapters(unet, enabled=True, name=self.adapter):
            eps_pred = guided_eps(unet, x_t, t, abar_t, emb, uncond, self.guidance_scale, self.prediction_type)
        per_sample = F.mse_loss(eps_pred.float(), eps.float(), reduction="none").mean(dim=(1, 2, 3))
        weight = abar_t.float() if self.weighting == "abar" else torch.ones_like(per_sample)
        loss = (per_sample * weight).mean()
        return loss, {"loss_lora": loss.detach()}
