"""Full-size profile: the Stable Diffusion 2.1-base architecture from its config, random weights.

    python -m src.bench.gpu_profile                  # on a GPU: 512 px, batch 16, bf16; writes reports/gpu/
    python -m src.bench.gpu_profile --scale tiny     # the same code at toy size on CPU (CI runs this)

Measures, nothing downloaded:
- the SwiftBrush training step (student forward -> VSD loss with CFG on the frozen teacher and
  the LoRA teacher -> student update -> LoRA-teacher update), with the project's own VSDLoss and
  LoRALoss, bf16 autocast, gradient checkpointing off and on: seconds per step and peak memory;
- one-step generation (text encoder -> UNet at T-1 -> x0 -> VAE decode): latency at batch 1
  and images/s at batch 16.
Targets (docs/design.md, "Speed facts"): a VSD step at batch 16 under 0.5 s on one H100; one-step
512 px latency under 30 ms at batch 1.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from ..core.errors import run_cli
from ..core.fileio import atomic_file, write_json

# Stable Diffusion 2.1-base (stabilityai/stable-diffusion-2-1-base), from its config files.
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
TINY_UNET = dict(SD21_UNET, sample_size=8, layers_per_block=1, block_out_channels=(32, 32, 64, 64),
                 attention_head_dim=(2, 2, 4, 4), cross_attention_dim=32, norm_num_groups=8)
TINY_TEXT = dict(SD21_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=32)
TINY_VAE = dict(SD21_VAE, layers_per_block=1, block_out_channels=(8, 8, 16, 16), norm_num_groups=8, sample_size=64)


def build(scale: str, device: torch.device):
    """(text encoder, UNet, VAE) with random weights, SD 2.1-base or tiny."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    full = scale == "sd21-base"
    text = CLIPTextModel(CLIPTextConfig(**(SD21_TEXT if full else TINY_TEXT))).to(device).eval()
    unet = UNet2DConditionModel(**(SD21_UNET if full else TINY_UNET)).to(device)
    vae = AutoencoderKL(**(SD21_VAE if full else TINY_VAE)).to(device).eval()
    return text, unet, vae


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def vsd_step_time(text, unet, batch: int, dtype: torch.dtype, checkpointing: bool, steps: int,
                  device: torch.device) -> dict:
    """Median seconds per SwiftBrush step and peak memory (the loop of src/distill.py, without I/O)."""
    from peft import LoraConfig

    from ..method.onestep import student_x0
    from ..method.vsd import LoRALoss, VSDLoss

    teacher = copy.deepcopy(unet).requires_grad_(False)
    teacher.add_adapter(LoraConfig(r=64, lora_alpha=108, target_modules=["to_q", "to_v"]))
    lora = [p for n, p in teacher.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    student = copy.deepcopy(unet).train().requires_grad_(True)
    if checkpointing:
        student.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    opt_s, opt_l = torch.optim.Adam(student.parameters(), lr=1e-6), torch.optim.Adam(lora, lr=1e-3)
    vsd, lora_loss = VSDLoss(), LoRALoss()
    abar = sd_alphas_cumprod(device)
    ids = torch.randint(0, text.config.vocab_size, (batch, 77), device=device)
    with torch.no_grad():
        cond = text(ids)[0]
        uncond = text(ids[:1])[0]
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    gen = torch.Generator().manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 2):                      # 2 warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            x0 = student_x0(student, torch.randn(shape, device=device), cond, abar)
            loss, _ = vsd(teacher, x0, cond, uncond, abar, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)
        with autocast:
            loss_l, _ = lora_loss(teacher, x0.detach(), cond, uncond, abar, gen)
        loss_l.backward()
        torch.nn.utils.clip_grad_norm_(lora, 1.0)
        opt_l.step()
        opt_l.zero_grad(set_to_none=True)
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"s_per_step": round(times[len(times) // 2], 4), "peak_memory_gb": _peak_gb(device),
            "batch": batch, "dtype": str(dtype).replace("torch.", ""), "gradient_checkpointing": checkpointing}


def sd_alphas_cumprod(device: torch.device) -> torch.Tensor:
    """SD's scaled-linear 1000-step schedule (the teacher's own scheduler config in the real pipeline)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.to(device)


@torch.no_grad()
def one_step_time(text, unet, vae, batch: int, dtype: torch.dtype, repeats: int, device: torch.device) -> dict:
    """Latency of one-step generation (text -> UNet at T-1 -> x0 -> VAE decode) in `dtype`."""
    from ..method.onestep import decode, student_x0

    text_d, unet_d, vae_d = (copy.deepcopy(m).to(dtype).eval() for m in (text, unet, vae))
    abar = sd_alphas_cumprod(device)
    ids = torch.randint(0, text.config.vocab_size, (batch, 77), device=device)
    shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def run():
        x0 = student_x0(unet_d, torch.randn(shape, device=device, dtype=dtype), text_d(ids)[0], abar)
        return decode(vae_d, x0.to(dtype))

    times = []
    for i in range(repeats + 3):
        _sync(device)
        t0 = time.perf_counter()
        image = run()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    times.sort()
    t = times[len(times) // 2]
    return {"batch": batch, "latency_s": round(t, 5), "images_per_s": round(batch / t, 2),
            "image_size": list(image.shape[-2:]), "dtype": str(dtype).replace("torch.", "")}


def profile(scale: str, batch: int, steps: int, repeats: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    text, unet, vae = build(scale, device)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU", "scale": scale,
           "torch": torch.__version__, "vsd_step": [], "one_step": []}
    for ckpt in (False, True):
        try:
            out["vsd_step"].append(vsd_step_time(text, unet, batch, dtype, ckpt, steps, device))
        except torch.OutOfMemoryError:
            out["vsd_step"].append({"gradient_checkpointing": ckpt, "batch": batch, "error": "out of memory"})
            torch.cuda.empty_cache()
    for b in (1, batch):
        out["one_step"].append(one_step_time(text, unet, vae, b, torch.float16 if device.type == "cuda"
                                             else torch.float32, repeats, device))
    return out


def report(p: dict) -> str:
    lines = [f"# Full-size profile: {p['scale']} on {p['device']}", "",
             "`python -m src.bench.gpu_profile`, random weights built from the SD 2.1-base configs "
             f"(torch {p['torch']}).", "", "| SwiftBrush step | batch | s / step | peak memory (GB) |", "|---|---|---|---|"]
    for r in p["vsd_step"]:
        name = f"{r.get('dtype', '')}, checkpointing {'on' if r['gradient_checkpointing'] else 'off'}"
        lines.append(f"| {name} | {r['batch']} | {r.get('s_per_step', r.get('error'))} | {r.get('peak_memory_gb')} |")
    lines += ["", "| one-step generation | batch | latency (s) | images / s | size |", "|---|---|---|---|---|"]
    for r in p["one_step"]:
        lines.append(f"| {r['dtype']} | {r['batch']} | {r['latency_s']} | {r['images_per_s']} | "
                     f"{r['image_size'][0]} px |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["sd21-base", "tiny"], default="sd21-base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("reports/gpu"))
    args = parser.parse_args(argv)
    p = profile(args.scale, args.batch, args.steps, args.repeats)
    write_json(args.out / "profile.json", p)
    with atomic_file(args.out / "README.md") as f:
        f.write(report(p))
    print(report(p))
    print(json.dumps(p))


if __name__ == "__main__":
    run_cli(main)
