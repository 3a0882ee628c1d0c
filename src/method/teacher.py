"""Loading a Stable-Diffusion-style teacher, with one clear error for anything else."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fileio import read_json
from .vsd import SUPPORTED_PREDICTIONS

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_pipeline_folder(path: Path) -> None:
    """Raise UserError unless `path` holds a diffusers SD pipeline (model_index.json + components)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"teacher {path}: not a diffusers pipeline folder (no model_index.json); expected a "
                        "StableDiffusionPipeline.save_pretrained folder such as stable-diffusion-2-1-base")
    spec = read_json(index, "the teacher folder is damaged")
    missing = [c for c in REQUIRED if not spec.get(c) or spec[c][0] is None or not (path / c).is_dir()]
    if missing:
        raise UserError(f"teacher {path}: not a Stable Diffusion pipeline: missing {', '.join(missing)} "
                        f"(needs {', '.join(REQUIRED)})")
    if spec.get("unet", [None, None])[1] != "UNet2DConditionModel":
        raise UserError(f"teacher {path}: unet is {spec['unet'][1]}, expected UNet2DConditionModel")


def load_pipeline(teacher: str, dtype: torch.dtype = torch.float32, local_only: bool = True,
                  frozen_dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline from a local folder, or a hub id already in the local cache.
    `frozen_dtype`: load the text encoder and VAE in that dtype directly (never resident in `dtype`)."""
    from diffusers import StableDiffusionPipeline

    path = Path(teacher)
    if path.exists():
        check_pipeline_folder(path)
    try:
        parts = {}
        if frozen_dtype is not None and frozen_dtype != dtype:
            parts = dict(zip(("text_encoder", "vae"), frozen_parts(teacher, frozen_dtype, local_only)))
        pipe = StableDiffusionPipeline.from_pretrained(teacher, dtype=dtype, safety_checker=None, **parts,
                                                       requires_safety_checker=False, local_files_only=local_only)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "folder" if path.exists() else "hub id (not a local folder, and not in the local Hugging Face cache)"
        raise UserError(f"teacher {teacher!r}: could not load it as a {where}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in SUPPORTED_PREDICTIONS:
        raise UserError(f"teacher {teacher!r}: scheduler prediction_type {prediction!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_PREDICTIONS)})")
    return pipe


def frozen_parts(teacher: str, dtype: torch.dtype, local_only: bool = True):
    """The teacher's text encoder and VAE, loaded directly in `dtype`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    return (CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder", dtype=dtype, local_files_only=local_only),
            AutoencoderKL.from_pretrained(teacher, subfolder="vae", torch_dtype=dtype, local_files_only=local_only))


def load_tiny_decoder(path: str | Path, vae, dtype: torch.dtype = torch.float32):
    """A TAESD-format decoder (diffusers AutoencoderTiny folder) checked against the teacher's `vae`: the same
    latent channels and upsampling factor. It decodes the scaled latents the UNet works in (scaling_factor 1),
    so `onestep.decode` treats it exactly as the full VAE."""
    from diffusers import AutoencoderTiny

    folder = Path(path)
    hint = ("build the world's with `python -m src.world.build --only-tiny-decoder`, or point tiny_decoder at a "
            "TAESD folder for your teacher's VAE (SD 1.x/2.x: madebyollin/taesd)")
    if not (folder / "config.json").is_file():
        raise UserError(f"tiny_decoder {folder}: not an AutoencoderTiny folder (no config.json); {hint}")
    spec = read_json(folder / "config.json", "the tiny decoder folder is damaged")
    if spec.get("_class_name") != "AutoencoderTiny":
        raise UserError(f"tiny_decoder {folder}: config.json describes {spec.get('_class_name')!r}, expected "
                        f"'AutoencoderTiny' (TAESD format); {hint}")
    try:
        tiny = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(f"tiny_decoder {folder}: cannot load it ({err}); {hint}") from None
    factor = tiny.config.upsampling_scaling_factor ** (len(tiny.config.decoder_block_out_channels) - 1)
    want = 2 ** (len(vae.config.block_out_channels) - 1)
    if tiny.config.latent_channels != vae.config.latent_channels or factor != want:
        raise UserError(f"tiny_decoder {folder}: decodes {tiny.config.latent_channels}-channel latents {factor}x up; "
                        f"the teacher's VAE has {vae.config.latent_channels} channels, {want}x ({hint})")
    return tiny.eval().requires_grad_(False)


def with_tiny_decoder(pipe, path: str | Path | None, setting: str):
    """A shallow copy of `pipe` (the same modules) whose decoder is the tiny decoder at `path`; `pipe` keeps its
    VAE. `setting`: the parameter that asked for it, named when `path` is not given."""
    import copy

    if path is None:
        raise UserError(f"{setting}: tiny needs the top-level tiny_decoder (a TAESD-format folder)")
    tiny = copy.copy(pipe)
    tiny.vae = load_tiny_decoder(path, pipe.vae, pipe.vae.dtype).to(pipe.vae.device)
    return tiny


def alphas_cumprod(pipe) -> torch.Tensor:
    """The teacher's cumulative alphas, from its own scheduler config (never a pasted constant)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.float()


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Text embeddings exactly as StableDiffusionPipeline computes them (padded to model length)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device)
    return pipe.text_encoder(ids)[0]
