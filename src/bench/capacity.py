"""Diagnostic: can the student network hold a good one-step map at all (outside the method)?

    python -m src.bench.capacity                    # 3,072 pairs, 1,200 steps; reports/distill/capacity.json

Regresses a copy of the teacher UNet, used as a one-step student (noise at t = T-1 -> x0),
directly onto the teacher's own N-step DDIM + CFG latents from the same noise, and judges
one-step samples of the eval prompts every 200 steps. If this reaches a high accuracy while
VSD plateaus, the limit is the VSD signal, not the network's capacity. Not SwiftBrush (it
needs teacher samples); it only answers the capacity question. About 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import run_cli
from ..core.fileio import write_json
from ..core.prompts import read_prepared
from ..method.conditioning import encode
from ..method.onestep import initial_latents, student_x0
from ..method.teacher import alphas_cumprod, load_pipeline


def capacity(teacher: str, n_pairs: int = 3072, steps: int = 1200, batch: int = 32, lr: float = 1e-4,
             teacher_steps: int = 25, guidance: float = 4.5, val_prompts: int = 64, seed: int = 0) -> list[dict]:
    from ..distill import validate

    torch.manual_seed(seed)
    pipe = load_pipeline(teacher)
    abar = alphas_cumprod(pipe)
    train = read_prepared("prompts/train.jsonl", n_pairs)
    prompts, seeds = [r["prompt"] for r in train], [int(r["seed"]) for r in train]
    shape = (pipe.unet.config.in_channels,) + (pipe.unet.config.sample_size,) * 2
    with torch.no_grad():
        targets = torch.cat([pipe(prompts[i:i + 256], num_inference_steps=teacher_steps, guidance_scale=guidance,
                                  latents=initial_latents(seeds[i:i + 256], shape), output_type="latent").images
                             for i in tqdm(range(0, len(prompts), 256), desc="teacher targets")])
    student = copy.deepcopy(pipe.unet).train().requires_grad_(True)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    val = read_prepared("prompts/eval.jsonl", val_prompts)
    rng = np.random.default_rng(seed)
    curve = []
    for step in tqdm(range(1, steps + 1), desc="regression"):
        idx = rng.choice(len(prompts), batch, replace=False)
        cond = encode(pipe, [prompts[i] for i in idx])
        x0 = student_x0(student, initial_latents([seeds[i] for i in idx], shape), cond, abar)
        loss = torch.nn.functional.mse_loss(x0, targets[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps:
            v = validate(pipe, student, val, abar)
            curve.append({"step": step, "x0_mse": round(loss.item(), 4),
                          "attribute_accuracy": round(v["attribute_accuracy"], 3)})
            print(curve[-1], flush=True)
    return curve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="models/teacher")
    parser.add_argument("--pairs", type=int, default=3072)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--out", type=Path, default=Path("reports/distill/capacity.json"))
    args = parser.parse_args(argv)
    curve = capacity(args.teacher, args.pairs, args.steps)
    write_json(args.out, {"pairs": args.pairs, "steps": args.steps, "curve": curve})


if __name__ == "__main__":
    run_cli(main)
