"""Score identity Distillation (SiD; SiD-LSG for text-to-image): a second student loss beside VSD.

Same players as VSD (src/method/vsd.py): the frozen teacher (adapters off) is the real score, the LoRA
teacher (adapter on) is the fake score, trained on the student's detached samples. With x_g the
student's x0, x_t = q(x_g, t) and both scores read as clean-latent predictions at x_t,

    y_real = x0(teacher, CFG kappa_real),    y_fake = x0(LoRA teacher, CFG kappa_fake),
    L = (y_real - y_fake) * ((y_real - x_g) - alpha * (y_real - y_fake)) / w,    w = mean |x_g - y_real|

per element, w per sample and without gradient, alpha = 1.2 (the paper; its released SD scripts use 1).
Unlike VSD's stop-gradient surrogate, the gradient flows through x_t into both score networks (their
weights receive none): the cost is a backward pass through the UNet for each of the two scores.

Long-and-short guidance (LSG) gives each role its own CFG scale: kappa_real for the teacher in this
loss, kappa_fake for the fake score in this loss, and a third for the fake score's own training
(`LoRALoss.guidance_scale`). The released SD 1.5 model with FID 8.15 uses 1.5 for all of them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from .adapters import adapters
from .conditioning import Conditioning
from .vsd import PredictionType, Reduction, add_noise, guided_eps, noise_draw, x0_from_output

MIN_WEIGHT = 1e-5          # w's floor (the official code's), against division by a vanishing error


def sid_weight(x_g: torch.Tensor, y_real: torch.Tensor) -> torch.Tensor:
    """w = mean |x_g - y_real| per sample, shape (B, 1, 1, 1), floored at MIN_WEIGHT; no gradient."""
    return (x_g.detach() - y_real.detach()).abs().mean(dim=tuple(range(1, x_g.ndim)), keepdim=True) \
        .clamp_min(MIN_WEIGHT)


def sid_elementwise(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss per element: (y_real - y_fake) ((y_real - x_g) - alpha (y_real - y_fake)) / w."""
    gap = y_real - y_fake
    return gap * ((y_real - x_g) - alpha * gap) / sid_weight(x_g, y_real)


def reduce(per_element: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Sum over elements divided by their number ("mean") or by the batch ("sum_over_batch", the official code)."""
    if reduction == "mean":
        return per_element.mean()
    if reduction == "sum_over_batch":
        return per_element.sum() / per_element.shape[0]
    raise ValueError(f"reduction {reduction!r} is not supported (expected 'mean' or 'sum_over_batch')")


@contextlib.contextmanager
def weights_frozen(unet) -> Iterator[None]:
    """No weight of `unet` (adapters included) records gradient in the forward passes inside; the flags
    are restored after, so the LoRA teacher's own update trains as before. Inputs still carry gradient."""
    unet = getattr(unet, "module", unet)
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def predicted_x0(unet, x_t: torch.Tensor, t: torch.Tensor, abar_t: torch.Tensor, cond, uncond, scale: float,
                 prediction_type: PredictionType) -> torch.Tensor:
    """A score network's guided clean-latent prediction at x_t (x0 from its CFG noise estimate)."""
    eps = guided_eps(unet, x_t, t, abar_t, cond, uncond, scale, prediction_type)
    return x0_from_output(x_t, eps, abar_t, "epsilon")


@dataclass(frozen=True)
class SiDLoss:
    """Student loss: score identity distillation between the frozen teacher and the LoRA teacher.

    Called as VSDLoss is: the UNet carrying the LoRA teacher's adapter (not a DDP wrapper: the forward
    passes here build a graph), the student's x0 with grad, the prompts' and the empty prompt's
    conditioning, the teacher's alphas_cumprod and the step's generator.
    """

    alpha: float = 1.2                   # paper: 1.2
    guidance_scale: float = 4.5          # kappa_real: CFG on the teacher
    fake_guidance_scale: float = 4.5     # kappa_fake: CFG on the LoRA teacher in this loss
    t_min: int = 20                      # SiD-LSG: t in [20, 979]
    t_max: int = 980
    reduction: Reduction = "mean"
    prediction_type: PredictionType = "epsilon"
    adapter: str | None = None

    def __call__(self, unet, x0: torch.Tensor, cond: Conditioning | torch.Tensor, uncond: Conditioning | torch.Tensor,
                 alphas_cumprod: torch.Tensor, generator: torch.Generator | None = None):
        t, eps, abar_t = noise_draw(x0, self.t_min, self.t_max, alphas_cumprod, generator)
        x_t = add_noise(x0, eps, abar_t)                  # with gradient, unlike VSD
        with adapters(unet, enabled=False), weights_frozen(unet):      # frozen after PEFT's toggles, which
            y_real = predicted_x0(unet, x_t, t, abar_t, cond, uncond, self.guidance_scale, self.prediction_type)
        with adapters(unet, enabled=True, name=self.adapter), weights_frozen(unet):    # set requires_grad
            y_fake = predicted_x0(unet, x_t, t, abar_t, cond, uncond, self.fake_guidance_scale, self.prediction_type)
        per = sid_elementwise(x0.float(), y_real.float(), y_fake.float(), self.alpha)
        loss = reduce(per, self.reduction)
        gap = (y_real - y_fake).detach().float()
        return loss, {"loss_sid": loss.detach(), "score_gap": gap.flatten(1).norm(dim=1).mean(),
                      "sid_weight": sid_weight(x0, y_real).mean()}
