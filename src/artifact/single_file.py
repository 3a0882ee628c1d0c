"""A Stable Diffusion pipeline as one `.safetensors` checkpoint in the original (LDM) key layout: what
ComfyUI and AUTOMATIC1111 load, and what diffusers' `from_single_file` reads back.

The inverse of diffusers' single-file converters (diffusers.loaders.single_file_utils), using its own
key tables (DIFFUSERS_TO_LDM_MAPPING) where it has them:

    model.diffusion_model.*    the UNet: input_blocks / middle_block / output_blocks, numbered from the
                               config (block b, layer j of the down path is input_blocks.{b(L+1)+j+1}, with
                               L = layers_per_block; up blocks have L+1 layers); resnets as in_layers /
                               emb_layers / out_layers / skip_connection; SDXL's added embedding as label_emb
    first_stage_model.*        the VAE: encoder.down.{i}.block.{j}, decoder.up.{n-1-i}.block.{j} (reversed),
                               mid.block_1 / attn_1 / block_2, nin_shortcut; attention q / k / v / proj_out
                               as 1x1 convolutions
    cond_stage_model.transformer.*          SD 1.x: the CLIP text model, Hugging Face keys
    cond_stage_model.model.*                SD 2.x: the OpenCLIP text tower (resblocks, in_proj = q|k|v)
    conditioner.embedders.0.transformer.*   SDXL: the first text encoder (Hugging Face keys)
    conditioner.embedders.1.model.*         SDXL: the second, OpenCLIP keys with text_projection

A text encoder with GELU activations is an OpenCLIP tower (SD 2.x, SDXL's second), quick-GELU an OpenAI
CLIP one (SD 1.x, SDXL's first): that decides its layout. Weights are written in their own dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.fileio import atomic_file

UNET, VAE = "model.diffusion_model.", "first_stage_model."
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
            "self_attn.out_proj": "attn.out_proj"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def unet_keys(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM keys (without the prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        direct |= DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
    if config.get("class_embed_type") in ("timestep", "projection"):
        direct |= DIFFUSERS_TO_LDM_MAPPING["unet"]["class_embed_type"]
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("single-file export needs one layers_per_block for every block (the SD layouts have one)")
    has_attention = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in direct:
            new = direct[key]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(b + 1) * (layers + 1)}.0.op.{p[-1]}"
            else:
                n, rest = b * (layers + 1) + int(p[3]) + 1, ".".join(p[4:])
                new = f"input_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            new = f"middle_block.{2 * int(p[2])}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                new = f"output_blocks.{b * (layers + 1) + layers}.{2 if has_attention[b] else 1}.conv.{p[-1]}"
            else:
                n, rest = b * (layers + 1) + int(p[3]), ".".join(p[4:])
                new = f"output_blocks.{n}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        else:
            raise ValueError(f"single-file export: UNet key {key!r} has no place in the LDM layout")
        out[new] = value
    return out


def vae_keys(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM keys (without the prefix)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    direct = DIFFUSERS_TO_LDM_MAPPING["vae"]
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        p = key.split(".")
        if key in direct:
            out[direct[key]] = value
            continue
        side = p[0]
        if p[1] == "mid_block":
            if p[2] == "attentions":
                rest = ".".join(p[4:])
                name = next((v for k, v in VAE_ATTENTION.items() if rest.startswith(k + ".")), None)
                param = rest.rsplit(".", 1)[1]
                new = f"{side}.mid.attn_1.{name}.{param}"
                if value.dim() == 2:                   # the original's attention is 1x1 convolutions
                    value = value[:, :, None, None]
            else:
                new = f"{side}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
        elif p[1] in ("down_blocks", "up_blocks"):
            i = int(p[2]) if side == "encoder" else n_up - 1 - int(p[2])
            where = "down" if side == "encoder" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{side}.{where}.{i}.{'downsample' if where == 'down' else 'upsample'}.conv.{p[-1]}"
            else:
                new = f"{side}.{where}.{i}.block.{p[4]}.{'.'.join(p[5:])}"
        else:
            raise ValueError(f"single-file export: VAE key {key!r} has no place in the LDM layout")
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def openclip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model (with or without projection) as an OpenCLIP text tower."""
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            p = key.split(".")
            i, rest = int(p[3]), ".".join(p[4:])
            if rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                qkv.setdefault((i, p[-1]), {})[rest.split(".")[1]] = value
                continue
            name = next(v for k, v in OPENCLIP.items() if rest.startswith(k + "."))
            out[f"transformer.resblocks.{i}.{name}.{p[-1]}"] = value
        elif key != "text_model.embeddings.position_ids":
            raise ValueError(f"single-file export: text encoder key {key!r} has no place in the OpenCLIP layout")
    for (i, param), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q_proj"], parts["k_proj"],
                                                                           parts["v_proj"]])
    return out


def hf_clip_state(encoder) -> dict[str, torch.Tensor]:
    """The text model's weights under the published Hugging Face names (`text_model.` first: transformers 5
    holds them without it and adds it when it saves)."""
    out = {}
    for k, v in encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        out[k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k] = v
    return out


def text_keys(encoder, prefix_clip: str, prefix_openclip: str) -> dict[str, torch.Tensor]:
    state = hf_clip_state(encoder)
    if encoder.config.hidden_act == "gelu":
        return {prefix_openclip + k: v for k, v in openclip_keys(state).items()}
    return {prefix_clip + k: v for k, v in state.items()}


def to_original(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SD or SDXL pipeline in the single-file layout."""
    out = {UNET + k: v for k, v in unet_keys(pipe.unet.state_dict(), pipe.unet.config).items()}
    out |= {VAE + k: v for k, v in vae_keys(pipe.vae.state_dict(), pipe.vae.config).items()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= text_keys(pipe.text_encoder, "conditioner.embedders.0.transformer.", "conditioner.embedders.0.model.")
        out |= text_keys(pipe.text_encoder_2, "conditioner.embedders.1.transformer.", "conditioner.embedders.1.model.")
    else:
        out |= text_keys(pipe.text_encoder, "cond_stage_model.transformer.", "cond_stage_model.model.")
    return {k: v.detach().contiguous() for k, v in out.items()}


def write_single_file(pipe, path: Path, metadata: dict[str, str] | None = None) -> int:
    """`path` (.safetensors) written whole or not at all; returns its size in bytes."""
    from safetensors.torch import save

    data = save(to_original(pipe), metadata={"format": "pt"} | (metadata or {}))
    with atomic_file(path, "wb") as f:
        f.write(data)
    return len(data)
