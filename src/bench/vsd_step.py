"""What each speed-up of the SwiftBrush step buys, measured against the straightforward step.

    python -m src.bench.vsd_step               # the embedded teacher, batch 16; reports/bench/vsd_step.{json,md}
    python -m src.bench.vsd_step --quick       # fewer repeats

Every variant computes the same mathematics (src/method/vsd.py's student gradient); `reference_vsd`
is the straightforward version: four UNet calls (teacher and LoRA teacher, unconditional and
conditional branch each) with autograd recording. Each variant runs inside a distillation run
built as `python -m src.distill` builds it (src/bench/common.py), whose VSD loss it replaces; a
timed step is distill's own training step. For each variant the table gives the median time of
a whole step and how far its student gradient is from the reference's (rounding level is the
requirement; tests/test_bench.py checks the same at micro size). src/distill.py uses only what wins.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..core.config import load_config
from ..core.errors import run_cli
from ..core.fileio import atomic_file, write_json
from ..method.adapters import adapters
from ..method.conditioning import as_conditioning, encode
from ..method.onestep import student_x0
from ..method.vsd import VSDLoss, add_noise, cfg_combine, eps_from_output, surrogate_loss, vsd_grad
from .common import DistillRun, machine


def reference_vsd(cfg: VSDLoss, unet, x0: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  alphas_cumprod: torch.Tensor, generator: torch.Generator, no_grad: bool = False) -> torch.Tensor:
    """The VSD loss written the obvious way: VSDLoss's random draws, four UNet calls, autograd on (or off)."""
    b = x0.shape[0]
    t = torch.randint(cfg.t_min, cfg.t_max + 1, (b,), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    abar_t = alphas_cumprod.to(x0.device)[t]
    x_t = add_noise(x0.detach(), eps, abar_t)
    cond = as_conditioning(cond)
    uncond = as_conditioning(uncond).expand(b)

    def score(enabled: bool, scale: float) -> torch.Tensor:
        with adapters(unet, enabled=enabled):
            e_u = eps_from_output(x_t, unet(x_t, t, **uncond.unet_kwargs()).sample, abar_t, cfg.prediction_type)
            e_c = eps_from_output(x_t, unet(x_t, t, **cond.unet_kwargs()).sample, abar_t, cfg.prediction_type)
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


# The settings the variants assume: no CLIP loss and no EMA (the VSD step alone), the paper's CFG on the LoRA
# teacher (the lora_cfg1 variants set their own).
BASE_OVERRIDES = ["distill.clip_model=null", "distill.ema_decay=null", "distill.lora_guidance_scale=null"]


@dataclass
class VariantLoss:
    """The run's VSD loss computed the variant's way, called by distill's training step as it calls VSDLoss
    (which replaces `t_max` at each step when `distill.t_max_end` anneals the range)."""

    variant: Variant
    base: VSDLoss
    t_max: int | None = None

    def __call__(self, unet, x0, cond, uncond, alphas_cumprod, generator):
        base = self.base if self.t_max is None else replace(self.base, t_max=self.t_max)
        return self.variant.vsd(base, unet, x0, cond, uncond, alphas_cumprod, generator), {}


def variant_run(overrides: list[str], tmp: Path, variant: Variant, train_prompts: Path | None = None,
                seed: int = 1) -> DistillRun:
    """A distillation run with the variant's VSD loss and memory format. The LoRA teacher's weights are moved
    off their init by a seeded draw, the same in every run, so that the gradient is not 0 and runs compare."""
    from diffusers.models.attention_processor import AttnProcessor

    r = DistillRun(overrides, tmp, train_prompts)
    run = r.run
    run.student_loss = VariantLoss(variant, run.student_loss)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():             # A at the scale of its own init, B off its zero init
        for n, p in run.teacher.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                scale = p.shape[1] ** -0.5 if "lora_A" in n else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    for m in {id(run.student): run.student, id(run.teacher): run.teacher}.values():
        if variant.channels_last:
            m.to(memory_format=torch.channels_last)
        if variant.classic_attention:
            m.set_attn_processor(AttnProcessor())
    return r


def student_gradient(r: DistillRun, seed: int) -> torch.Tensor:
    """The student's parameter gradient from one VSD loss on distill's draws of step `seed` (flattened),
    without stepping."""
    from .. import distill as D

    run = r.run
    gen, idx, z = D.step_draws(run, r.cfg, r.config.seed, seed)
    cond = encode(run.pipe, [run.prompts[i] for i in idx], latent_side=run.shape[-1]).float()
    if isinstance(run.student_loss, VariantLoss) and run.student_loss.variant.channels_last:
        z = z.contiguous(memory_format=torch.channels_last)
    with run.as_student(run.student):
        x0 = student_x0(run.student, z, cond, run.abar, run.prediction, run.t_student)
    loss, _ = run.student_loss(run.teacher, x0, cond, run.uncond, run.abar, gen)
    for p in run.student_params:
        p.grad = None
    loss.backward()
    return torch.cat([p.grad.flatten() for p in run.student_params if p.grad is not None])


def compare(overrides: list[str], tmp: Path, repeats: int, variants: tuple[Variant, ...] = VARIANTS,
            train_prompts: Path | None = None, seed: int = 0) -> list[dict]:
    """Per variant: median seconds per training step and the student gradient's distance from the reference."""
    grads, runs, refs = [], [], {}
    for i, v in enumerate(variants):
        r = variant_run(overrides, tmp / f"variant{i}", v, train_prompts)
        g = student_gradient(r, seed)
        grads.append((g, refs.setdefault(v.maths, g)))
        runs.append(r)
        r.step(0)                                                        # warm-up
    times = round_robin_steps(runs, repeats)
    rows, base = [], {}
    for v, ts, (g, ref) in zip(variants, times, grads):
        seconds = statistics.median(ts)
        base.setdefault(v.maths, seconds)
        rows.append({"variant": v.name, "maths": v.maths, "s_per_step": round(seconds, 4),
                     "speedup_vs_reference": round(base[v.maths] / seconds, 2),
                     "grad_max_rel_diff": float((g - ref).abs().max() / ref.abs().max())})
    return rows


def round_robin_steps(runs: list[DistillRun], repeats: int) -> list[list[float]]:
    """Seconds of steps 1..repeats of every run, in turns, so that the machine's drift hits every run alike."""
    times: list[list[float]] = [[] for _ in runs]
    for k in range(1, repeats + 1):
        for i, r in enumerate(runs):
            times[i].append(r.step(k))
    return times


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="params.yaml overrides (the teacher, batch size, ...), after the benchmark's own")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    overrides = BASE_OVERRIDES + args.overrides
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(overrides, Path(tmp), 3 if args.quick else args.repeats)
    batch = load_config(overrides=overrides).distill.batch_size
    write_json(args.out / "vsd_step.json", {"machine": machine(), "batch": batch, "variants": rows})
    with atomic_file(args.out / "vsd_step.md") as f:
        f.write(report(rows, batch, machine()))
    print(report(rows, batch, machine()))


if __name__ == "__main__":
    run_cli(main)
