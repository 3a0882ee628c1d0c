"""Score identity distillation, checked against the paper's formula computed the long way on a tiny UNet
(CPU, seeded), and the LoRA teacher's guided update and timestep range that SiD-LSG prescribes."""

from __future__ import annotations

import pytest
import torch

from src.method.adapters import adapters
from src.method.sid import SiDLoss, sid_elementwise
from src.method.vsd import LoRALoss

from test_vsd import long_hand, with_lora


@pytest.fixture
def schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _long_way(unet, x0, cond, uncond, abar, seed, alpha, k_real, k_fake, t_min=20, t_max=980):
    """SiD's loss with separate cond / uncond calls, x0 read from each guided epsilon by hand, the same draws."""
    b = x0.shape[0]
    a, x_t, guided = long_hand(unet, x0, cond, uncond, abar, seed, t_min, t_max)

    def y(enabled, k):
        return (x_t - (1 - a).sqrt() * guided(enabled, k)) / a.sqrt()

    y_real, y_fake = y(False, k_real), y(True, k_fake)
    w = torch.stack([(x0[i] - y_real[i]).abs().mean() for i in range(b)]).detach().reshape(-1, 1, 1, 1)
    return ((y_real - y_fake) * ((y_real - x0) - alpha * (y_real - y_fake)) / w).sum() / b


@pytest.mark.parametrize("alpha, k_real, k_fake", [(1.2, 4.5, 4.5), (1.0, 4.5, 1.5)])
def test_sid_gradient_is_the_papers_through_both_scores(schedule, tiny_unet, alpha, k_real, k_fake):
    unet = with_lora(tiny_unet())
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    cond, uncond = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    loss, stats = SiDLoss(alpha, k_real, k_fake, reduction="sum_over_batch")(
        unet, x0, cond, uncond, schedule.alphas_cumprod, torch.Generator().manual_seed(11))
    loss.backward()
    # No weight of either score network receives gradient; which ones train is left as it was.
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters())

    x_ref = x0.detach().clone().requires_grad_(True)
    expected = _long_way(unet, x_ref, cond, uncond, schedule.alphas_cumprod, 11, alpha, k_real, k_fake)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-4)
    assert x_ref.grad.abs().max() > 1e-3
    assert torch.allclose(x0.grad, x_ref.grad, rtol=1e-3, atol=1e-4 * x_ref.grad.abs().max().item())
    assert stats["loss_sid"] == loss.detach() and stats["sid_weight"] > 0


def test_the_gradient_flows_through_the_scores_not_only_the_explicit_term(schedule, tiny_unet):
    """With the scores held fixed, d/dx_g is -(y_real - y_fake) / w; SiD's own gradient differs (it goes
    through x_t into both networks), which is what separates it from a stop-gradient surrogate."""
    g = torch.Generator().manual_seed(2)
    x_g = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    y_real, y_fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sid_elementwise(x_g, y_real, y_fake, 1.2).sum().backward()
    w = (x_g.detach() - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(x_g.grad, -(y_real - y_fake) / w, atol=1e-5)

    unet = with_lora(tiny_unet())
    x0 = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    cond, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    loss, _ = SiDLoss(reduction="sum_over_batch")(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                                  torch.Generator().manual_seed(4))
    loss.backward()
    r = torch.Generator().manual_seed(4)
    t = torch.randint(20, 981, (2,), generator=r)
    eps = torch.randn(x0.shape, generator=r)
    with torch.no_grad():     # the same scores, as constants
        a = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        ys = []
        for enabled in (False, True):
            with adapters(unet, enabled):
                e_u = unet(x_t, t, encoder_hidden_states=uncond.expand_as(cond)).sample
                e_c = unet(x_t, t, encoder_hidden_states=cond).sample
            ys.append((x_t - (1 - a).sqrt() * (e_u + 4.5 * (e_c - e_u))) / a.sqrt())
        w = (x0 - ys[0]).abs().mean(dim=(1, 2, 3), keepdim=True)
        explicit = -(ys[0] - ys[1]) / w / 2
    assert not torch.allclose(x0.grad, explicit, rtol=0.05)


def test_sid_is_zero_when_the_fake_score_equals_the_teacher(schedule, tiny_unet):
    unet = with_lora(tiny_unet(), perturb=False)     # LoRA B = 0: the same network in both roles
    x0 = torch.randn(2, 4, 8, 8).requires_grad_(True)
    loss, _ = SiDLoss()(unet, x0, torch.randn(2, 5, 16), torch.randn(1, 5, 16), schedule.alphas_cumprod,
                        torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() == 0.0 and x0.grad.abs().max() < 1e-8   # float noise of two graphs of one function


def test_mean_reduction_divides_by_the_elements(schedule, tiny_unet):
    unet = with_lora(tiny_unet())
    x0 = torch.randn(2, 4, 8, 8)
    cond, uncond = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    mean, _ = SiDLoss(reduction="mean")(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                        torch.Generator().manual_seed(1))
    per_batch, _ = SiDLoss(reduction="sum_over_batch")(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                                       torch.Generator().manual_seed(1))
    assert torch.allclose(mean * x0[0].numel(), per_batch, rtol=1e-5)


def test_lora_teacher_update_with_guidance_and_a_timestep_range(schedule, tiny_unet):
    """SiD-LSG's fake-score update: its CFG combination (kappa_1) fitted to the noise, uniform over t in range."""
    unet = with_lora(tiny_unet())
    g = torch.Generator().manual_seed(3)
    x0, cond, uncond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 16, generator=g), \
        torch.randn(1, 5, 16, generator=g)
    loss, _ = LoRALoss(p_uncond=0.5, weighting="uniform", guidance_scale=2.0, t_min=20, t_max=30)(
        unet, x0, cond, uncond, schedule.alphas_cumprod, torch.Generator().manual_seed(9))
    r = torch.Generator().manual_seed(9)
    t = torch.randint(20, 31, (4,), generator=r)
    eps = torch.randn(x0.shape, generator=r)
    drop = torch.rand(4, generator=r) < 0.5
    emb = torch.stack([uncond[0] if d else cond[i] for i, d in enumerate(drop)])
    x_t = schedule.add_noise(x0, eps, t)
    with torch.no_grad():
        e_u = unet(x_t, t, encoder_hidden_states=uncond.expand_as(emb)).sample
        e_c = unet(x_t, t, encoder_hidden_states=emb).sample
    expected = ((e_u + 2.0 * (e_c - e_u) - eps) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
