"""What each speed-up of the SwiftBrush step buys, measured against the straightforward step.

    python -m src.bench.vsd_step               # the embedded teacher, batch 16; reports/bench/vsd_step.{json,md}
    python -m src.bench.vsd_step --quick       # fewer repeats

Every variant computes the same mathematics (src/vsd.py's student gradient, then the same
LoRA-teacher update); `reference_vsd` is the straightforward version: four UNet calls
(teacher and LoRA teacher, unconditional and conditional branch each) with autograd
recording. For each variant the table gives the median time of a whole training step and how
far its student gradient is from the reference's (rounding level is the requirement;
tests/test_bench.py checks the same at toy size). src/distill.py uses only what wins.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import run_cli
from ..fileio import atomic_file, write_json
from ..vsd import LoRALoss, VSDLoss, adapters, add_noise, cfg_combine, eps_from_output, surrogate_loss, vsd_grad


def reference_vsd(cfg: VSDLoss, unet, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  alphas_cumprod: torch.Tensor, generator: torch.Generator, no_grad: bool = False) -> torch.Tensor:
    """The VSD loss written the obvious way: VSDLoss's random draws, four UNet calls, autograd on (or off)."""
    b = x0.shape[0]
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    abar_t = alphas_cumprod.to(x0.device)[t]
    x_t = add_noise(x0.detach(), eps, abar_t)
    uncond = uncond.expand_as(cond)

    def score(enabled: bool, scale: float) -> torch.Tensor:
        with adapters(unet, enabled=enabled):
            e_u = eps_from_output(x_t, unet(x_t, t, encoder_hidden_states=uncond).sample, abar_t, cfg.prediction_type)
            e_c = eps_from_output(x_t, unet(x_t, t, encoder_hidden_states=cond).sample, abar_t, cfg.prediction_type)
        return cfg_combine(e_u, e_c, scale).detach().float()

    with torch.no_grad() if no_grad else torch.enable_grad():
        grad = vsd_grad(score(False, cfg.guidance_scale), score(True, cfg.lora_scale), abar_t)
    return surrogate_loss(x0.float(), grad, cfg.reduction)


def _reference(cfg, *args):
    return reference_vsd(cfg, *args)


def _no_grad(cfg, *args):
    return reference_vsd(cfg, *args, no_grad=True)


def _shipped(cfg, *args):
    return cfg(*args)[0]


def _shipped_lora_cfg1(cfg, *args):
    return replace(cfg, lora_guidance_scale=1.0)(*args)[0]


def _reference_lora_cfg1(cfg, *args):
    return reference_vsd(replace(cfg, lora_guidance_scale=1.0), *args)


@dataclass(frozen=True)
class Variant:
    name: str
    vsd: Callable
    channels_last: bool = False
    classic_attention: bool = False
    maths: str = "paper"              # variants are compared with the first variant of the same maths


VARIANTS = (
    Variant("reference (4 UNet calls, autograd on)", _reference),
    Variant("scores under no_grad", _no_grad),
    Variant("+ CFG branches batched: 2 calls of 2B (shipped)", _shipped),
    Variant("+ channels_last memory format", _shipped, channels_last=True),
    Variant("shipped with classic attention instead of SDPA", _shipped, classic_attention=True),
    # The default params' maths (LoRA teacher without CFG): its own reference, then the shipped step,
    # which needs only the conditional branch of the LoRA teacher (one call of B instead of 2B).
    Variant("reference, LoRA teacher without CFG (4 calls, autograd on)", _reference_lora_cfg1, maths="lora_cfg1"),
    Variant("shipped, LoRA teacher without CFG: its score in 1 call of B (default params)", _shipped_lora_cfg1,
            maths="lora_cfg1"),
)


@dataclass
class StepState:
    student: torch.nn.Module
    teacher: torch.nn.Module          # carries the LoRA adapter
    lora: list
    opt_student: torch.optim.Optimizer
    opt_lora: torch.optim.Optimizer
    cond: torch.Tensor
    uncond: torch.Tensor
    abar: torch.Tensor
    shape: tuple


def prepare(unet, cond: torch.Tensor, uncond: torch.Tensor, abar: torch.Tensor, variant: Variant,
            lora_rank: int = 64, lora_alpha: int = 108) -> StepState:
    """Fresh student / LoRA teacher / optimisers from `unet`, set up as the variant asks."""
    from diffusers.models.attention_processor import AttnProcessor
    from peft import LoraConfig

    student = copy.deepcopy(unet).train().requires_grad_(True)
    teacher = copy.deepcopy(unet).requires_grad_(False)
    torch.manual_seed(0)
    teacher.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=["to_q", "to_v"]))
    lora = [p for n, p in teacher.named_parameters() if "lora_" in n]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # move B off its zero init, so that the LoRA teacher differs and the gradient is not 0
        for n, p in teacher.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 1e-2)
    for p in lora:
        p.requires_grad_(True)
    for m in (student, teacher):
        if variant.channels_last:
            m.to(memory_format=torch.channels_last)
        if variant.classic_attention:
            m.set_attn_processor(AttnProcessor())
    return StepState(student, teacher, lora, torch.optim.Adam(student.parameters(), lr=1e-6),
                     torch.optim.Adam(lora, lr=1e-3), cond, uncond, abar,
                     (cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size))


def student_gradient(s: StepState, variant: Variant, z: torch.Tensor, seed: int) -> torch.Tensor:
    """The student's parameter gradient from one VSD loss (flattened), without stepping."""
    from ..onestep import student_x0

    if variant.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    x0 = student_x0(s.student, z, s.cond, s.abar)
    loss = variant.vsd(VSDLoss(), s.teacher, x0, s.cond, s.uncond, s.abar, torch.Generator().manual_seed(seed))
    s.student.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in s.student.parameters() if p.grad is not None])


def train_step(s: StepState, variant: Variant, gen: torch.Generator) -> None:
    """One whole SwiftBrush step as src/distill.py runs it: student update, then LoRA-teacher update."""
    from ..onestep import student_x0

    z = torch.randn(s.shape, generator=gen)
    if variant.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    x0 = student_x0(s.student, z, s.cond, s.abar)
    variant.vsd(VSDLoss(), s.teacher, x0, s.cond, s.uncond, s.abar, gen).backward()
    torch.nn.utils.clip_grad_norm_(s.student.parameters(), 1.0)
    s.opt_student.step()
    s.opt_student.zero_grad(set_to_none=True)
    loss, _ = LoRALoss()(s.teacher, x0.detach(), s.cond, s.uncond, s.abar, gen)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(s.lora, 1.0)
    s.opt_lora.step()
    s.opt_lora.zero_grad(set_to_none=True)


def compare(unet, cond: torch.Tensor, uncond: torch.Tensor, abar: torch.Tensor, repeats: int,
            variants: tuple[Variant, ...] = VARIANTS, seed: int = 0) -> list[dict]:
    """Per variant: median seconds per step and the student gradient's distance from the reference."""
    z = torch.randn((cond.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
                    generator=torch.Generator().manual_seed(seed))
    grads, states, refs = [], [], {}
    for v in variants:
        g = student_gradient(prepare(unet, cond, uncond, abar, v), v, z, seed)
        grads.append((g, refs.setdefault(v.maths, g)))
        states.append((prepare(unet, cond, uncond, abar, v), torch.Generator().manual_seed(seed)))
        train_step(states[-1][0], v, states[-1][1])                     # warm-up
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):             # round-robin, so that the machine's drift hits every variant alike
        for i, v in enumerate(variants):
            t0 = time.perf_counter()
            train_step(states[i][0], v, states[i][1])
            times[i].append(time.perf_counter() - t0)
    rows, base = [], {}
    for v, ts, (g, ref) in zip(variants, times, grads):
        seconds = statistics.median(ts)
        base.setdefault(v.maths, seconds)
        rows.append({"variant": v.name, "maths": v.maths, "s_per_step": round(seconds, 4),
                     "speedup_vs_reference": round(base[v.maths] / seconds, 2),
                     "grad_max_rel_diff": float((g - ref).abs().max() / ref.abs().max())})
    return rows


def report(rows: list[dict], batch: int, machine: str) -> str:
    lines = [f"# The VSD training step: what each change buys ({machine})", "",
             f"`python -m src.bench.vsd_step`: the embedded teacher, batch {batch}, median of repeats after a "
             "warm-up; a whole step = student forward, VSD loss, backward, Adam, LoRA-teacher update.", "",
             "| variant | s / step | speed-up vs its reference | student-gradient max rel. diff |",
             "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['s_per_step']} | {r['speedup_vs_reference']}x | {r['grad_max_rel_diff']:.1e} |"
              for r in rows]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    from ..bench.__main__ import machine
    from ..teacher import alphas_cumprod, encode_prompts, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    pipe = load_pipeline(args.teacher)
    prompts = [f"a red square at the top left, blue background {i}" for i in range(args.batch)]
    cond, uncond = encode_prompts(pipe, prompts), encode_prompts(pipe, [""])
    rows = compare(pipe.unet, cond, uncond, alphas_cumprod(pipe), 3 if args.quick else args.repeats)
    write_json(args.out / "vsd_step.json", {"machine": machine(), "batch": args.batch, "variants": rows})
    with atomic_file(args.out / "vsd_step.md") as f:
        f.write(report(rows, args.batch, machine()))
    print(report(rows, args.batch, machine()))


if __name__ == "__main__":
    run_cli(main)
