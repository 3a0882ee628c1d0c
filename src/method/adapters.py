"""LoRA adapters on the teacher UNet (PEFT): switching them on and off, their parameters and tensors,
merging one into plain UNet weights. One UNet carries the LoRA teacher (the student-score network,
adapter `SCORE`) and, for the LoRA student, the student's adapter `STUDENT`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Adapter names on the teacher UNet: the LoRA teacher (the student-score network) and the LoRA student.
SCORE, STUDENT = "default", "student"


def adapter_params(unet, name: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of adapter `name`."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{name}." in n]


def adapter_state(unet, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s LoRA tensors, keyed as in the UNet's state dict (a checkpoint's lora.pt)."""
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items() if "lora_" in k and f".{name}." in k}


def merge_adapter(unet, name: str):
    """A plain UNet2DConditionModel with adapter `name` merged into its base weights (W + scale B A);
    the other adapters are left out. What a stock diffusers pipeline loads. The weights the adapter
    does not touch are shared with `unet`, not copied (a second 3.5 GB UNet at SD size)."""
    from diffusers import UNet2DConditionModel
    from peft.tuners.lora import LoraLayer

    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        for module_name, module in unet.named_modules():
            if isinstance(module, LoraLayer) and name in module.lora_A:
                key = f"{module_name}.weight"
                state[key] = state[key] + module.get_delta_weight(name).to(state[key].dtype)
    with torch.device("meta"):
        merged = UNet2DConditionModel.from_config(unet.config)
    merged.load_state_dict(state, assign=True)
    return merged


@contextlib.contextmanager
def adapters(unet, enabled: bool, name: str | None = None) -> Iterator[None]:
    """Run `unet` with its LoRA adapters on (the LoRA teacher; adapter `name` when given, else the
    active one) or off (the frozen teacher).

    Which parameters train is left as it was: PEFT's toggles also flip `requires_grad` of the
    adapters they switch off, and a leaf that stops requiring grad between the forward pass and
    `backward()` silently receives no gradient (the LoRA student shares this UNet). Works through
    a DistributedDataParallel wrapper (toggles the wrapped module).
    """
    unet = getattr(unet, "module", unet)
    flags = [(p, p.requires_grad) for n, p in unet.named_parameters() if "lora_" in n]
    if enabled:
        unet.enable_adapters()
        if name is not None:
            unet.set_adapter(name)
    else:
        unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)
