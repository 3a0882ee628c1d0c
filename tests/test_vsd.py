"""The VSD mathematics, checked against independent computations on a tiny UNet (CPU, seeded)."""

from __future__ import annotations

import copy

import pytest
import torch

from src.method.adapters import adapters
from src.method.vsd import (
    LoRALoss,
    VSDLoss,
    add_noise,
    cfg_combine,
    eps_from_output,
    surrogate_loss,
    vsd_grad,
    x0_from_output,
)


def with_lora(unet, perturb: bool = True, seed: int = 1):
    """Attach the LoRA teacher adapter (to_q, to_v); optionally move it away from its zero init."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights=True))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return unet


@pytest.fixture
def schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_add_noise_matches_the_scheduler(schedule):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ours = add_noise(x0, eps, schedule.alphas_cumprod[t])
    assert torch.allclose(ours, schedule.add_noise(x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_conversion_inverts_the_forward_process_at_T(schedule, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    abar_T = schedule.alphas_cumprod[-1]  # taken from the scheduler, not pasted (0.0047 for SD)
    assert abs(abar_T.item() - 0.0047) < 1e-4
    z = add_noise(x0, eps, abar_T.expand(2))
    out = eps if prediction_type == "epsilon" else abar_T.sqrt() * eps - (1 - abar_T).sqrt() * x0  # v target
    assert torch.allclose(x0_from_output(z, out, abar_T, prediction_type), x0, atol=1e-4)
    assert torch.allclose(eps_from_output(z, out, abar_T.expand(2), prediction_type), eps, atol=1e-5)


def test_unsupported_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        x0_from_output(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor(0.5), "sample")


def test_cfg_combines_as_specified():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(cfg_combine(u, c, 1.0), c) and torch.equal(cfg_combine(u, c, 0.0), u)
    assert torch.allclose(cfg_combine(u, c, 4.5), torch.tensor([1 + 4.5 * 2, -2 + 4.5 * 2]))


def test_disabled_adapters_reproduce_the_teacher_exactly(tiny_unet):
    teacher = tiny_unet()
    reference = copy.deepcopy(teacher)
    unet = with_lora(teacher)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = reference(x, t, encoder_hidden_states=c).sample
        with adapters(unet, enabled=False):
            off = unet(x, t, encoder_hidden_states=c).sample
        with adapters(unet, enabled=True):
            on = unet(x, t, encoder_hidden_states=c).sample
    assert torch.equal(off, expected)
    assert not torch.allclose(on, expected, atol=1e-4)  # the adapter does something when on


def long_hand(unet, x0, cond, uncond, abar, seed, t_min=20, t_max=980):
    """The losses' draws redone by hand (t, then noise, from `seed`): (a, x_t, guided), with guided(enabled, w)
    the CFG epsilon by separate cond / uncond calls, adapters on or off."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(t_min, t_max + 1, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = abar[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps

    def guided(enabled, w):
        with adapters(unet, enabled):
            e_u = unet(x_t, t, encoder_hidden_states=uncond.expand_as(cond)).sample
            e_c = unet(x_t, t, encoder_hidden_states=cond).sample
        return e_u + w * (e_c - e_u)
    return a, x_t, guided


def _manual_vsd_grad(unet, x0, cond, uncond, abar, scale, seed, t_min=20, t_max=980, lora_scale=None):
    """The VSD gradient computed the long way: separate cond/uncond calls, same random draws."""
    a, _, guided = long_hand(unet, x0, cond, uncond, abar, seed, t_min, t_max)
    with torch.no_grad():
        return (1 - a) * (guided(False, scale) - guided(True, scale if lora_scale is None else lora_scale))


@pytest.mark.parametrize("reduction, denom", [("mean", "numel"), ("sum_over_batch", "batch")])
def test_student_gradient_is_the_vsd_gradient(schedule, reduction, denom, tiny_unet):
    unet = with_lora(tiny_unet())
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(True)
    cond, uncond = torch.randn(3, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    loss, stats = VSDLoss(guidance_scale=4.5, reduction=reduction)(
        unet, x0, cond, uncond, schedule.alphas_cumprod, torch.Generator().manual_seed(11))
    loss.backward()
    expected = _manual_vsd_grad(unet, x0.detach(), cond, uncond, schedule.alphas_cumprod, 4.5, seed=11)
    n = x0.numel() if denom == "numel" else x0.shape[0]
    assert expected.abs().max() > 1e-3  # a real, non-trivial gradient
    # Tolerance: x0 - (x0 - grad) loses float32 digits where |grad| << |x0|.
    assert torch.allclose(x0.grad, expected / n, rtol=1e-4, atol=1e-5 * expected.abs().max().item() / n)
    assert "loss_vsd" in stats
    # The frozen teacher and the LoRA teacher receive no gradient from the student loss.
    assert all(p.grad is None for p in unet.parameters())


def test_lora_teacher_guidance_can_differ_from_the_teacher_s(schedule, tiny_unet):
    """lora_guidance_scale=1: the LoRA teacher's score is its conditional branch alone (ProlificDreamer)."""
    unet = with_lora(tiny_unet())
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    cond, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16, generator=g)
    loss, _ = VSDLoss(guidance_scale=4.5, reduction="sum_over_batch", lora_guidance_scale=1.0)(
        unet, x0, cond, uncond, schedule.alphas_cumprod, torch.Generator().manual_seed(3))
    loss.backward()
    expected = _manual_vsd_grad(unet, x0.detach(), cond, uncond, schedule.alphas_cumprod, 4.5, seed=3,
                                lora_scale=1.0) / 2
    same_scale = _manual_vsd_grad(unet, x0.detach(), cond, uncond, schedule.alphas_cumprod, 4.5, seed=3) / 2
    assert torch.allclose(x0.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert not torch.allclose(x0.grad, same_scale, rtol=1e-2)


def test_gradient_is_zero_when_teacher_and_lora_teacher_agree(schedule, tiny_unet):
    unet = with_lora(tiny_unet(), perturb=False)  # LoRA B initialised to zero: identical scores
    x0 = torch.randn(2, 4, 8, 8).requires_grad_(True)
    cond, uncond = torch.randn(2, 5, 16), torch.randn(1, 5, 16)
    loss, _ = VSDLoss()(unet, x0, cond, uncond, schedule.alphas_cumprod, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.count_nonzero(x0.grad) == 0


def test_vsd_grad_maps_non_finite_values():
    a = torch.tensor([0.5])
    out = vsd_grad(torch.tensor([[[[float("nan"), float("inf")]]]]), torch.zeros(1, 1, 1, 2), a)
    assert torch.isfinite(out).all()


def test_surrogate_loss_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="reduction"):
        surrogate_loss(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), "sum")


def test_lora_loss_trains_only_the_adapter_on_detached_samples(schedule, tiny_unet):
    unet = with_lora(tiny_unet())
    x0 = torch.randn(4, 4, 8, 8).requires_grad_(True)
    cond, uncond = torch.randn(4, 5, 16), torch.randn(1, 5, 16)
    loss, stats = LoRALoss(p_uncond=0.5)(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                         torch.Generator().manual_seed(0))
    loss.backward()
    assert x0.grad is None  # x0 is detached: the LoRA step never moves the student
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert stats["loss_lora"] > 0


def test_lora_loss_is_abar_weighted_epsilon_mse_with_prompt_dropout(schedule, tiny_unet):
    unet = with_lora(tiny_unet())
    g = torch.Generator().manual_seed(3)
    x0, cond, uncond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, 16, generator=g), \
        torch.randn(1, 5, 16, generator=g)
    loss, _ = LoRALoss(p_uncond=0.5)(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                     torch.Generator().manual_seed(9))
    # Recompute with the same draws, in the order the loss makes them.
    r = torch.Generator().manual_seed(9)
    t = torch.randint(0, 1000, (4,), generator=r)
    eps = torch.randn(x0.shape, generator=r)
    drop = torch.rand(4, generator=r) < 0.5
    assert 0 < drop.sum() < 4  # this seed exercises both branches
    emb = torch.stack([uncond[0] if d else cond[i] for i, d in enumerate(drop)])
    a = schedule.alphas_cumprod[t]
    x_t = schedule.add_noise(x0, eps, t)
    with torch.no_grad():
        pred = unet(x_t, t, encoder_hidden_states=emb).sample
    expected = (((pred - eps) ** 2).mean(dim=(1, 2, 3)) * a).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)
    # The uniform option (plain DDPM loss) drops only the abar_t weight.
    uniform, _ = LoRALoss(p_uncond=0.5, weighting="uniform")(unet, x0, cond, uncond, schedule.alphas_cumprod,
                                                             torch.Generator().manual_seed(9))
    assert torch.allclose(uniform, ((pred - eps) ** 2).mean(), rtol=1e-5)


class _OracleUNet(torch.nn.Module):
    """Stands in for a perfect denoiser of one known x0: at timestep t it returns the exact epsilon
    of its input under abar_t, so a student read-out is right only when it asks at the timestep it
    converts with."""

    def __init__(self, x0: torch.Tensor, abar: torch.Tensor):
        super().__init__()
        self.x0, self.abar, self.seen = x0, abar, []

    def forward(self, x, t, encoder_hidden_states=None):
        from types import SimpleNamespace

        self.seen.append(t.tolist())
        a = self.abar[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(x - a.sqrt() * self.x0) / (1 - a).sqrt())


@pytest.mark.parametrize("timestep, expected", [(None, 999), (899, 899), (1, 1)])
def test_student_x0_asks_and_converts_at_the_student_timestep(schedule, timestep, expected):
    from src.method.onestep import student_x0

    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    unet = _OracleUNet(x0, schedule.alphas_cumprod)
    got = student_x0(unet, z, torch.zeros(2, 77, 8), schedule.alphas_cumprod, "epsilon", timestep)
    assert unet.seen == [[expected, expected]]
    assert torch.allclose(got, x0, atol=1e-3)
    # Reading the same output with T-1's abar instead (the paper's) is a different image.
    if expected != 999:
        wrong = x0_from_output(z, unet(z, torch.full((2,), expected)).sample, schedule.alphas_cumprod[-1])
        assert (wrong - x0).abs().max() > 0.1


@pytest.mark.parametrize("bad", [0, 1000, -5])
def test_student_timestep_outside_the_schedule_is_refused(schedule, bad):
    from src.core.errors import UserError
    from src.method.onestep import student_timestep

    with pytest.raises(UserError, match=r"distill.student_timestep = .*expected 1\.\.999"):
        student_timestep(schedule.alphas_cumprod, bad)


@pytest.mark.parametrize("timestep", [999, 899, 399])
def test_one_step_scheduler_steps_once_at_the_timestep_to_x0(schedule, timestep):
    from src.method.onestep import one_step_scheduler, timestep_of

    scheduler = one_step_scheduler(schedule, timestep)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [timestep]
    assert torch.equal(scheduler.alphas_cumprod, schedule.alphas_cumprod[:timestep + 1])   # the same schedule
    assert timestep_of(type("Pipe", (), {"scheduler": scheduler})()) == timestep
    g = torch.Generator().manual_seed(1)
    z, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    stepped = scheduler.step(out, timestep, z).prev_sample
    assert torch.allclose(stepped, x0_from_output(z, out, schedule.alphas_cumprod[timestep]), atol=1e-4)
