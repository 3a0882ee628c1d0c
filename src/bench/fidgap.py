"""Where the one-step student's FID gap comes from: small measurements on the default student, no training.

    python -m src.bench.fidgap            # -> reports/distill/fidgap.md (+ fidgap.json)

Needs `dvc repro evaluate` (the student's, the teacher's and the renders' images in eval_images/) and the
default run's last checkpoint in checkpoints/ (its LoRA teacher). Four suspects, each measured:

1. the decoder: the VAE's round trip of the ground-truth renders (encode, decode), scored like a generator;
2. the latent itself: how much of each latent's energy sits at high spatial frequencies, for the student's
   x0, the teacher's 25-step latent and the renders' own latents;
3. the one-step estimate: the student's latent noised to t = 79 and finished by the teacher's last two DDIM
   steps with CFG (SDEdit); what few-step students aim at;
4. the training signal: the high-frequency share of the VSD gradient and of the CLIP loss's gradient (back
   through the decoder) on the student's x0, on a batch of training prompts.

Pixel edge energy is the mean absolute difference of neighbouring pixels (rows plus columns, 0-255 scale).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..core.config import load_config
from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from ..core.prompts import read_prepared
from .common import machine

OUT = Path("reports/distill")
IMAGES = Path("eval_images")


def edge_energy(images: np.ndarray) -> float:
    """Mean |difference| of vertically plus horizontally neighbouring pixels, uint8 (N, H, W, 3) images."""
    x = images.astype(np.float32)
    return float(np.abs(np.diff(x, axis=1)).mean() + np.abs(np.diff(x, axis=2)).mean())


def high_frequency_share(x: torch.Tensor, cutoff: float = 0.25) -> float:
    """Share of the spatial power of (B, C, h, w) above `cutoff` cycles per latent pixel (Nyquist: 0.5), the
    per-sample mean removed."""
    x = x.float() - x.float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs() ** 2
    fy = torch.fft.fftfreq(x.shape[-2]).abs().reshape(-1, 1)
    fx = torch.fft.fftfreq(x.shape[-1]).abs().reshape(1, -1)
    high = (fy ** 2 + fx ** 2).sqrt() > cutoff
    return float(power[..., high].sum() / power.sum().clamp_min(1e-20))


def folder_images(name: str, records: list[dict]) -> np.ndarray:
    from ..evaluate import load_folder

    folder = IMAGES / name
    if not folder.is_dir():
        raise UserError(f"{folder}: missing (run `dvc repro evaluate` first)")
    return load_folder(folder, records)


def features_of(images: np.ndarray, clip, tmp: Path) -> np.ndarray:
    """The evaluator's features of uint8 images (written as PNG first, as evaluate reads its folders)."""
    from PIL import Image

    from ..scoring.metrics import world_features

    tmp.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(images):
        files.append(tmp / f"{i:06d}.png")
        Image.fromarray(img).save(files[-1])
    return world_features(files, clip)


def fid(feats: np.ndarray, ref: np.ndarray) -> float:
    from ..scoring.metrics import feature_stats, frechet

    return frechet(feature_stats(feats), feature_stats(ref))


@torch.no_grad()
def latents(config, records: list[dict]) -> dict[str, torch.Tensor]:
    """Clean latents of the renders (VAE encoder mean), the teacher (25 DDIM steps + CFG) and the student, and
    the student's SDEdit clean-up (noised to t = 79, the teacher's DDIM steps 79 and 39 with CFG)."""
    from ..evaluate import load_folder
    from ..method.conditioning import encode, encode_empty
    from ..method.noise import initial_noise
    from ..method.onestep import student_sample, student_timesteps, steps_of, timestep_of
    from ..method.teacher import alphas_cumprod, load_pipeline

    teacher = load_pipeline(config.distill.teacher)
    student = load_pipeline("models/student")
    abar = alphas_cumprod(teacher)
    side = student.unet.config.sample_size
    shape = (student.unet.config.in_channels, side, side)
    prompts, seeds = [r["prompt"] for r in records], [r["seed"] for r in records]
    renders = torch.from_numpy(load_folder(IMAGES / "reference", records)).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = {"renders": teacher.vae.encode(renders).latent_dist.mean * teacher.vae.config.scaling_factor}
    text = encode(teacher, prompts, "cpu", side)
    uncond = encode_empty(teacher, "cpu", side).expand(len(prompts))
    z = torch.from_numpy(initial_noise(seeds, shape))
    g = config.evaluate.guidance_scale
    teacher.set_progress_bar_config(disable=True)
    out["teacher"] = torch.cat([teacher(prompts[i:i + 64], num_inference_steps=config.evaluate.teacher_steps,
                                        guidance_scale=g, output_type="latent", latents=z[i:i + 64]).images
                                for i in range(0, len(prompts), 64)])

    def guided(x, t):
        both = uncond.cat(text)
        eps_u, eps_c = teacher.unet(torch.cat([x, x]), torch.full((2 * len(x),), t), **both.unet_kwargs()).sample \
            .chunk(2)
        return eps_u + g * (eps_c - eps_u)

    timesteps = student_timesteps(timestep_of(student), steps_of(student))
    c = shape[0] * len(timesteps)
    noise = torch.from_numpy(initial_noise(seeds, (c, side, side)))
    out["student"] = student_sample(student.unet, noise, text, abar, "epsilon", timesteps)
    fresh = torch.from_numpy(initial_noise([s + 1_000_003 for s in seeds], shape))
    x = abar[79].sqrt() * out["student"] + (1 - abar[79]).sqrt() * fresh
    for t, prev in ((79, 39), (39, -1)):
        eps = guided(x, t)
        x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
        a_prev = abar[prev] if prev >= 0 else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    out["student + 2 teacher steps"] = x
    out["_vae"] = teacher.vae
    return out


def gradient_shares(config, batches: int = 4) -> dict[str, float]:
    """High-frequency share and norm of the VSD and the CLIP-loss gradients on the default student's x0, with
    its trained LoRA teacher (the last checkpoint in checkpoints/), on training prompts."""
    from ..core import checkpoint
    from ..distill import Paths, setup, step_draws
    from ..method.conditioning import encode
    from ..method.onestep import decode, student_x0
    from ..method.teacher import load_pipeline

    found = checkpoint.latest(Path("checkpoints"))
    if not found:
        raise UserError("checkpoints/: no checkpoint of the default run (run `dvc repro distill` first)")
    tiny = Path(config.tiny_decoder) if config.tiny_decoder else None
    run = setup(config.distill, config.lr, config.seed, Paths(tiny_decoder=tiny))
    run.teacher.load_state_dict(torch.load(found[0] / "lora.pt", map_location="cpu", weights_only=True), strict=False)
    run.student.load_state_dict(load_pipeline("models/student").unet.state_dict())
    rows: dict[str, list[float]] = {"vsd_share": [], "clip_share": [], "vsd_norm": [], "clip_norm": []}
    for b in range(batches):
        gen, idx, z = step_draws(run, config.distill, config.seed, 10_000 + b)
        prompts = [run.prompts[i] for i in idx]
        cond = encode(run.pipe, prompts, "cpu", run.shape[-1]).float()
        for name in ("vsd", "clip"):
            x0 = student_x0(run.student, z, cond, run.abar, run.prediction, run.t_student).detach().requires_grad_()
            if name == "vsd":
                loss, _ = run.student_loss(run.teacher, x0, cond, run.uncond, run.abar,
                                           torch.Generator().manual_seed(b))
            else:
                loss, _ = run.clip_loss(decode(run.clip_decoder, x0), run.clip_loss.text_features(prompts))
                loss = loss * config.distill.clip_weight
            loss.backward()
            rows[f"{name}_share"].append(high_frequency_share(x0.grad))
            rows[f"{name}_norm"].append(float(x0.grad.norm()))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def measure(limit: int) -> dict:
    from ..method.onestep import decode
    from ..evaluate import image_path
    from ..scoring.metrics import load_clip, world_features
    from ..world import read_scene, score

    config = load_config()
    records = read_prepared(Path("prompts/eval.jsonl"), limit)
    clip = load_clip(config.evaluate.evaluator).model
    ref_files = [image_path(IMAGES / "reference", r) for r in records]
    ref = world_features(ref_files, clip)
    lat = latents(config, records)
    vae = lat.pop("_vae")
    with torch.no_grad():
        decoded = {name: (decode(vae, x) * 255).round().byte().permute(0, 2, 3, 1).numpy()
                   for name, x in lat.items()}
    rows, feats = {}, {}
    work = Path("quality_work") / "fidgap"
    for name in ("renders", "teacher", "student", "student + 2 teacher steps"):
        label = "renders through the VAE" if name == "renders" else name
        feats[name] = features_of(decoded[name], clip, work / name.replace(" ", "_").replace("+", "p"))
        rows[label] = {"fid": fid(feats[name], ref), "edge": edge_energy(decoded[name]),
                       "latent_high_share": high_frequency_share(lat[name])}
    rows["renders"] = {"fid": 0.0, "edge": edge_energy(folder_images("reference", records))}
    right = {name: np.array([score(read_scene(im), r["attributes"])["all"] for im, r in zip(decoded[name], records)])
             for name in ("teacher", "student")}
    both = right["teacher"] & right["student"]
    content = {"prompts_both_right": int(both.sum()), "student_wrong": int((~right["student"]).sum()),
               "teacher_wrong": int((~right["teacher"]).sum()),
               "fid_both_right": {n: fid(feats[n][both], ref[both]) for n in ("teacher", "student")}}
    return {"machine": machine(), "prompts": len(records), "rows": rows, "content": content,
            "gradients": gradient_shares(config)}


def report(m: dict) -> str:
    g = m["gradients"]
    lines = ["# Where the one-step student's FID gap comes from", "",
             f"Machine: {m['machine']}. `python -m src.bench.fidgap` on the default student (models/student) and "
             f"its teacher, the first {m['prompts']} eval prompts and their seeds; FID with the evaluator's features "
             "against the ground-truth renders, as `evaluate` computes it. Edge energy: mean absolute difference of "
             "neighbouring pixels (rows plus columns, 0-255). Latent high-frequency share: the part of a latent's "
             "spatial power above 0.25 cycles per latent pixel.", "",
             "| images | FID | edge energy | latent high-frequency share |", "|---|---|---|---|"]
    for name, r in m["rows"].items():
        share = f"{r['latent_high_share']:.3f}" if "latent_high_share" in r else "-"
        lines.append(f"| {name} | {r['fid']:.3f} | {r['edge']:.2f} | {share} |")
    c = m["content"]
    lines += ["", f"On the {c['prompts_both_right']} prompts where the judge reads both the teacher's and the student's "
              f"image right (the student is wrong on {c['student_wrong']}, the teacher on {c['teacher_wrong']}): FID "
              f"{c['fid_both_right']['teacher']:.3f} for the teacher and {c['fid_both_right']['student']:.3f} for the "
              "student."]
    lines += ["", "The gradients on the student's x0 (4 batches of 16 training prompts; the CLIP loss at its "
              "weight in params.yaml):", "",
              "| gradient | norm | high-frequency share |", "|---|---|---|",
              f"| VSD | {g['vsd_norm']:.2e} | {g['vsd_share']:.3f} |",
              f"| CLIP loss, through the VAE decoder | {g['clip_norm']:.2e} | {g['clip_share']:.3f} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=500, help="eval prompts used")
    parser.add_argument("--report-only", action="store_true", help="rewrite fidgap.md from fidgap.json")
    args = parser.parse_args(argv)
    if args.report_only:
        m = json.loads((OUT / "fidgap.json").read_text())
    else:
        m = measure(args.limit)
        write_json(OUT / "fidgap.json", m)
    with atomic_file(OUT / "fidgap.md") as f:
        f.write(report(m))
    print(report(m))


if __name__ == "__main__":
    run_cli(main)
