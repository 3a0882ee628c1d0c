"""The artifact's model card (README.md of models/onnx): files, I/O contract, how it was made, parity."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.config import ExportConfig


def fusion_note(m: dict) -> str:
    applied = ", ".join(f"{k} x{v}" for k, v in m.get("fusions", {}).items()) or "none matched"
    if m.get("fuse") == "cuda":
        return ("The fp16 graph carries ONNX Runtime's Stable Diffusion fusions (" + applied + "): it runs on the "
                "CUDA provider only, where its parity was measured. The fp32 graph is the portable one.")
    if m.get("fuse") == "ort":
        return ("Both graphs carry ONNX Runtime's contrib attention operators (" + applied + "), which have CPU\n"
                "and CUDA kernels: they need ONNX Runtime, on either provider.")
    return ("Neither graph uses ONNX Runtime's fused Stable Diffusion operators, so both run on the CPU\n"
            "provider as well as CUDA (fp16 is meant for GPUs; on CPU ONNX Runtime runs its half ops through casts).")


def model_card(student: Path, c: dict, m: dict, cfg: ExportConfig) -> str:
    made = json.loads((student / "swiftbrush.json").read_text()) if (student / "swiftbrush.json").is_file() else {}
    shape = "x".join(map(str, c["latent_shape"]))
    n = c.get("steps", 1)
    head, per_image = ("One-step", "One network evaluation") if n == 1 else (f"{n}-step", f"{n} UNet evaluations")
    return f"""# {head} SwiftBrush student (ONNX)

A text-to-image generator distilled from a Stable-Diffusion-style teacher with SwiftBrush
(variational score distillation, no training images). {per_image} per image.

| file | what |
|---|---|
| `fp32/model.onnx` | the whole generator in float32 ({m['size_mb_fp32']} MB) |
| `fp16/model.onnx` | the same in float16 inside, float32 inputs/outputs ({m['size_mb_fp16']} MB) |
| `tokenizer.json` | the teacher's tokenizer (Hugging Face `tokenizers` format) |
| `onestep.json` | the I/O contract below, machine-readable |
| `manifest.json` | SHA-256 and size of every file, and the artifact's version; readers verify it before loading |

## I/O contract

| name | type | shape | meaning |
|---|---|---|---|
| `input_ids` | int64 | (batch, {c['max_length']}) | token ids: BOS ({c['bos_id']}), prompt, EOS ({c['eos_id']}), padded with {c['pad_id']}; longer prompts are cut to {c['max_length']} (EOS kept last) |
{second_input(c)}| `noise` | float32 | (batch, {shape}) | {noise_meaning(c)}, standard normal; `numpy.random.default_rng(seed).standard_normal(({', '.join(map(str, c['latent_shape']))}), dtype=numpy.float32)` per image |
| `images` | float32 | (batch, 3, H, W) | RGB in [0, 1] |

Inside: text encoder -> {inside(c)} ({c['prediction_type']} prediction) -> clean
latent x0 -> {'the tiny decoder (TAESD format)' if c['decoder'] == 'AutoencoderTiny' else 'VAE'} decode. No guidance at inference (the student learned the guided teacher).
{fusion_note(m)}

## How it was made

`python -m src.export` from the diffusers pipeline in `{student}` ({json.dumps(made) if made else 'student pipeline'});
decoder {c['decoder']}; ONNX opset {cfg.opset}, {cfg.exporter} exporter; fp16 by ONNX Runtime's float16 converter with float32 I/O.

Parity with the PyTorch student on {m['parity_prompts']} eval prompts and their seeds (images in [0, 1]):

| artifact | PSNR (dB) | max abs error |
|---|---|---|
| fp32 | {m['psnr_fp32']} | {m['max_abs_err_fp32']:.2e} |
| fp16 | {m['psnr_fp16']} | {m['max_abs_err_fp16']:.2e} |

## Run it

    python -m src.infer "a red circle at the top on a blue background" --seed 0 --out cat.png
    python -m src.infer --prompts-file prompts.txt --seed 0 --out images/ --precision fp16 --provider cuda

The PyTorch student it was exported from (`{student}`) draws the same images with stock diffusers:

{stock_calls("StableDiffusionXLPipeline" if c.get("family") == "sdxl" else "StableDiffusionPipeline",
             str(student), c.get("timesteps", [c["timestep"]]))}
"""


def noise_meaning(c: dict) -> str:
    """What the noise input holds: the initial latent, or an N-step student's N latents of noise."""
    if c.get("steps", 1) == 1:
        return "initial latent"
    per = c["latent_shape"][0] // c["steps"]
    return f"the initial latent (channels 0-{per - 1}), then the noise each later step adds ({per} channels each)"


def inside(c: dict) -> str:
    """The student's part of the graph, as the card's 'Inside' line names it."""
    if c.get("steps", 1) == 1:
        return f"student UNet at t = {c['timestep']}"
    return (f"student UNet at t = {', '.join(map(str, c['timesteps']))} (each step's clean latent noised again to "
            f"the next timestep)")


def second_input(c: dict) -> str:
    """The SDXL graph's second token-id input, as a row of the card's I/O table (nothing for SD)."""
    t = c.get("tokenizer_2")
    if t is None:
        return ""
    return (f"| `input_ids_2` | int64 | (batch, {t['max_length']}) | the same prompt by `tokenizer_2.json`: BOS "
            f"({t['bos_id']}), prompt, EOS ({t['eos_id']}), padded with {t['pad_id']}; the pooled embedding and the "
            f"time ids ({c['resolution']} px) are computed inside |\n")


def stock_calls(pipeline_class: str, folder: str, timesteps: list[int]) -> str:
    """The stock diffusers calls that draw a student folder (for its card and the ONNX card): one step, or an
    N-step student's LCM call."""
    if len(timesteps) > 1:
        return f"""```python
import torch
from diffusers import LCMScheduler, {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{folder}", torch_dtype=torch.float16).to("cuda")
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
image = pipe(prompt, num_inference_steps={len(timesteps)}, timesteps={timesteps}, guidance_scale=0).images[0]
```

LCM's scheduler does what the student was trained for: each step's clean-image estimate is noised again
to the next timestep with fresh noise, and the last step returns its estimate. With the same initial
latent and the same added noise it draws the image `python -m src.infer` draws (within 1/255 in
float32; tested); diffusers draws the added noise from its own generator, so a seed gives another
picture than `src.infer`'s. Guidance is off (`guidance_scale` 0): the student learned the guided teacher.
The folder's own scheduler takes the first step only: `pipe(prompt, num_inference_steps=1,
guidance_scale=1.0)` draws this student's one-step image."""
    timestep = timesteps[0]
    return f"""```python
import torch
from diffusers import LCMScheduler, {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{folder}", torch_dtype=torch.float16).to("cuda")

# as saved: one DDIM step at t = {timestep} that returns the UNet's clean-image estimate
image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

# or with LCM's scheduler, as one-step LoRAs are called: its last step returns the same estimate
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
image = pipe(prompt, num_inference_steps=1, timesteps=[{timestep}], guidance_scale=0).images[0]
```

Both draw the image `python -m src.infer` draws for the same initial latent (within 1/255 in
float32; tested). Guidance is off in both (`guidance_scale` 1.0 or 0): the student learned the
guided teacher, and a second, unconditional pass would only cost time."""


def student_card(pipeline_class: str, timesteps: list[int], made: dict) -> str:
    """README.md of a student pipeline folder: what it is and the stock calls that draw it."""
    if len(timesteps) > 1:
        head, what = f"{len(timesteps)}-step", f"{len(timesteps)} UNet evaluations per image, at timesteps {timesteps}"
    else:
        head, what = "One-step", f"one UNet evaluation per image, at timestep {timesteps[0]}"
    return f"""# {head} SwiftBrush student ({pipeline_class})

A text-to-image generator distilled from a Stable-Diffusion-style teacher with SwiftBrush (variational
score distillation, no training images): {what}.
The other parts (text encoder(s), VAE, tokenizer(s)) are the teacher's, unchanged.

## Draw it with stock diffusers

{stock_calls(pipeline_class, "path/to/this/folder", timesteps)}

The ONNX artifact of this student (`python -m src.export`) runs the same generator without PyTorch.

## How it was made

`python -m src.distill`; `swiftbrush.json` records {json.dumps(made)}.
"""
