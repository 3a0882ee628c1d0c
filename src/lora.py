"""The student as a LoRA of its teacher, in diffusers' and kohya's formats.

    python -m src.lora --student models/student --teacher models/teacher --rank 64 --out models/student_lora

A one-step student differs from its teacher only in its UNet. Each Linear and Conv2d weight's difference
dW = W_student - W_teacher, seen as an (out, in * kh * kw) matrix, is replaced by its best rank-r
approximation (truncated SVD, Eckart-Young: no rank-r matrix is closer in Frobenius norm): dW ~ up @ down
with up = U_r sqrt(S_r) (a 1x1 convolution for a Conv2d) and down = sqrt(S_r) V_r^T (the layer's own
kernel, stride and padding), r = min(--rank, out, in * kh * kw), alpha = r (scale 1). What a LoRA cannot
carry is left as the teacher's: the students' bias and normalisation changes (`metrics.json` reports how
large they are, and how much of the weight change each rank keeps).

The folder written:

    pytorch_lora_weights.safetensors   diffusers / PEFT keys under `unet.` with the per-module ranks in its
                                       metadata: pipe.load_lora_weights(folder)
    <name>_kohya.safetensors           kohya's key names (lora_unet_..., lora_down / lora_up, .alpha per
                                       module), the format ComfyUI and AUTOMATIC1111 load
    README.md                          the stock diffusers call that draws the student with it
    metrics.json                       ranks, kept energy, what was left out

With a LoRA student (`distill.student: lora`) `distill` writes the same folder from its adapter (exact:
nothing to approximate) as `lora/` inside the student.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .artifact.lora import extract, write
from .core.errors import UserError, run_cli


def load_unet(folder: Path, what: str):
    from diffusers import UNet2DConditionModel

    if not (folder / "unet" / "config.json").is_file():
        raise UserError(f"lora: --{what} {folder}: not a diffusers pipeline folder (no unet/config.json)")
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)


def student_of(folder: Path) -> tuple[str, list[int]]:
    """(pipeline class, timesteps) of a student folder distill wrote: [t_s], or an N-step student's N."""
    marker = folder / "swiftbrush.json"
    if not marker.is_file():
        raise UserError(f"lora: --student {folder}: not a one-step student (no swiftbrush.json; `distill` writes it)")
    index = json.loads((folder / "model_index.json").read_text())
    made = json.loads(marker.read_text())
    return index["_class_name"], [int(t) for t in made.get("timesteps", [made["timestep"]])]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=Path("models/student"), help="the student pipeline folder")
    parser.add_argument("--teacher", type=Path, default=Path("models/teacher"), help="its teacher's pipeline folder")
    parser.add_argument("--rank", type=int, default=64, help="the LoRA's rank (default 64; reports/lora/README.md)")
    parser.add_argument("--out", type=Path, default=Path("models/student_lora"), help="the LoRA folder to write")
    args = parser.parse_args(argv)
    pipeline_class, timesteps = student_of(args.student)
    lora = extract(load_unet(args.student, "student"), load_unet(args.teacher, "teacher"), args.rank)
    m = write(args.out, lora, pipeline_class, timesteps, args.out.name,
              {"rank": args.rank, "student": str(args.student), "teacher": str(args.teacher)})
    print(f"lora: rank {args.rank} over {m['modules']} modules keeps {100 * m['kept_energy']:.2f}% of the weight "
          f"change ({m['parameters']:,} parameters); biases and norms left out: {100 * m['left_out_relative']:.2f}% "
          f"of the change; {args.out} written")


if __name__ == "__main__":
    run_cli(main)
