"""Loading a Stable-Diffusion-style teacher (SD 1.x / 2.x or SDXL, told apart by its folder), with one clear
error for anything else."""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fileio import read_json
from .conditioning import Family
from .vsd import SUPPORTED_PREDICTIONS

REQUIRED = {"sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
            "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")}
FROZEN = {"sd": ("text_encoder", "vae"), "sdxl": ("text_encoder", "text_encoder_2", "vae")}


def folder_family(spec: dict) -> Family:
    """sdxl for a model_index.json of StableDiffusionXLPipeline or with a second text encoder; sd otherwise."""
    has_second = bool(spec.get("text_encoder_2")) and spec["text_encoder_2"][0] is not None
    return "sdxl" if spec.get("_class_name") == "StableDiffusionXLPipeline" or has_second else "sd"


def check_pipeline_folder(path: Path) -> Family:
    """The teacher's family; UserError unless `path` holds a diffusers SD or SDXL pipeline (model_index.json
    and every component its family needs)."""
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(f"teacher {path}: not a diffusers pipeline folder (no model_index.json); expected a "
                        "StableDiffusionPipeline or StableDiffusionXLPipeline save_pretrained folder such as "
                        "stable-diffusion-2-1-base or stable-diffusion-xl-base-1.0")
    spec = read_json(index, "the teacher folder is damaged")
    family = folder_family(spec)
    missing = [c for c in REQUIRED[family] if not spec.get(c) or spec[c][0] is None or not (path / c).is_dir()]
    if missing:
        kind = "Stable Diffusion XL" if family == "sdxl" else "Stable Diffusion"
        raise UserError(f"teacher {path}: not a {kind} pipeline: missing {', '.join(missing)} "
                        f"(needs {', '.join(REQUIRED[family])})")
    if spec.get("unet", [None, None])[1] != "UNet2DConditionModel":
        raise UserError(f"teacher {path}: unet is {spec['unet'][1]}, expected UNet2DConditionModel")
    return family


def local_folder(teacher: str, local_only: bool = True) -> Path:
    """A local folder as it is; a hub id as its snapshot in the local Hugging Face cache (nothing is downloaded
    unless `local_only` is off)."""
    path = Path(teacher)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(teacher, local_files_only=local_only))
    except Exception as err:          # huggingface_hub raises several unrelated types for a missing snapshot
        raise UserError(f"teacher {teacher!r}: not a local folder, and not in the local Hugging Face cache "
                        f"({type(err).__name__}); give the path of a diffusers pipeline folder") from None


def load_pipeline(teacher: str, dtype: torch.dtype = torch.float32, local_only: bool = True,
                  frozen_dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline (by the folder's family) from a local folder, or
    a hub id already in the local cache. `frozen_dtype`: load the text encoder(s) and VAE in that dtype
    directly (never resident in `dtype`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = local_folder(teacher, local_only)
    family = check_pipeline_folder(path)
    try:
        parts = {}
        if frozen_dtype is not None and frozen_dtype != dtype:
            parts = frozen_parts(str(path), frozen_dtype, local_only)
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(path, dtype=dtype, **parts, local_files_only=True)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None, **parts,
                                                           requires_safety_checker=False, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise UserError(f"teacher {teacher!r}: could not load the pipeline in {path}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in SUPPORTED_PREDICTIONS:
        raise UserError(f"teacher {teacher!r}: scheduler prediction_type {prediction!r} is not supported "
                        f"(supported: {', '.join(SUPPORTED_PREDICTIONS)})")
    return pipe


def frozen_parts(teacher: str, dtype: torch.dtype, local_only: bool = True) -> dict[str, torch.nn.Module]:
    """The teacher's frozen parts (text encoder(s) and VAE) by component name, loaded directly in `dtype`. A VAE
    that overflows in float16 (an SDXL VAE with `force_upcast`, as its pipeline reads the flag) stays float32
    when `dtype` is float16."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = local_folder(teacher, local_only)
    family = check_pipeline_folder(path)
    vae_dtype = dtype
    vae_config = read_json(path / "vae" / "config.json")
    if dtype == torch.float16 and family == "sdxl" and vae_config.get("force_upcast", False):
        vae_dtype = torch.float32
    parts = {"text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype,
                                                           local_files_only=True)}
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=dtype, local_files_only=True)
    parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype, local_files_only=True)
    return parts


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
