"""A student as a LoRA of its teacher: the truncated-SVD extraction of a full student's UNet change, a PEFT
adapter read out of the LoRA student, and the LoRA folder in diffusers' and kohya's formats
(`python -m src.lora`; docs/export-inference.md, "The student as a LoRA").

Each Linear and Conv2d weight's difference dW = W_student - W_teacher, seen as an (out, in * kh * kw)
matrix, is replaced by its best rank-r approximation (truncated SVD; Eckart-Young: no rank-r matrix is
closer in Frobenius norm): dW ~ up @ down with up = U_r sqrt(S_r) (a 1x1 convolution for a Conv2d) and
down = sqrt(S_r) V_r^T (the layer's own kernel, stride and padding), r = min(rank, out, in * kh * kw),
alpha = r (scale 1). Bias and normalisation changes cannot ride on a LoRA and stay the teacher's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.fileio import atomic_dir

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


@dataclass(frozen=True)
class Extracted:
    """A LoRA in PEFT's key names (`<module>.lora_A.weight` = down, `.lora_B.weight` = up) with its ranks."""

    state: dict[str, torch.Tensor]
    ranks: dict[str, int]                  # module name -> its rank
    kept: float = 1.0                      # the fraction of sum ||dW||^2 the ranks keep
    left_out: float = 0.0                  # ||d(bias, norm)|| / ||d(everything)||: what a LoRA cannot carry


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, kept energy) of a weight difference (out, in, *kernel): the truncated SVD of its
    (out, in * prod(kernel)) matrix, split sqrt(S) to each side; down keeps the kernel, up is 1x1."""
    out = delta.shape[0]
    matrix = delta.reshape(out, -1).double()
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = max(1, min(rank, s.numel()))
    root = s[:r].sqrt()
    up = (u[:, :r] * root).reshape(out, r, *([1] * (delta.dim() - 2)))
    down = (root[:, None] * vh[:r]).reshape(r, *delta.shape[1:])
    total = float((s ** 2).sum())
    kept = float((s[:r] ** 2).sum()) / total if total > 0 else 1.0
    return down.to(delta.dtype).contiguous(), up.to(delta.dtype).contiguous(), kept


def targets(unet) -> dict[str, torch.nn.Module]:
    """The UNet's Linear and Conv2d modules by name: what the LoRA adapts."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def extract(student_unet, teacher_unet, rank: int) -> Extracted:
    """The rank-`rank` LoRA of `student_unet` on `teacher_unet` (same config); modules whose weight did
    not change are left out."""
    if rank < 1:
        raise UserError(f"--rank {rank}: expected a rank of at least 1")
    student, teacher = student_unet.state_dict(), teacher_unet.state_dict()
    if student.keys() != teacher.keys():
        raise UserError("lora: the student's UNet and the teacher's have different weights (not the same "
                        "architecture; distill the student from this teacher)")
    state, ranks, energy, kept_energy = {}, {}, 0.0, 0.0
    covered = set()
    for name in targets(teacher_unet):
        key = f"{name}.weight"
        covered.add(key)
        delta = student[key].float() - teacher[key].float()
        total = float((delta.double() ** 2).sum())
        if total == 0.0:
            continue
        down, up, kept = low_rank(delta, rank)
        state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        ranks[name] = down.shape[0]
        energy, kept_energy = energy + total, kept_energy + kept * total
    rest = sum(float(((student[k].float() - teacher[k].float()).double() ** 2).sum())
               for k in student if k not in covered)
    return Extracted(state, ranks, kept_energy / energy if energy else 1.0,
                     (rest / (rest + energy)) ** 0.5 if rest + energy else 0.0)


def from_adapter(unet, name: str) -> Extracted:
    """A PEFT adapter `name` on a UNet (the LoRA student) as an Extracted LoRA with its scale folded into up."""
    from peft.tuners.lora import LoraLayer

    state, ranks = {}, {}
    for module_name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            base = module_name.removesuffix(".base_layer")
            scale = module.scaling[name]
            down = module.lora_A[name].weight.detach().float().cpu().clone()
            up = module.lora_B[name].weight.detach().float().cpu() * scale
            state[f"{base}.lora_A.weight"], state[f"{base}.lora_B.weight"] = down.contiguous(), up.contiguous()
            ranks[base] = down.shape[0]
    return Extracted(state, ranks)


def apply(unet, lora: Extracted, scale: float = 1.0):
    """`unet` with W + scale * up @ down added in place (our own reading of the LoRA, for checks)."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in lora.ranks:
            down, up = lora.state[f"{name}.lora_A.weight"], lora.state[f"{name}.lora_B.weight"]
            w = modules[name].weight
            delta = (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double())
            w += scale * delta.reshape(w.shape).to(w.dtype)
    return unet


def adapter_metadata(lora: Extracted) -> dict:
    """The LoraConfig diffusers rebuilds on load: every module's own rank, alpha = rank (scale 1)."""
    common = max(set(lora.ranks.values()), key=list(lora.ranks.values()).count)
    pattern = {n: r for n, r in lora.ranks.items() if r != common}
    return {"r": common, "lora_alpha": common, "target_modules": sorted(lora.ranks), "rank_pattern": pattern,
            "alpha_pattern": dict(pattern), "lora_dropout": 0.0, "bias": "none", "init_lora_weights": True,
            "use_dora": False}


def kohya_state(lora: Extracted) -> dict[str, torch.Tensor]:
    """kohya's names (diffusers' own converter) with each module's alpha = its rank."""
    from diffusers.utils import convert_state_dict_to_kohya

    return {k: v.contiguous() for k, v in
            convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.state.items()}).items()}


def write(out: Path, lora: Extracted, pipeline_class: str, timestep: int | list[int], name: str,
          extra: dict | None = None) -> dict:
    """The LoRA folder (both formats, README.md, metrics.json), written whole or not at all. `timestep`: the
    student's, or an N-step student's timesteps."""
    import diffusers
    from safetensors.torch import save_file

    timesteps = [timestep] if isinstance(timestep, int) else list(timestep)
    timestep = timesteps[0]
    ranks = sorted(set(lora.ranks.values()))
    metrics = {"modules": len(lora.ranks), "ranks": ranks, "kept_energy": round(lora.kept, 6),
               "left_out_relative": round(lora.left_out, 6),
               "parameters": sum(v.numel() for v in lora.state.values()), "timestep": timestep} | (
        {"timesteps": timesteps} if len(timesteps) > 1 else {}) | (extra or {})
    with atomic_dir(out) as tmp:
        getattr(diffusers, pipeline_class).save_lora_weights(
            tmp, unet_lora_layers=lora.state, unet_lora_adapter_metadata=adapter_metadata(lora),
            weight_name=DIFFUSERS_FILE, safe_serialization=True)
        save_file(kohya_state(lora), str(tmp / f"{name}_kohya.safetensors"),
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                            "ss_network_alpha": str(max(ranks)), "swiftbrush_timestep": str(timestep)})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "README.md").write_text(card(pipeline_class, timesteps, name, metrics))
    return metrics


def card(pipeline_class: str, timesteps: list[int], name: str, m: dict) -> str:
    n, timestep = len(timesteps), timesteps[0]
    if n > 1:
        head, what = f"{n}-step", f"{n} UNet evaluations at timesteps {timesteps} draw"
        lcm = ""
    else:
        head, what = "One-step", f"one UNet evaluation at timestep {timestep} draws"
        lcm = f"""
LCM's scheduler with `timesteps=[{timestep}]` is the stock way to run one step at the student's timestep and
return its clean-image estimate; guidance stays off (the student learned the guided teacher).
`pipe.fuse_lora()` folds it into the weights for speed, `pipe.unfuse_lora()` gives the teacher back.
"""
    return f"""# {head} SwiftBrush student as a LoRA of its teacher

Load it on the teacher's pipeline; {what} the student's image.
Ranks {', '.join(map(str, m['ranks']))} over {m['modules']} Linear and Conv2d modules of the UNet
({m['parameters']:,} parameters); they keep {100 * m['kept_energy']:.2f}% of the weight change.

```python
import torch
from diffusers import LCMScheduler, {pipeline_class}

pipe = {pipeline_class}.from_pretrained("path/to/the/teacher", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("path/to/this/folder")          # {DIFFUSERS_FILE}
pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
image = pipe(prompt, num_inference_steps={n}, timesteps={timesteps}, guidance_scale=0).images[0]
```
{lcm}
ComfyUI and AUTOMATIC1111: `{name}_kohya.safetensors` (kohya's key names, alpha = rank per module) in their
LoRA folders, at strength 1.0, with the LCM sampler, {n} step{'s' if n > 1 else ''}, CFG 1.
"""
