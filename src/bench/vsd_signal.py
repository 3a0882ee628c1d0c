"""Diagnostic: how good is the VSD training signal of a distillation checkpoint, timestep by timestep?

    python -m src.bench.vsd_signal                         # latest checkpoint in checkpoints/
    python -m src.bench.vsd_signal --checkpoint checkpoints/step-000600 --out reports/distill/signal

For the student and LoRA teacher saved in a checkpoint, on the first eval prompts with their
seeds, and for several fixed t:
- the epsilon-prediction error of the frozen teacher and of the LoRA teacher on the student's
  own samples (the LoRA teacher models the student, so it should be the lower of the two) and
  on the teacher's 25-step samples from the same noise (there the frozen teacher should win);
- the norm of the VSD gradient (1 - abar_t)(eps_teacher - eps_lora) with CFG, and its cosine
  with x0_student - x0_teacher25: how much of the push points at the teacher's own image.
Not part of the pipeline; it explains where the student's signal comes from. ~20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from ..core import checkpoint
from ..core.config import load_config
from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from ..core.prompts import read_prepared
from ..method.adapters import adapters
from ..method.conditioning import encode, encode_empty
from ..method.onestep import initial_latents, student_x0
from ..method.teacher import alphas_cumprod, load_pipeline
from ..method.vsd import VSDLoss, add_noise, eps_from_output, guided_eps, vsd_grad

TIMESTEPS = (50, 150, 300, 500, 700, 900, 980)


@torch.no_grad()
def signal(folder: Path, params: Path = Path("params.yaml"), n_prompts: int = 64, teacher_steps: int = 25,
           timesteps: tuple[int, ...] = TIMESTEPS, seed: int = 0) -> list[dict]:
    from peft import LoraConfig

    checkpoint.verify(folder)
    cfg = load_config(params).distill
    pipe = load_pipeline(cfg.teacher)
    abar = alphas_cumprod(pipe)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    student = copy.deepcopy(pipe.unet).eval()
    student.load_state_dict(torch.load(folder / "student.pt", map_location="cpu", weights_only=True))
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets)))
    missing = unet.load_state_dict(torch.load(folder / "lora.pt", map_location="cpu", weights_only=True), strict=False)
    if missing.unexpected_keys:
        raise UserError(f"{folder}/lora.pt does not fit the LoRA of params.yaml (distill.lora_*): "
                        f"{missing.unexpected_keys[:3]}")
    records = read_prepared(Path("prompts/eval.jsonl"), n_prompts)
    prompts = [r["prompt"] for r in records]
    z = initial_latents([r["seed"] for r in records], (unet.config.in_channels,) + (unet.config.sample_size,) * 2)
    cond, uncond = encode(pipe, prompts), encode_empty(pipe)
    x_student = student_x0(student, z, cond, abar, prediction, cfg.student_timestep)
    with adapters(unet, enabled=False):
        x_teacher = pipe(prompts, num_inference_steps=teacher_steps, guidance_scale=cfg.guidance_scale,
                         latents=z.clone(), output_type="latent").images
    lora_scale = VSDLoss(cfg.guidance_scale, lora_guidance_scale=cfg.lora_guidance_scale).lora_scale
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t in timesteps:
        tt = torch.full((len(prompts),), t)
        a = abar[tt]
        row: dict = {"t": t, "abar_t": round(float(a[0]), 5)}
        for name, x in (("student", x_student), ("teacher25", x_teacher)):
            eps = torch.randn(x.shape, generator=gen)
            x_t = add_noise(x, eps, a)
            for who, enabled in (("teacher", False), ("lora", True)):
                with adapters(unet, enabled=enabled):
                    out = unet(x_t, tt, **cond.unet_kwargs()).sample
                    row[f"err_{who}_on_{name}"] = float(((eps_from_output(x_t, out, a, prediction) - eps) ** 2).mean())
        x_t = add_noise(x_student, torch.randn(x_student.shape, generator=gen), a)
        with adapters(unet, enabled=False):
            e_t = guided_eps(unet, x_t, tt, a, cond, uncond, cfg.guidance_scale, prediction)
        with adapters(unet, enabled=True):
            e_l = guided_eps(unet, x_t, tt, a, cond, uncond, lora_scale, prediction)
        grad = vsd_grad(e_t, e_l, a).flatten(1)
        row["vsd_grad_norm"] = float(grad.norm(dim=1).mean())
        row["cos_grad_vs_teacher_image"] = float(torch.nn.functional.cosine_similarity(
            grad, (x_student - x_teacher).flatten(1)).mean())
        rows.append(row)
    return rows


def report(rows: list[dict], folder: Path) -> str:
    lines = [f"# VSD signal of `{folder}`", "",
             "`python -m src.bench.vsd_signal`. Epsilon MSE of the frozen teacher / LoRA teacher on the student's "
             "samples and on the teacher's 25-step samples (same noise), the VSD gradient's norm and its cosine "
             "with x0_student - x0_teacher25.", "",
             "| t | abar_t | teacher on student | LoRA on student | teacher on teacher25 | LoRA on teacher25 "
             "| VSD grad norm | cos(grad, student - teacher25) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['t']} | {r['abar_t']} | {r['err_teacher_on_student']:.4f} | {r['err_lora_on_student']:.4f} "
                     f"| {r['err_teacher_on_teacher25']:.4f} | {r['err_lora_on_teacher25']:.4f} "
                     f"| {r['vsd_grad_norm']:.2f} | {r['cos_grad_vs_teacher_image']:.2f} |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="a step-NNNNNN folder (default: latest in checkpoints/)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("reports/distill/signal"))
    args = parser.parse_args(argv)
    folder = args.checkpoint
    if folder is None:
        found = checkpoint.complete(Path("checkpoints"))
        if not found:
            raise UserError("no checkpoint in checkpoints/: run `dvc repro distill` first or pass --checkpoint")
        folder = found[-1]
    rows = signal(folder, args.params, args.prompts)
    write_json(args.out.with_suffix(".json"), {"checkpoint": str(folder), "rows": rows})
    with atomic_file(args.out.with_suffix(".md")) as f:
        f.write(report(rows, folder))
    print(report(rows, folder))


if __name__ == "__main__":
    run_cli(main)
