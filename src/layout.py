"""Stable Diffusion teacher folders at their real sizes and file layout, with random weights.

    python -m src.layout --arch sd21-base --out /data/sd21-base            # 0.87B UNet, ~5.2 GB
    python -m src.layout --arch sd15 --out /tmp/sd15-tiny --scale tiny     # same configs, narrow
    python -m src.layout --arch sdxl --out /data/sdxl                      # 2.57B UNet, two text encoders

No weights can be downloaded here, so a rehearsal of the real stages needs folders that are
what a user brings in every respect but the numbers in the weights: `model_index.json` with
the real scheduler class and the safety-checker / feature-extractor entries as the published
folders have them, each component's config copied as numbers from the public config files
(runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base,
stabilityai/stable-diffusion-2-1, stabilityai/stable-diffusion-xl-base-1.0), fp32 safetensors,
and the real CLIP BPE tokenizer (49,408 tokens; SDXL's two tokenizers pad with "<|endoftext|>"
and "!") built from the vocabulary file the open_clip_torch wheel carries.

`--scale tiny` keeps every config value but the widths (channels, hidden sizes and the
group-norm group counts that must divide them), so CI runs the same layout in seconds.
Random weights prove code paths, memory, sizes and speeds; never image quality.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path
from typing import Literal

import torch

from .core.errors import UserError, run_cli
from .core.fileio import atomic_dir

Arch = Literal["sd15", "sd21-base", "sd21", "sdxl"]
ARCHES: tuple[str, ...] = ("sd15", "sd21-base", "sd21", "sdxl")
VOCAB_SIZE = 49408                     # every SD tokenizer: 256 bytes x 2 + 48,894 merges + 2 specials
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# ---- the public configs, as numbers (docs/design.md, "Real teachers")

_UNET_COMMON = dict(
    act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
_UNET_SD2 = dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
                 num_class_embeds=None, only_cross_attention=False, resnet_time_scale_shift="default",
                 use_linear_projection=True)
UNET = {
    "sd15": {**_UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
    "sd21-base": {**_UNET_COMMON, **_UNET_SD2, "sample_size": 64, "upcast_attention": False},
    "sd21": {**_UNET_COMMON, **_UNET_SD2, "sample_size": 96, "upcast_attention": True},
    # SDXL base 1.0: three levels, the first without attention, 1/2/10 transformer layers, the "text_time"
    # added conditioning: 1280 pooled + 6 time ids x 256 = 2816 inputs.
    "sdxl": dict(act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 center_input_sample=False, cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0,
                 in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32,
                 num_class_embeds=None, only_cross_attention=False, out_channels=4,
                 projection_class_embeddings_input_dim=2816, resnet_time_scale_shift="default", sample_size=128,
                 transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 upcast_attention=None, use_linear_projection=True),
}

_TEXT_COMMON = dict(attention_dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=1, initializer_factor=1.0,
                    initializer_range=0.02, layer_norm_eps=1e-5, max_position_embeddings=77,
                    vocab_size=VOCAB_SIZE)
TEXT_ENCODER = {   # CLIP ViT-L/14's text tower (SD 1.5); OpenCLIP ViT-H/14's, penultimate layer kept (SD 2.x)
    "sd15": {**_TEXT_COMMON, "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
             "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
    "sd21-base": {**_TEXT_COMMON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                  "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512},
}
TEXT_ENCODER["sd21"] = TEXT_ENCODER["sd21-base"]
TEXT_ENCODER["sdxl"] = TEXT_ENCODER["sd15"]            # CLIP ViT-L/14, penultimate layer
TEXT_ENCODER_2 = {  # SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower with its projection (pooled 1280)
    "sdxl": {**_TEXT_COMMON, "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
             "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280},
}

_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4, layers_per_block=2,
            norm_num_groups=32, out_channels=3, up_block_types=["UpDecoderBlock2D"] * 4, scaling_factor=0.18215)
VAE = {"sd15": {**_VAE, "sample_size": 512}, "sd21-base": {**_VAE, "sample_size": 512},
       "sd21": {**_VAE, "sample_size": 768},
       "sdxl": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}}

_SCHEDULE = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                 num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                 trained_betas=None)
SCHEDULER = {
    "sd15": ("PNDMScheduler", dict(_SCHEDULE)),
    "sd21-base": ("PNDMScheduler", {**_SCHEDULE, "prediction_type": "epsilon"}),
    "sd21": ("DDIMScheduler", {**_SCHEDULE, "prediction_type": "v_prediction"}),
    "sdxl": ("EulerDiscreteScheduler", {**_SCHEDULE, "interpolation_type": "linear", "prediction_type": "epsilon",
                                        "sample_max_value": 1.0, "timestep_spacing": "leading",
                                        "use_karras_sigmas": False}),
}

# SD 1.5 ships its safety checker (a CLIP ViT-L/14 vision tower + concept embeddings); SD 2.x
# lists the entry as [null, null] and keeps only the feature extractor.
SAFETY_CHECKER = {"sd15": True, "sd21-base": False, "sd21": False, "sdxl": False}
PAD_TOKEN = {"sd15": "<|endoftext|>", "sd21-base": "!", "sd21": "!", "sdxl": "<|endoftext|>"}
PAD_TOKEN_2 = {"sdxl": "!"}
SCALES = ("full", "tiny", "micro")


def narrow(config: dict, kind: str, micro: bool = False) -> dict:
    """The tiny scale: every value kept but the widths (and the group counts that must divide them). The micro
    scale (tests of whole stages) is also shallow: one layer per block, one transformer layer, two text layers."""
    c = dict(config)
    if micro and kind == "unet":
        c["layers_per_block"] = 1
        if "transformer_layers_per_block" in c:
            c["transformer_layers_per_block"] = [1] * len(c["transformer_layers_per_block"])
    elif micro and kind == "vae":
        c["layers_per_block"] = 1
    elif micro and kind == "text":
        c["num_hidden_layers"] = 2
    if kind == "unet":
        c["block_out_channels"] = [w // 8 for w in c["block_out_channels"]]      # 40/80/160/160
        c["norm_num_groups"] = 8                 # divides 40; heads (8 or 5/10/20/20) still divide every width
    elif kind == "vae":
        c["block_out_channels"] = [w // 8 for w in c["block_out_channels"]]      # 16/32/64/64
        c["norm_num_groups"] = 8
    elif kind == "text":
        c["hidden_size"] = 4 * c["num_attention_heads"]                          # head width 4
        c["intermediate_size"] = 4 * c["hidden_size"]
        c["projection_dim"] = c["hidden_size"]
    return c


# ---- the tokenizer


def clip_bpe_file() -> Path:
    """The CLIP BPE vocabulary shipped inside the open_clip_torch wheel (found without importing it)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz" if spec else None
    if path is None or not path.is_file():
        raise UserError("the CLIP BPE vocabulary was not found: install open_clip_torch (it carries "
                        "open_clip/bpe_simple_vocab_16e6.txt.gz)")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocabulary(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as CLIP builds them: bytes, bytes + </w>, one token per merge, 2 specials."""
    from .world.tokenizer import EOW, SPECIAL_TOKENS

    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:VOCAB_SIZE - 256 * 2 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())         # CLIP's byte order (not sorted): the real ids
    tokens += [t + EOW for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += list(SPECIAL_TOKENS)
    if len(tokens) != VOCAB_SIZE:
        raise UserError(f"{bpe_gz}: {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(out: Path, pad_token: str) -> None:
    """A CLIPTokenizer folder of the real vocabulary, with the published file set."""
    from .world.tokenizer import save_tokenizer

    vocab, merges = clip_vocabulary(clip_bpe_file())
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out, vocab, merges, pad_token=pad_token)


# ---- the folder


def build_components(arch: Arch, scale: str, seed: int):
    """Randomly initialised (unet, vae, text_encoder, safety_checker or None) at the arch's configs; for SDXL
    the fourth is the second text encoder (SDXL has no safety checker)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig

    tiny, micro = scale in ("tiny", "micro"), scale == "micro"
    text_cfg = narrow(TEXT_ENCODER[arch], "text", micro) if tiny else TEXT_ENCODER[arch]
    unet_cfg = narrow(UNET[arch], "unet", micro) if tiny else UNET[arch]
    text2_cfg = None
    if arch in TEXT_ENCODER_2:
        text2_cfg = narrow(TEXT_ENCODER_2[arch], "text", micro) if tiny else TEXT_ENCODER_2[arch]
        if tiny:   # the context is both encoders' hidden states side by side; the added input pooled + 6 time ids
            unet_cfg |= {"cross_attention_dim": text_cfg["hidden_size"] + text2_cfg["hidden_size"],
                         "projection_class_embeddings_input_dim":
                             text2_cfg["projection_dim"] + 6 * unet_cfg["addition_time_embed_dim"]}
    elif tiny:
        unet_cfg |= {"cross_attention_dim": text_cfg["hidden_size"]}     # cross-attention reads the encoder's width
    vae_cfg = narrow(VAE[arch], "vae", micro) if tiny else VAE[arch]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    if text2_cfg is not None:
        from transformers import CLIPTextModelWithProjection

        return unet, vae, text_encoder, CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg))
    safety = None
    if SAFETY_CHECKER[arch]:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        vision = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                      patch_size=14, image_size=224, projection_dim=768)       # CLIP ViT-L/14's vision tower
        if tiny:
            vision.update(hidden_size=64, intermediate_size=256)
        safety = StableDiffusionSafetyChecker(CLIPConfig(text_config=CLIPTextConfig(**text_cfg).to_dict(),
                                                         vision_config=CLIPVisionConfig(**vision).to_dict(),
                                                         projection_dim=vision["projection_dim"]))
    return unet, vae, text_encoder, safety


def write_layout(arch: Arch, out: Path, scale: str = "full", seed: int = 0) -> dict:
    """Write the teacher folder; return its parameter counts per component."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPTokenizer

    if arch not in ARCHES:
        raise UserError(f"--arch {arch!r}: expected one of {', '.join(ARCHES)}")
    if scale not in SCALES:
        raise UserError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    if arch == "sdxl":
        return write_sdxl_layout(out, scale, seed)
    unet, vae, text_encoder, safety = build_components(arch, scale, seed)
    cls, sched_cfg = SCHEDULER[arch]
    scheduler = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler}[cls].from_config(sched_cfg)
    features = CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224},
                                  do_center_crop=True, do_normalize=True, do_resize=True, image_mean=CLIP_MEAN,
                                  image_std=CLIP_STD, resample=3)
    with atomic_dir(out) as tmp:
        save_clip_tokenizer(tmp / "tokenizer", PAD_TOKEN[arch])
        tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=safety, feature_extractor=features,
                                       requires_safety_checker=safety is not None)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_scheduler_config(tmp, cls, sched_cfg)
        if safety is None:       # SD 2.x: the entry is there, as [null, null]
            index = json.loads((tmp / "model_index.json").read_text())
            index["safety_checker"] = [None, None]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        counts = parameter_counts(unet=unet, text_encoder=text_encoder, vae=vae, safety_checker=safety)
        write_record(tmp, arch, scale, seed, counts)
    return counts


def parameter_counts(**components) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in components.items() if m is not None}


def write_record(folder: Path, arch: str, scale: str, seed: int, counts: dict[str, int]) -> None:
    import diffusers

    (folder / "layout.json").write_text(json.dumps(
        {"arch": arch, "scale": scale, "seed": seed, "weights": "random (a rehearsal folder: no image quality)",
         "parameters": counts, "diffusers": diffusers.__version__}, indent=2) + "\n")


def write_scheduler_config(folder: Path, cls: str, config: dict) -> None:
    """The published scheduler file, keys the class does not read (PNDM's clip_sample...) included."""
    import diffusers

    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": cls, "_diffusers_version": diffusers.__version__, **config}, indent=2) + "\n")


def write_sdxl_layout(out: Path, scale: str, seed: int) -> dict:
    """An SDXL base folder as published: two CLIP tokenizers and text encoders (the second with its
    projection), the text-time UNet, the VAE with scaling 0.13025 that must decode in float32
    (`force_upcast`), Euler, and `force_zeros_for_empty_prompt`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder, text_encoder_2 = build_components("sdxl", scale, seed)
    cls, sched_cfg = SCHEDULER["sdxl"]
    with atomic_dir(out) as tmp:
        save_clip_tokenizer(tmp / "tokenizer", PAD_TOKEN["sdxl"])
        save_clip_tokenizer(tmp / "tokenizer_2", PAD_TOKEN_2["sdxl"])
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=CLIPTokenizer.from_pretrained(tmp / "tokenizer"),
            tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"), unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(sched_cfg), force_zeros_for_empty_prompt=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_scheduler_config(tmp, cls, sched_cfg)
        index = json.loads((tmp / "model_index.json").read_text())      # the published entries only
        for optional in ("image_encoder", "feature_extractor"):
            index.pop(optional, None)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        counts = parameter_counts(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae)
        write_record(tmp, "sdxl", scale, seed, counts)
    return counts


def write_configs(arch: Arch, out: Path) -> Path:
    """The arch's pipeline folder without weights: model_index.json, every component's config, the tokenizers
    and the scheduler. What diffusers' single-file loader needs (`config=`) to read a published checkpoint
    offline."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    if arch not in ARCHES:
        raise UserError(f"teacher_config {arch!r}: expected one of {', '.join(ARCHES)} or a folder")
    cls, sched_cfg = SCHEDULER[arch]
    texts = {"text_encoder": ("CLIPTextModel", TEXT_ENCODER[arch])}
    if arch in TEXT_ENCODER_2:
        texts["text_encoder_2"] = ("CLIPTextModelWithProjection", TEXT_ENCODER_2[arch])
    with atomic_dir(out) as tmp:
        with torch.device("meta"):
            UNet2DConditionModel(**UNET[arch]).save_config(tmp / "unet")
            AutoencoderKL(**VAE[arch]).save_config(tmp / "vae")
        for name, (_, config) in texts.items():
            CLIPTextConfig(**config).save_pretrained(tmp / name)
        save_clip_tokenizer(tmp / "tokenizer", PAD_TOKEN[arch])
        index = {"_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline",
                 "_diffusers_version": diffusers.__version__, "scheduler": ["diffusers", cls],
                 "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"]}
        index |= {name: ["transformers", cls_name] for name, (cls_name, _) in texts.items()}
        if arch == "sdxl":
            save_clip_tokenizer(tmp / "tokenizer_2", PAD_TOKEN_2["sdxl"])
            index |= {"tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
        else:
            index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                      "requires_safety_checker": False}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "scheduler").mkdir()
        write_scheduler_config(tmp, cls, sched_cfg)
    return out


def single_file_teacher(path: Path, teacher_config: str, cache: Path | None = None) -> Path:
    """A one-file teacher (the original key layout) as a diffusers folder, converted once by diffusers'
    single-file loader (offline, the configs from `teacher_config`: an arch name or a folder) and kept in
    the cache (SWIFTBRUSH_CACHE, default ~/.cache/swiftbrush) under the file's path, size and time. Every
    weight of the converted pipeline is checked against the file: a file whose keys do not fit the named
    architecture is one clear error, never a half-random teacher."""
    import hashlib
    import os
    import tempfile

    import diffusers

    if not path.is_file():
        raise UserError(f"distill.teacher {path}: no such file")
    st = path.stat()
    config_dir = Path(teacher_config) if Path(teacher_config).is_dir() else None
    if config_dir is None and teacher_config not in ARCHES:
        raise UserError(f"distill.teacher_config {teacher_config!r}: expected one of {', '.join(ARCHES)} or a "
                        "diffusers pipeline folder")
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{teacher_config}".encode()).hexdigest()[:16]
    root = cache or Path(os.environ.get("SWIFTBRUSH_CACHE", Path.home() / ".cache" / "swiftbrush"))
    out = root / "single_file" / f"{path.stem}-{key}"
    if (out / "model_index.json").is_file():
        return out
    with tempfile.TemporaryDirectory() as scratch:
        if config_dir is None:
            config_dir = write_configs(teacher_config, Path(scratch) / teacher_config)
        index = json.loads((config_dir / "model_index.json").read_text())
        cls = getattr(diffusers, index["_class_name"])
        extra = {} if index["_class_name"] == "StableDiffusionXLPipeline" else {"safety_checker": None}
        try:
            pipe = cls.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                        torch_dtype=torch.float32, **extra)
        except Exception as err:      # diffusers raises several types for keys or shapes that do not fit
            raise UserError(f"distill.teacher {path}: does not load as {teacher_config} "
                            f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
        check_against_file(pipe, path, teacher_config)
        with atomic_dir(out) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def check_against_file(pipe, path: Path, teacher_config: str) -> None:
    """Every weight of `pipe`, put back in the original layout, is in the file with the same values."""
    from safetensors import safe_open

    from .artifact.single_file import to_original

    wanted = to_original(pipe)
    missing, differ = [], []
    with safe_open(str(path), framework="pt") as f:
        have = set(f.keys())
        for k, v in wanted.items():
            if k not in have:
                missing.append(k)
            elif not torch.equal(f.get_tensor(k).to(v.dtype).reshape(v.shape), v):   # 1x1 conv = linear
                differ.append(k)
    if missing or differ:
        what = (f"{len(missing)} weights are missing (e.g. {missing[0]})" if missing else
                f"{len(differ)} weights did not convert (e.g. {differ[0]})")
        raise UserError(f"distill.teacher {path}: its keys do not fit {teacher_config}: {what}. Name the "
                        "architecture the checkpoint was trained as (distill.teacher_config)")


def resolve_teacher(teacher: str, teacher_config: str | None) -> str:
    """The folder the stages load: `teacher` itself, or a single-file teacher's converted folder."""
    if teacher.endswith(".safetensors"):
        if teacher_config is None:
            raise UserError(f"distill.teacher {teacher}: one checkpoint file needs distill.teacher_config")
        return str(single_file_teacher(Path(teacher), teacher_config))
    return teacher


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.layout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", required=True, choices=ARCHES, help="which published layout to reproduce")
    parser.add_argument("--out", required=True, type=Path, help="folder to write (replaced atomically)")
    parser.add_argument("--scale", choices=SCALES, default="full",
                        help="full: the real parameter counts; tiny: every config value but the widths; micro: "
                             "tiny and shallow (one layer per block), for tests of whole stages")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    counts = write_layout(args.arch, args.out, args.scale, args.seed)
    print(f"{args.arch} ({args.scale}) -> {args.out}: " +
          ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items()))


if __name__ == "__main__":
    run_cli(main)
