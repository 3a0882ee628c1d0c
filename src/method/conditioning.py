"""Prompt -> what the UNet is conditioned on, for both teacher families (one path for distill, evaluate,
export and the stock-pipeline check).

- Stable Diffusion 1.x / 2.x: the context is the text encoder's last hidden state (B, 77, D).
- SDXL: the context is the penultimate hidden states of both text encoders side by side (CLIP ViT-L 768 +
  OpenCLIP bigG 1280 = 2048); the UNet's "text_time" added conditioning takes the second encoder's
  projected text embedding (`text_embeds`, B x 1280) and six time ids: original (h, w), crop top-left
  (0, 0), target (h, w), all at the drawn resolution. With `force_zeros_for_empty_prompt` (SDXL base) the
  unconditional branch of classifier-free guidance is zeros for the context and the pooled embedding.

This follows diffusers' StableDiffusionXLPipeline.encode_prompt and _get_add_time_ids exactly (clip_skip
None, no negative prompt); tests/test_conditioning.py pins it against the stock pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from ..core.text import padded_token_ids

Family = Literal["sd", "sdxl"]


@dataclass(frozen=True)
class Conditioning:
    """The UNet's conditioning for a batch: `context` (encoder_hidden_states) and, for SDXL, the added
    `text_embeds` (pooled) and `time_ids`. Every tensor has the batch on its first axis."""

    context: torch.Tensor
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return Conditioning(*(None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(self)))

    def unet_kwargs(self) -> dict:
        """Keyword arguments of UNet2DConditionModel.forward."""
        if self.text_embeds is None:
            return {"encoder_hidden_states": self.context}
        return {"encoder_hidden_states": self.context,
                "added_cond_kwargs": {"text_embeds": self.text_embeds, "time_ids": self.time_ids}}

    def __len__(self) -> int:
        return self.context.shape[0]

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda v: v[index])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Moved and cast as the UNet reads them (the time ids take the embeddings' dtype, as diffusers does)."""
        return self._map(lambda v: v.to(device=device, dtype=dtype))

    def float(self) -> Conditioning:
        return self.to(dtype=torch.float32)

    def expand(self, n: int) -> Conditioning:
        """A batch of one (the empty prompt) seen as a batch of n, without copying."""
        return self._map(lambda v: v.expand(n, *v.shape[1:]))

    def cat(self, other: Conditioning) -> Conditioning:
        """This batch followed by `other` (the same family)."""
        return Conditioning(*(None if getattr(self, f.name) is None else
                              torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))

    def where(self, mask: torch.Tensor, other: Conditioning) -> Conditioning:
        """Per sample: `other`'s row where mask is True, this one's elsewhere (prompt dropout)."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            m = mask.reshape(-1, *([1] * (a.dim() - 1))).bool()
            return torch.where(m, b, a)
        return Conditioning(*(None if getattr(self, f.name) is None else
                              pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


def as_conditioning(cond: Conditioning | torch.Tensor) -> Conditioning:
    """A bare context tensor (Stable Diffusion 1.x / 2.x) as a Conditioning; a Conditioning as it is."""
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def family_of(pipe) -> Family:
    """sdxl when the pipeline has a second text encoder or its UNet takes text-time conditioning."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sdxl" if pipe.unet.config.get("addition_embed_type") == "text_time" else "sd"


def pixel_size(pipe, latent_side: int | None = None) -> int:
    """The image side drawn from a latent of `latent_side` (the UNet's own sample_size when None)."""
    side = pipe.unet.config.sample_size if latent_side is None else latent_side
    return side * 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def time_ids(size: int, n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """SDXL's micro-conditioning for square images of side `size`: (orig h, orig w, crop top, crop left,
    target h, target w) = (size, size, 0, 0, size, size), one row per sample."""
    return torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype, device=device).repeat(n, 1)


def sdxl_conditioning(first, second, time_ids: torch.Tensor) -> Conditioning:
    """SDXL's conditioning from both text encoders' outputs (run with output_hidden_states=True; the second
    with its projection): the penultimate hidden states side by side, the second's projected embedding."""
    context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return Conditioning(context, second.text_embeds, time_ids.to(context.dtype))


@torch.no_grad()
def encode(pipe, prompts: list[str], device: torch.device | str = "cpu", latent_side: int | None = None
           ) -> Conditioning:
    """The conditioning of `prompts`, exactly as the family's stock pipeline computes it."""
    if family_of(pipe) == "sd":
        return Conditioning(pipe.text_encoder(padded_token_ids(pipe.tokenizer, prompts).to(device))[0])
    first, second = (encoder(padded_token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
                     for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                                (pipe.tokenizer_2, pipe.text_encoder_2)))
    return sdxl_conditioning(first, second, time_ids(pixel_size(pipe, latent_side), len(prompts), device=device))


@torch.no_grad()
def encode_empty(pipe, device: torch.device | str = "cpu", latent_side: int | None = None) -> Conditioning:
    """The unconditional branch of classifier-free guidance (a batch of one): the empty prompt's encoding,
    or zeros for the context and the pooled embedding when the pipeline forces them (SDXL base)."""
    empty = encode(pipe, [""], device, latent_side)
    if family_of(pipe) == "sdxl" and pipe.config.get("force_zeros_for_empty_prompt", False):
        return Conditioning(torch.zeros_like(empty.context), torch.zeros_like(empty.text_embeds), empty.time_ids)
    return empty
