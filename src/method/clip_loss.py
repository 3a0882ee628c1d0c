"""SwiftBrush v2's clamped CLIP loss (docs/design.md, "SwiftBrush v2, the parts adopted"), optional in distill.

    loss = mean_i max(0, tau - cos(E_img(decode(x0_i)), E_txt(prompt_i)))

The student's x0 is decoded by the (frozen) teacher VAE, resized and normalised as the CLIP's
image processor expects, and compared with the prompt's CLIP text embedding; the clamp at
`tau` stops the push once an image is "aligned enough", so the CLIP cannot be over-optimised
into adversarial patterns. The guide CLIP must not be the evaluator's (in the embedded world it
is models/guide, trained with its own seed), or the evaluation would score its own training signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.errors import UserError


@dataclass
class ClipLoss:
    model: torch.nn.Module            # transformers CLIPModel, frozen
    tokenizer: object
    mean: torch.Tensor                # (1, 3, 1, 1) image normalisation of the CLIP's processor
    std: torch.Tensor
    size: int                         # the CLIP's input side in pixels
    tau: float = 0.35                 # SwiftBrush v2: 0.35 (for OpenAI CLIP's cosine scale)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.mean.device)
        return F.normalize(_features(self.model.get_text_features(input_ids=ids)), dim=-1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) in [0, 1], differentiable."""
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        pixels = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    def __call__(self, images: torch.Tensor, text_features: torch.Tensor):
        cos = (self.image_features(images) * text_features.to(images.dtype)).sum(dim=-1)
        loss = torch.clamp(self.tau - cos, min=0).mean()
        return loss, {"loss_clip": loss.detach(), "clip_cos": cos.detach().mean()}


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers < 5) or an output object with pooler_output."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_clip_loss(path: str, tau: float, device: torch.device | str = "cpu") -> ClipLoss:
    """A ClipLoss from a transformers CLIP folder (CLIPModel + CLIPProcessor files), frozen, fp32."""
    from transformers import CLIPModel, CLIPProcessor

    folder = Path(path)
    hint = ("build the world's with `python -m src.world.build --only-guide`, or give a folder written by "
            "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    if not (folder / "config.json").is_file():
        raise UserError(f"distill.clip_model: {folder} is not a transformers CLIP folder (no config.json); {hint}")
    try:
        model = CLIPModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).to(device).eval().requires_grad_(False)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"distill.clip_model: cannot load a CLIP model and processor from {folder} ({e}); {hint}")
    proc = processor.image_processor
    crop = proc.crop_size
    size = int(crop["height"]) if not isinstance(crop, int) else crop     # dict or transformers' SizeDict
    shape = (1, 3, 1, 1)
    return ClipLoss(model, processor.tokenizer,
                    torch.tensor(proc.image_mean, device=device).reshape(shape),
                    torch.tensor(proc.image_std, device=device).reshape(shape), size, tau)
