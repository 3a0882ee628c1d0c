"""The export stage: the one-step student as ONNX graphs (fp32 and fp16), checked for parity.

    python -m src.export            # as the DVC stage `export` runs it

One graph per precision, the whole generator (docs/design.md, "Export contract"):

    input_ids  int64   (batch, max_length)   token ids, padded (see tokenizer contract below)
    noise      float32 (batch, C, h, w)      initial latent, N(0, I); src/method/noise.py for seeds
      -> text encoder -> student UNet at its timestep t_s -> x0 -> decoder ->
    images     float32 (batch, 3, H, W)      in [0, 1]

Inputs and outputs stay float32 in the fp16 graph too (only the inside is half precision),
so `python -m src.infer` feeds both the same way. The decoder is the teacher's VAE
(`export.decoder: vae`) or a TAESD-format tiny decoder (`tiny`: the top-level `tiny_decoder`),
several times cheaper (reports/bench/README.md) at the quality cost reports/eval/README.md shows. The folder also holds `tokenizer.json`
and `onestep.json` (shapes, timestep, tokenizer ids), a model card, README.md, and, written
last, `manifest.json`: the SHA-256 and size of every file and the artifact's version
(src/core/manifest.py). Every reader (`src.infer`, `src.serve`, promotion) verifies it first.

fp16: the fp32 graph converted by ONNX Runtime's float16 tool with float32 inputs/outputs;
ops whose half-precision version is numerically unsafe or has no kernel (the timestep
embedding's Sin/Cos/Exp, normalisations' reductions, Resize) stay float32.

export.fuse: ort (the world's params.yaml) replaces every attention by ONNX Runtime's contrib
MultiHeadAttention / Attention operators and erf-GELU by Gelu (fuse_ort; CPU and CUDA kernels);
none leaves the plain ONNX graph; cuda adds ORT's Stable Diffusion fusions, whose operators
have CUDA kernels only (fuse_cuda). With none or ort both artifacts load and run on the CPU
provider as well as on CUDA.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifact.card import model_card
from .artifact.graph import PROVIDER, consolidate, cuda_usable, export_fp16, fuse_cuda, fuse_ort, run_session
from .core import manifest
from .core.config import ExportConfig, stage_config
from .core.errors import UserError, run_cli
from .core.fileio import atomic_dir, write_json
from .core.images import psnr
from .core.prompts import read_prepared
from .core.text import padded_token_ids
from .method.conditioning import family_of, pixel_size, sdxl_conditioning, time_ids
from .method.noise import initial_noise
from .method.onestep import decode, steps_of, student_sample, student_timesteps, timestep_of
from .method.teacher import alphas_cumprod, load_pipeline, with_tiny_decoder


@dataclass(frozen=True)
class Paths:
    student: Path = Path("models/student")
    out: Path = Path("models/onnx")
    reports: Path = Path("reports/export")
    eval_prompts: Path = Path("prompts/eval.jsonl")
    tiny_decoder: Path | None = None      # the top-level tiny_decoder (export.decoder: tiny)


class OneStepGraph(torch.nn.Module):
    """token ids + noise -> images in [0, 1]: what the ONNX graph of a Stable Diffusion 1.x / 2.x student
    computes."""

    def __init__(self, pipe):
        super().__init__()
        self.text_encoder, self.unet, self.vae = pipe.text_encoder, pipe.unet, pipe.vae
        self.register_buffer("abar", alphas_cumprod(pipe), persistent=False)
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.timesteps = student_timesteps(timestep_of(pipe), steps_of(pipe))

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        text = self.text_encoder(input_ids)[0]
        return decode(self.vae, student_sample(self.unet, noise, text, self.abar, self.prediction, self.timesteps))


class OneStepGraphXL(torch.nn.Module):
    """SDXL: both tokenizers' ids + noise -> images in [0, 1]. The context (both encoders' penultimate
    hidden states), the pooled embedding and the time ids (the resolution fixed at export) are computed
    inside, as src/method/conditioning.py computes them."""

    def __init__(self, pipe):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.unet, self.vae = pipe.unet, pipe.vae
        self.register_buffer("abar", alphas_cumprod(pipe), persistent=False)
        self.register_buffer("time_ids", time_ids(pixel_size(pipe), 1), persistent=False)
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.timesteps = student_timesteps(timestep_of(pipe), steps_of(pipe))

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        text = sdxl_conditioning(self.text_encoder(input_ids, output_hidden_states=True),
                                 self.text_encoder_2(input_ids_2, output_hidden_states=True),
                                 self.time_ids.expand(noise.shape[0], -1))
        x0 = student_sample(self.unet, noise, text, self.abar, self.prediction, self.timesteps)
        return decode(self.vae, x0.to(self.vae.dtype))


def vae_needs_float32(pipe) -> bool:
    """SDXL's VAE overflows in float16; its pipeline decodes in float32 when the config says `force_upcast`
    (diffusers writes that flag into every AutoencoderKL config, but only the SDXL pipeline reads it)."""
    return family_of(pipe) == "sdxl" and bool(pipe.vae.config.get("force_upcast", False))


def graph_of(pipe) -> torch.nn.Module:
    return (OneStepGraphXL if family_of(pipe) == "sdxl" else OneStepGraph)(pipe).eval()


def input_names(pipe) -> list[str]:
    """The graph's inputs in order: the token ids (of both tokenizers for SDXL), then the noise."""
    return ["input_ids", "input_ids_2", "noise"] if family_of(pipe) == "sdxl" else ["input_ids", "noise"]


def contract(pipe) -> dict:
    """What a caller needs besides the graph: shapes, the tokenizer's ids, the noise convention (SDXL: the
    second tokenizer's ids and the resolution the time ids were fixed at)."""
    c = sd_contract(pipe)
    if family_of(pipe) == "sdxl":
        tok, size = pipe.tokenizer_2, pixel_size(pipe)
        c["inputs"] = {"input_ids": c["inputs"]["input_ids"], "input_ids_2": ["batch", tok.model_max_length],
                       "noise": c["inputs"]["noise"]}
        c |= {"family": "sdxl",
              "tokenizer_2": {"file": "tokenizer_2.json", "max_length": tok.model_max_length,
                              "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id},
              "resolution": size, "time_ids": time_ids(size, 1)[0].tolist(),
              "vae_float32_in_fp16": vae_needs_float32(pipe)}
    return c


def sd_contract(pipe) -> dict:
    """An N-step student's noise is N latents deep (its initial latent, then the noise each later step adds):
    `latent_shape` is the noise input's per-sample shape, and `steps` / `timesteps` say how it is used."""
    tok, unet = pipe.tokenizer, pipe.unet
    timesteps = student_timesteps(timestep_of(pipe), steps_of(pipe))
    channels = unet.config.in_channels * len(timesteps)
    few = {"steps": len(timesteps), "timesteps": timesteps} if len(timesteps) > 1 else {}
    return few | {
        "inputs": {"input_ids": ["batch", tok.model_max_length], "noise": ["batch", channels,
                                                                             unet.config.sample_size,
                                                                             unet.config.sample_size]},
        "outputs": {"images": ["batch", 3, "H", "W"], "range": [0.0, 1.0]},
        "max_length": tok.model_max_length,
        "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
        "latent_shape": [channels, unet.config.sample_size, unet.config.sample_size],
        "timestep": timestep_of(pipe),
        "decoder": type(pipe.vae).__name__,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "noise": "sample i: numpy.random.default_rng(seed_i).standard_normal(latent_shape, dtype=float32)" + (
            f"; channels [0, {unet.config.in_channels}) are the initial latent, each next {unet.config.in_channels} "
            "the noise added before the next step" if few else ""),
    }


def export_fp32(pipe, path: Path, opset: int, exporter: str = "torchscript") -> None:
    """torch -> ONNX with a dynamic batch, external data when over 2 GB. `exporter`: torchscript (the
    legacy tracer, deprecated by PyTorch) or dynamo (torch.export; needs the onnxscript package)."""
    graph = graph_of(pipe)
    c = contract(pipe)
    ids = torch.full((2, c["max_length"]), c["pad_id"], dtype=torch.long)   # batch 2: a size-1 axis is not
    noise = torch.zeros(2, *c["latent_shape"])                             # exported as dynamic
    inputs = (ids, noise)
    if "tokenizer_2" in c:
        t2 = c["tokenizer_2"]
        inputs = (ids, torch.full((2, t2["max_length"]), t2["pad_id"], dtype=torch.long), noise)
    raw = path.parent / "raw.onnx"
    names = dict(input_names=input_names(pipe), output_names=["images"], opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shape asserts in diffusers blocks
        # both inputs share the one batch dimension; torch.export says so once per input name
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(graph, inputs, None, dynamo=True, verbose=False,
                                        dynamic_shapes=tuple({0: batch} for _ in inputs), **names)
            program.save(str(raw))            # its weights go to raw.onnx.data past 2 GB
            del program
        else:
            torch.onnx.export(graph, inputs, str(raw), dynamo=False, **names,
                              dynamic_axes={n: {0: "batch"} for n in names["input_names"] + ["images"]})
    del graph
    consolidate(raw, path)
    for f in path.parent.iterdir():
        if f.name not in (path.name, path.name + ".data"):
            f.unlink()


def reference(pipe, prompts: list[str], seeds: list[int]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(the graph's inputs by name, images) of the PyTorch student: what the ONNX graphs must reproduce."""
    c = contract(pipe)
    feeds = {"input_ids": padded_token_ids(pipe.tokenizer, prompts, "np")}
    if "tokenizer_2" in c:
        feeds["input_ids_2"] = padded_token_ids(pipe.tokenizer_2, prompts, "np")
    feeds["noise"] = initial_noise(seeds, tuple(c["latent_shape"]))
    with torch.no_grad():
        ref = graph_of(pipe)(*(torch.from_numpy(feeds[n]) for n in input_names(pipe))).numpy()
    return feeds, ref


def parity(files: dict[str, Path], feeds: dict[str, np.ndarray], ref: np.ndarray,
           providers: dict[str, str] | None = None) -> dict[str, float]:
    """ONNX vs the PyTorch student's images `ref` for the same inputs: PSNR and max error on [0, 1].
    `providers`: where each graph runs (cpu unless named: a fused fp16 graph runs on cuda only)."""
    out = {}
    for name, f in files.items():
        t0 = time.perf_counter()
        session = run_session(f, PROVIDER[(providers or {}).get(name, "cpu")])
        out[f"session_load_s_{name}"] = round(time.perf_counter() - t0, 1)
        got = session.run(["images"], feeds)[0]
        out[f"psnr_{name}"] = round(psnr(got, ref), 3)
        out[f"max_abs_err_{name}"] = float(np.abs(got - ref).max())
        del session                   # one multi-GB session at a time
        say(f"{name} parity {out[f'psnr_{name}']:.1f} dB", t0)
    return out


def say(what: str, since: float) -> None:
    """One progress line of this long stage (an SDXL-size export takes many minutes on a CPU)."""
    print(f"export: {what} ({time.perf_counter() - since:.0f} s)", file=sys.stderr, flush=True)


def export(cfg: ExportConfig, paths: Paths = Paths()) -> dict:
    """Write models/onnx (fp32/, fp16/, tokenizer.json, onestep.json, README.md) and the parity report."""
    if not (paths.student / "model_index.json").is_file():
        raise UserError(f"{paths.student}: no student pipeline (run `dvc repro distill` first)")
    if cfg.fuse == "cuda" and not cuda_usable():
        raise UserError("export.fuse: cuda: the fused fp16 graph has CUDA-only operators (GroupNorm, NhwcConv), and "
                        "no CUDA GPU is usable here to check its parity; export on a GPU machine, or set "
                        "export.fuse: none (the portable graphs). Nothing was written.")
    pipe = load_pipeline(str(paths.student))
    if cfg.decoder == "tiny":
        pipe = with_tiny_decoder(pipe, paths.tiny_decoder, "export.decoder")
    records = read_prepared(paths.eval_prompts, cfg.parity_prompts) if paths.eval_prompts.is_file() else []
    prompts = [r["prompt"] for r in records] or ["a photo of a cat"]
    seeds = [int(r["seed"]) for r in records] or [0]
    t0 = time.perf_counter()
    feeds, ref = reference(pipe, prompts, seeds)
    say(f"PyTorch reference images for {len(prompts)} parity prompts drawn", t0)
    keep_vae_fp32 = vae_needs_float32(pipe)
    with atomic_dir(paths.out) as tmp:
        files = {"fp32": tmp / "fp32" / "model.onnx", "fp16": tmp / "fp16" / "model.onnx"}
        for f in files.values():
            f.parent.mkdir(parents=True)
        export_fp32(pipe, files["fp32"], cfg.opset, cfg.exporter)
        say(f"fp32 graph written ({cfg.exporter} exporter)", t0)
        pipe.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        if getattr(pipe, "tokenizer_2", None) is not None:
            pipe.tokenizer_2.backend_tokenizer.save(str(tmp / "tokenizer_2.json"))
        c = contract(pipe)
        (tmp / "onestep.json").write_text(json.dumps(c, indent=2) + "\n")
        del pipe                      # the PyTorch weights: gone before the fp16 graph and the sessions load
        gc.collect()
        t_fuse = time.perf_counter()
        fused = fuse_ort(files["fp32"]) if cfg.fuse == "ort" else {}
        if cfg.fuse == "ort":
            say("ONNX Runtime attention fusions applied", t0)
        t_fp16 = time.perf_counter()
        if cfg.fuse == "cuda":
            fused = fuse_cuda(files["fp32"], files["fp16"])
        else:
            export_fp16(files["fp32"], files["fp16"], keep_vae_fp32)
        say("fp16 graph written", t0)
        timings = {"export_fp32_s": round(t_fuse - t0, 1), "fuse_s": round(t_fp16 - t_fuse, 1),
                   "convert_fp16_s": round(time.perf_counter() - t_fp16, 1)}
        metrics = parity(files, feeds, ref, {"fp16": cfg.fuse} if cfg.fuse == "cuda" else None) | timings
        metrics |= {"fuse": cfg.fuse, "fusions": fused}
        metrics |= {f"external_data_{k}": (f.parent / (f.name + ".data")).is_file() for k, f in files.items()}
        metrics |= {f"size_mb_{k}": round(sum(p.stat().st_size for p in f.parent.iterdir()) / 2**20, 2)
                    for k, f in files.items()}
        metrics["export_s"] = round(time.perf_counter() - t0, 1)
        metrics["parity_prompts"] = len(prompts)
        failed = [k for k, bar in (("fp32", cfg.min_psnr_fp32), ("fp16", cfg.min_psnr_fp16))
                  if metrics[f"psnr_{k}"] < bar]
        if failed:
            raise UserError("export: parity below the bar for " + ", ".join(
                f"{k} ({metrics[f'psnr_{k}']:.1f} dB)" for k in failed) + f"; bars: fp32 {cfg.min_psnr_fp32} dB, "
                f"fp16 {cfg.min_psnr_fp16} dB. Nothing was written.")
        (tmp / "README.md").write_text(model_card(paths.student, c, metrics, cfg))
        metrics["version"] = manifest.write(tmp)["version"]          # last: it hashes the files as written
    write_json(paths.reports / "metrics.json", metrics)
    return metrics


def single_file(student: Path, out: Path) -> int:
    """The student pipeline as one .safetensors checkpoint in the original layout; its size in bytes."""
    from .artifact.single_file import write_single_file

    if out.suffix != ".safetensors":
        raise UserError(f"--single-file {out}: expected a .safetensors file name")
    if not (student / "model_index.json").is_file():
        raise UserError(f"{student}: no student pipeline (run `dvc repro distill` first)")
    made = json.loads((student / "swiftbrush.json").read_text()) if (student / "swiftbrush.json").is_file() else {}
    meta = {"swiftbrush_timestep": str(made["timestep"])} if "timestep" in made else {}
    return write_single_file(load_pipeline(str(student)), out, meta)


def cli_args(parser) -> None:
    """Export another student (e.g. a merged one) than the DVC stage's, to another folder."""
    d = Paths()
    parser.add_argument("--student", type=Path, default=d.student, help="student pipeline folder")
    parser.add_argument("--out", type=Path, default=d.out, help="the artifact folder")
    parser.add_argument("--reports", type=Path, default=d.reports, help="where metrics.json goes")
    parser.add_argument("--single-file", type=Path, metavar="FILE.safetensors",
                        help="instead of the ONNX artifact, write the student as one checkpoint in the original "
                             "key layout (ComfyUI, AUTOMATIC1111, diffusers' from_single_file)")


def main(argv: list[str] | None = None) -> None:
    config, args = stage_config(__doc__, "export", argv, extra_args=cli_args, top_level=("tiny_decoder",))
    if config is None:
        return
    if args.single_file is not None:
        print(f"export: {single_file(args.student, args.single_file) / 2**20:.1f} MB written to {args.single_file}")
        return
    m = export(config.export, Paths(student=args.student, out=args.out, reports=args.reports,
                                    tiny_decoder=Path(config.tiny_decoder) if config.tiny_decoder else None))
    print(f"export: fp32 {m['psnr_fp32']:.1f} dB (max err {m['max_abs_err_fp32']:.1e}), "
          f"fp16 {m['psnr_fp16']:.1f} dB (max err {m['max_abs_err_fp16']:.1e}); {args.out} written "
          f"(version {m['version']})")


if __name__ == "__main__":
    run_cli(main)
