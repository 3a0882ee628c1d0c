"""The distill stage: SwiftBrush variational score distillation into a one-step student.

    python -m src.distill                 # as the DVC stage `distill` runs it
    python -m src.distill --dry-run       # print the resolved `distill` section (+ lr) and exit
    python -m src.distill --set distill.processes=2      # two processes that train together (DDP)

Student = a copy of the teacher UNet, fed pure noise labelled t = T-1 (the paper) or
`student_timestep` (src/method/onestep.py). Each step: (1) the student
makes x0 for a batch of prompts; (2) VSDLoss moves it along (1 - abar_t)(eps_teacher -
eps_lora) (CFG on the teacher, and on the LoRA teacher unless `lora_guidance_scale` says
otherwise; see src/method/vsd.py), plus SwiftBrush v2's clamped CLIP loss on the decoded image when
`clip_model` is set (src/method/clip_loss.py); (3) LoRALoss fits the LoRA teacher to the student's
detached samples; (4) optional EMA; (5) log / validate / checkpoint. Killed runs resume from
the last complete checkpoint in `checkpoints/` (a DVC `persist: true` output); every random
draw is a function of (seed, rank, step), so a resumed run continues exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import numpy as np
import torch

from .artifact.card import student_card
from .artifact.lora import Extracted, from_adapter
from .artifact.lora import write as write_lora
from .core import checkpoint
from .core.checkpoint import EMA_FILE, load_ema, save_ema, student_ema
from .core.config import DistillConfig, stage_config
from .core.errors import UserError, run_cli
from .core.fileio import atomic_dir, write_json
from .core.launch import launched_world, spawn
from .core.prompts import derive_seed, read_prepared
from .core.sharding import full, load_sharded, move_files, save_sharded, shard_by_size
from .method.adapters import SCORE, STUDENT, adapter_params, adapter_state, adapters, merge_adapter
from .method.conditioning import Conditioning, encode, encode_empty, family_of
from .method.onestep import (decode, initial_latents, one_step_images, one_step_scheduler, student_sample,
                             student_timestep, student_timesteps)
from .method.teacher import FROZEN, alphas_cumprod, frozen_parts, load_pipeline, load_tiny_decoder
from .method.sid import SiDLoss
from .method.vsd import LoRALoss, VSDLoss

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import EMAModel

    from .method.clip_loss import ClipLoss


@dataclass(frozen=True)
class Paths:
    """Where the stage reads and writes (DVC deps/outs; the CLI defaults match dvc.yaml)."""

    train_prompts: Path = Path("prompts/train.jsonl")
    eval_prompts: Path = Path("prompts/eval.jsonl")
    checkpoints: Path = Path("checkpoints")
    student: Path = Path("models/student")
    reports: Path = Path("reports/distill")
    tiny_decoder: Path | None = None      # the top-level tiny_decoder (distill.clip_decoder: tiny)


class NonFiniteError(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def batch_indices(n_prompts: int, batch: int, step: int, rank: int, world: int, seed: int) -> list[int]:
    """Prompt indices of one process at one step: seeded epoch permutations, sharded by rank.

    A pure function of its arguments, so resuming needs no data-loader state; the global
    batch wraps into the next epoch instead of dropping a partial tail.
    """
    out = []
    start = (step * world + rank) * batch
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n_prompts)
        perm = np.random.default_rng(derive_seed(seed, "epoch", epoch)).permutation(n_prompts)
        out.append(int(perm[i]))
    return out


# The modules whose code decides the training trajectory; editing one invalidates checkpoints.
def method_sources() -> list[Path]:
    """This stage and every module of src/method/ (a new one is never left out), and the prompt tokenisation."""
    src = Path(__file__).parent
    return [src / "distill.py", *sorted((src / "method").glob("*.py")), src / "core" / "text.py"]


def fingerprint(cfg: DistillConfig, lr: float, seed: int, inputs: str = "") -> str:
    """What must match for a checkpoint to be resumed (everything that changes the trajectory).

    `inputs`: a digest of what the settings do not show (the method's code, the prompt file),
    so that `dvc repro` after a code change trains afresh instead of reloading the old run.
    """
    ignore = {"checkpoint_every", "keep_checkpoints", "log_every", "val_every"}
    if cfg.lr_schedule == "constant" and (cfg.clip_model is None or cfg.clip_schedule == "constant") \
            and cfg.t_max_end is None:
        ignore.add("steps")          # a longer run without step-dependent schedules continues the same trajectory
    keep = cfg.model_dump(exclude=ignore)
    text = json.dumps({"distill": keep, "lr": lr, "seed": seed, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def inputs_digest(train_prompts: Path, tiny_decoder: Path | None = None) -> str:
    """SHA-256 of the method's source files, the training prompt file and (if used) the tiny decoder's files."""
    h = hashlib.sha256()
    extra = sorted(p for p in tiny_decoder.rglob("*") if p.is_file()) if tiny_decoder else []
    for path in method_sources() + [train_prompts] + extra:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def student_lr(base: float, step: int, total: int, schedule: str) -> float:
    """The student's learning rate at `step`: constant (paper) or cosine from `base` down to base / 10."""
    if schedule == "constant":
        return base
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))


def clip_weight(base: float, step: int, total: int, schedule: str) -> float:
    """The CLIP-loss weight at `step`: constant, or decayed linearly to 0 at the end (SwiftBrush v2)."""
    return base if schedule == "constant" else base * max(0.0, 1 - step / max(total, 1))


def save_student(out: Path, pipe, student, timestep: int, lora: Extracted | None = None, steps: int = 1) -> None:
    """A complete diffusers pipeline of the teacher's family: student UNet, the teacher's other parts, a
    one-step scheduler at the student's timestep (one DDIM step there with alpha_prev = 1 returns exactly
    its x0); for a LoRA student also its adapter as `lora/` (diffusers' and kohya's formats, for the teacher).
    An N-step student records its step count and timesteps in swiftbrush.json (read back by `steps_of`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = one_step_scheduler(pipe.scheduler, timestep)
    if family_of(pipe) == "sdxl":
        one = StableDiffusionXLPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=student, scheduler=scheduler,
            force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True))
    else:
        one = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                      unet=student, scheduler=scheduler, safety_checker=None,
                                      feature_extractor=None, requires_safety_checker=False)
    with atomic_dir(out) as tmp:
        one.save_pretrained(tmp, safe_serialization=True)
        timesteps = student_timesteps(timestep, steps)
        made = {"one_step": True, "num_inference_steps": 1, "guidance_scale": 1.0, "timestep": timestep,
                "note": "call the pipeline with num_inference_steps=1, guidance_scale=1.0"}
        if steps > 1:
            made |= {"one_step": False, "num_inference_steps": steps, "timesteps": timesteps,
                     "note": f"call the pipeline with LCMScheduler, num_inference_steps={steps}, "
                             f"timesteps={timesteps}, guidance_scale=0 (README.md)"}
        (tmp / "swiftbrush.json").write_text(json.dumps(made, indent=2))
        (tmp / "README.md").write_text(student_card(type(one).__name__, timesteps, made))
        if lora is not None:
            write_lora(tmp / "lora", lora, type(one).__name__, timesteps, "student_lora")


@dataclass
class Run:
    """What the training loop works on: the models, optimisers and losses `setup` builds, and where
    `resume` starts. The student is a copy of the teacher UNet (full) or an adapter on it (lora)."""

    acc: Accelerator
    pipe: StableDiffusionPipeline         # the teacher's pipeline (text encoder, VAE, tokenizer)
    teacher: torch.nn.Module              # frozen teacher + the LoRA teacher (adapter SCORE) on one UNet
    student: torch.nn.Module
    student_params: list
    lora_params: list
    opt_student: torch.optim.Optimizer
    opt_lora: torch.optim.Optimizer
    ema: EMAModel | None
    student_loss: VSDLoss | SiDLoss       # distill.loss
    lora_loss: LoRALoss
    clip_loss: ClipLoss | None
    clip_decoder: torch.nn.Module         # decodes x0 for the CLIP loss: the teacher's VAE or a tiny decoder
    as_student: Callable[[torch.nn.Module], ContextManager[None]]   # context: the student's weights active in `student`
    uncond: Conditioning                  # the empty prompt's (a batch of one; SDXL base: zeros)
    abar: torch.Tensor
    t_student: int
    timesteps: list[int]                  # the student's steps: [t_student] for one, then lower (student_steps)
    prediction: str
    frozen: torch.dtype
    shape: tuple[int, int, int]           # the student's latent (C, h, w)
    prompts: list[str]
    val_records: list[dict]
    fingerprint: str = ""
    start: int = 0
    live_step: int = 0
    resumed: bool = False


def setup(cfg: DistillConfig, lr: float, seed: int, paths: Paths) -> Run:
    """Models, optimisers and losses, before any checkpoint is read."""
    from accelerate import Accelerator
    from peft import LoraConfig

    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    if acc.num_processes != cfg.processes:
        raise UserError(f"distill.processes is {cfg.processes}, but this run has {acc.num_processes} process(es) "
                        f"(accelerate launch / torchrun); set --set distill.processes={acc.num_processes}, or start "
                        f"it as `python -m src.distill`, which starts distill.processes itself. The global batch is "
                        f"processes x batch_size")
    device = acc.device
    prompts = [r["prompt"] for r in read_prepared(paths.train_prompts)]
    val_records = read_prepared(paths.eval_prompts, cfg.val_prompts) if paths.eval_prompts.is_file() else []
    if cfg.student == "lora" and acc.num_processes > 1:
        raise UserError("distill.student: lora trains in one process (its adapter shares the teacher's UNet, "
                        "which DDP cannot wrap twice); use distill.student: full with several processes")
    frozen = getattr(torch, cfg.frozen_dtype)
    pipe = load_pipeline(cfg.teacher, frozen_dtype=frozen)
    for name in FROZEN[family_of(pipe)]:           # text encoder(s) and VAE; a force_upcast VAE stays float32
        part = getattr(pipe, name)
        part.requires_grad_(False).to(device, part.dtype if name == "vae" and part.dtype != frozen else frozen)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    abar = alphas_cumprod(pipe).to(device)
    t_student = student_timestep(abar, cfg.student_timestep)                          # T-1 unless set
    latent = latent_size(pipe, cfg.resolution)
    pipe.unet.register_to_config(sample_size=latent)         # the student is trained and saved at this size
    teacher = pipe.unet.requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True) if cfg.student == "full" else teacher
    torch.manual_seed(derive_seed(seed, "lora-init"))  # LoRA A matrices are drawn from the global RNG
    teacher.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                   target_modules=list(cfg.lora_targets), init_lora_weights=True), SCORE)
    lora_params = adapter_params(teacher, SCORE)
    if cfg.student == "lora":        # SwiftBrush v2's efficient student: B = 0 at the start, so it is the teacher
        torch.manual_seed(derive_seed(seed, "student-lora-init"))
        teacher.add_adapter(LoraConfig(r=cfg.student_lora_rank, lora_alpha=cfg.student_lora_alpha,
                                       target_modules=list(cfg.student_lora_targets), init_lora_weights=True),
                            STUDENT)
        student_params = adapter_params(teacher, STUDENT)
    else:
        student_params = list(student.parameters())
    for p in lora_params + student_params:
        p.requires_grad_(True)
    if cfg.sharding == "fsdp":      # each process keeps 1/N of both UNets; their parameters become DTensors
        for unet in (student, teacher):
            shard_by_size(unet, cfg.fsdp_min_params)
        student_params, lora_params = list(student.parameters()), adapter_params(teacher, SCORE)
    else:                           # FSDP shards contiguous weights only
        student.to(memory_format=torch.channels_last)    # 4-D weights NHWC: the step is 1.06x faster on this
        teacher.to(memory_format=torch.channels_last)    # CPU (oneDNN; reports/distill/sweep.md); same mathematics
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
        teacher.enable_gradient_checkpointing()
    mode = compile_mode(cfg.compile, device)
    if mode is not None:
        for unet in {id(m): m for m in (student, teacher)}.values():    # one UNet when the student is a LoRA
            unet.compile(mode=mode, dynamic=False)                      # in place: parameter names unchanged
    clip_loss = None
    uncond = encode_empty(pipe, device, latent).float()
    if cfg.clip_model is not None:
        from .method.clip_loss import load_clip_loss

        clip_loss = load_clip_loss(cfg.clip_model, cfg.clip_tau, device)
    clip_decoder = pipe.vae
    if cfg.clip_decoder == "tiny":
        if paths.tiny_decoder is None:
            raise UserError("distill.clip_decoder: tiny needs the top-level tiny_decoder (a TAESD-format folder)")
        clip_decoder = load_tiny_decoder(paths.tiny_decoder, pipe.vae, frozen).to(device)
    return Run(
        acc=acc, pipe=pipe, teacher=teacher, student=student, student_params=student_params, lora_params=lora_params,
        opt_student=torch.optim.Adam(student_params, lr=lr, **adam_options(cfg.adam_impl)),
        opt_lora=torch.optim.Adam(lora_params, lr=cfg.lora_lr, **adam_options(cfg.adam_impl)),
        ema=student_ema(student_params, cfg.ema_decay),
        student_loss=student_loss(cfg, prediction), lora_loss=lora_loss(cfg, prediction), clip_loss=clip_loss,
        clip_decoder=clip_decoder,
        as_student=student_mode(cfg.student), uncond=uncond, abar=abar, t_student=t_student,
        timesteps=student_timesteps(t_student, cfg.student_steps), prediction=prediction,
        frozen=frozen, shape=(student.config.in_channels, latent, latent), prompts=prompts, val_records=val_records,
        fingerprint=fingerprint(cfg, lr, seed, inputs_digest(
            paths.train_prompts, paths.tiny_decoder if cfg.clip_decoder == "tiny" else None)))


def student_loss(cfg: DistillConfig, prediction: str) -> VSDLoss | SiDLoss:
    """The student's distillation loss of distill.loss, with its guidance scales and timestep range."""
    fake_scale = cfg.guidance_scale if cfg.lora_guidance_scale is None else cfg.lora_guidance_scale
    if cfg.loss == "sid":
        return SiDLoss(cfg.sid_alpha, cfg.guidance_scale, fake_scale, cfg.t_min, cfg.t_max, cfg.reduction, prediction,
                       SCORE)
    return VSDLoss(cfg.guidance_scale, cfg.t_min, cfg.t_max, cfg.reduction, prediction, fake_scale, SCORE)


def lora_loss(cfg: DistillConfig, prediction: str) -> LoRALoss:
    """The LoRA teacher's denoising loss: SwiftBrush's (abar-weighted or uniform as set, t over the whole
    schedule) or, for distill.loss: sid, SiD's (uniform, t in [t_min, t_max])."""
    if cfg.loss == "sid":
        return LoRALoss(cfg.p_uncond, prediction, "uniform", SCORE, cfg.lora_train_guidance_scale, cfg.t_min, cfg.t_max)
    return LoRALoss(cfg.p_uncond, prediction, cfg.lora_weighting, SCORE, cfg.lora_train_guidance_scale)


def t_max_at(cfg: DistillConfig, step: int) -> int:
    """The distillation loss's highest timestep at `step`: t_max, or moved linearly from t_max to t_max_end."""
    if cfg.t_max_end is None:
        return cfg.t_max
    return round(cfg.t_max + (cfg.t_max_end - cfg.t_max) * min(step, cfg.steps) / max(cfg.steps, 1))


def resume(run: Run, cfg: DistillConfig, paths: Paths) -> None:
    """Load the latest checkpoint of this run's settings (if any), then wrap the models for the processes."""
    acc = run.acc
    t_resume = time.perf_counter()
    found = checkpoint.latest(paths.checkpoints, max_step=cfg.steps)   # a longer run's later ones are not ours
    if acc.is_main_process and checkpoint.discard_after(paths.checkpoints, cfg.steps):
        acc.print(f"checkpoints in {paths.checkpoints} beyond distill.steps={cfg.steps} (a longer run) removed")
    if found and found[1].get("fingerprint") != run.fingerprint:
        acc.print(f"checkpoints in {paths.checkpoints} belong to other settings, code or prompts; starting afresh")
        if acc.is_main_process:
            shutil.rmtree(paths.checkpoints, ignore_errors=True)
        found = None
    if found and cfg.sharding == "fsdp":
        folder, state = found
        load_sharded_run(run, folder, state)
        run.start, run.live_step, run.resumed = state["step"], state["live_step"], True
        acc.print(f"resuming from {folder} (step {run.start}; sharded; verified and loaded in "
                  f"{time.perf_counter() - t_resume:.1f} s)")
    elif found:
        folder, state = found
        saved = torch.load(folder / "student.pt", map_location="cpu", weights_only=True)
        if cfg.student == "full":
            run.student.load_state_dict(saved)
        else:
            run.teacher.load_state_dict(saved, strict=False)
        run.teacher.load_state_dict(torch.load(folder / "lora.pt", map_location="cpu", weights_only=True),
                                    strict=False)
        run.opt_student.load_state_dict(torch.load(folder / "opt_student.pt", weights_only=True))
        run.opt_lora.load_state_dict(torch.load(folder / "opt_lora.pt", weights_only=True))
        if run.ema is not None:
            load_ema(run.ema, folder / EMA_FILE)
        run.start, run.live_step, run.resumed = state["step"], state["live_step"], True
        acc.print(f"resuming from {folder} (step {run.start}; verified and loaded in "
                  f"{time.perf_counter() - t_resume:.1f} s)")
    if cfg.student == "full" and cfg.sharding == "none":
        run.student, run.opt_student, run.teacher, run.opt_lora = acc.prepare(
            run.student, run.opt_student, run.teacher, run.opt_lora)
    else:                               # one process (checked in setup), or sharded already: no DDP wrapper
        run.opt_student, run.opt_lora = acc.prepare(run.opt_student, run.opt_lora)
    if run.ema is not None:
        run.ema.to(acc.device)


def compile_mode(setting: str, device: torch.device) -> str | None:
    """The torch.compile mode for distill.compile, or None (eager). On CPU, inductor writes C++: without a
    compiler the run stays eager, with a warning, instead of failing at the first step."""
    if setting == "off":
        return None
    if device.type == "cpu":
        import os
        import shutil
        import warnings

        if shutil.which(os.environ.get("CXX", "g++")) is None:
            warnings.warn("distill.compile: no C++ compiler (g++, or $CXX) for torch.compile's CPU backend; "
                          "training runs eagerly", stacklevel=2)
            return None
    if setting == "auto":
        return "max-autotune" if device.type == "cuda" else "default"
    return setting


def phase(name: str):
    """A labelled range of the step for torch.profiler (`python -m src.bench.step_profile`); ~free otherwise."""
    return torch.profiler.record_function(f"step: {name}")


@dataclass
class StepResult:
    loss_distill: torch.Tensor            # the distillation loss (VSD or SiD; its own name in `stats`)
    loss_lora: torch.Tensor
    grad_norm_student: float
    grad_norm_lora: float
    ok_student: bool
    ok_lora: bool
    stats: dict
    clip_weight: float


def train_step(run: Run, cfg: DistillConfig, batch_prompts: list[str], z: torch.Tensor, gen: torch.Generator,
               step: int) -> StepResult:
    """One SwiftBrush step (docs/design.md, "The method"): the student's x0, its VSD update (+ v2's CLIP loss), then the
    LoRA teacher's update(s) on the detached x0."""
    acc, student, teacher = run.acc, run.student, run.teacher
    with phase("text encoder"):
        cond = encode(run.pipe, batch_prompts, acc.device, run.shape[-1]).float()       # context (B, 77, D), ...

    # 1-2. student update: VSD (or SiD) gradient through x0 = f(student(z, t_s, c)); an N-step student trains
    # one of its steps, drawn per batch, on the input its own earlier steps make (backward simulation)
    k = int(torch.randint(len(run.timesteps), (1,), generator=gen)) if len(run.timesteps) > 1 else 0
    with acc.autocast():
        with phase("student forward"), run.as_student(student):
            x0 = student_sample(student, z, cond, run.abar, run.prediction, run.timesteps, stop_at=k)  # (B, 4, h, w)
        loss_fn = run.student_loss if cfg.t_max_end is None else \
            dataclasses.replace(run.student_loss, t_max=t_max_at(cfg, step))
        with phase(f"{cfg.loss.upper()} scores (teacher, LoRA teacher)"):     # SiD builds a graph: no DDP wrapper
            loss_distill, stats = loss_fn(acc.unwrap_model(teacher), x0, cond, run.uncond, run.abar, gen)
        loss_student = loss_distill
        w_clip = clip_weight(cfg.clip_weight, step, cfg.steps, cfg.clip_schedule) if run.clip_loss else 0.0
        if w_clip > 0:      # v2: clamped CLIP loss on the decoded image, gradient through the frozen decoder
            with phase(f"CLIP loss forward ({cfg.clip_decoder} decode + CLIP)"):
                loss_c, cstats = run.clip_loss(decode(run.clip_decoder, x0.to(run.clip_decoder.dtype)).float(),
                                               run.clip_loss.text_features(batch_prompts))
            loss_student = loss_distill + w_clip * loss_c
            stats.update(cstats)
    with phase("student backward"), run.as_student(student):  # checkpointed blocks recompute under their adapter
        acc.backward(loss_student)
    with phase("student clip + Adam"):
        gnorm_s = full(acc.clip_grad_norm_(run.student_params, cfg.grad_clip))
        ok_s = _finite(loss_student, gnorm_s)
        _step_or_skip(run.opt_student, ok_s)

    # 3. LoRA-teacher update(s) on the detached student samples (fresh t and noise each)
    ok_l = True
    for _ in range(cfg.lora_updates):
        with phase("LoRA teacher forward"), acc.autocast():
            loss_lora, _ = run.lora_loss(teacher, x0.detach(), cond, run.uncond, run.abar, gen)
        with phase("LoRA teacher backward"), adapters(teacher, enabled=True, name=SCORE):
            acc.backward(loss_lora)
        with phase("LoRA teacher clip + Adam"):
            gnorm_l = full(acc.clip_grad_norm_(run.lora_params, cfg.grad_clip))
            ok = _finite(loss_lora, gnorm_l)
            _step_or_skip(run.opt_lora, ok)
        ok_l = ok_l and ok
    if run.ema is not None and ok_s:
        with phase("EMA"):
            run.ema.step(run.student_params)
    return StepResult(loss_distill, loss_lora, float(gnorm_s), float(gnorm_l), ok_s, ok_l, stats, w_clip)


def step_draws(run: Run, cfg: DistillConfig, seed: int, step: int, rank: int = 0,
               world: int = 1) -> tuple[torch.Generator, list[int], torch.Tensor]:
    """Every random draw of training step `step` on process `rank`: the generator the losses draw t and
    noise from, the batch's prompt indices and the student's input noise z (on the CPU). A function of
    (seed, rank, step) only, so a resumed run continues exactly."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "distill", rank, step))
    idx = batch_indices(len(run.prompts), cfg.batch_size, step, rank, world, seed)
    noise_shape = (run.shape[0] * len(run.timesteps), *run.shape[1:])     # an N-step student: N latents' noise
    z = initial_latents([int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for _ in idx], noise_shape)
    return gen, idx, z


def distill(cfg: DistillConfig, lr: float, seed: int, paths: Paths = Paths()) -> dict:
    """Run (or resume) the distillation; save the student pipeline; return the final metrics."""
    from tqdm import tqdm

    from .layout import resolve_teacher

    cfg = cfg.model_copy(update={"teacher": resolve_teacher(cfg.teacher, cfg.teacher_config)})
    run = setup(cfg, lr, seed, paths)
    resume(run, cfg, paths)
    acc, prompts = run.acc, run.prompts
    rank, world, main_process = acc.process_index, acc.num_processes, acc.is_main_process
    sharded = cfg.sharding == "fsdp"
    t_start, steps_run = time.perf_counter(), cfg.steps - run.start
    live = _open_live(paths.reports, resume=run.resumed, step=run.live_step) if main_process else None
    nonfinite = {"student": 0, "lora": 0}
    skipped = 0
    history: list[dict] = []
    t_log, samples_seen = time.perf_counter(), 0
    bar = tqdm(range(run.start, cfg.steps), initial=run.start, total=cfg.steps, desc="distill",
               disable=not main_process, mininterval=2)
    for step in bar:
        gen, idx, z = step_draws(run, cfg, seed, step, rank, world)
        lr_now = student_lr(lr, step, cfg.steps, cfg.lr_schedule)
        for group in run.opt_student.param_groups:
            group["lr"] = lr_now

        out = train_step(run, cfg, [prompts[i] for i in idx], z.to(acc.device), gen, step)

        skipped += count_nonfinite(nonfinite, out, cfg.max_nonfinite, step)
        samples_seen += cfg.batch_size * world
        done = step + 1

        # 4. log / validate / checkpoint
        if main_process and (done % cfg.log_every == 0 or done == cfg.steps):
            row = train_row(out, cfg, lr_now, time.perf_counter() - t_log, samples_seen, skipped)
            t_log, samples_seen = time.perf_counter(), 0
            for k, v in row.items():
                live.log_metric(f"train/{k}", v)
            bar.set_postfix({cfg.loss: f"{row[f'loss_{cfg.loss}']:.2e}", "lora": f"{row['loss_lora']:.3f}"},
                            refresh=False)
        if (main_process or sharded) and run.val_records and (done % cfg.val_every == 0 or done == cfg.steps):
            with shipped_weights(run.student_params, run.ema), run.as_student(run.student):   # sharded: every
                val = validate(run.pipe, acc.unwrap_model(run.student), run.val_records, run.abar,  # rank runs it
                               run.t_student, len(run.timesteps))
            if main_process:
                history.append({"step": done, **val})
                for k, v in val.items():
                    live.log_metric(f"val/{k}", v)
        if main_process and (done % cfg.log_every == 0 or done == cfg.steps):
            live.next_step()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            acc.wait_for_everyone()
            if sharded:                                   # every rank writes its shards
                line = checkpoint_sharded(run, cfg, paths, done, live.step if main_process else 0)
                if main_process:
                    bar.write(line)
            elif main_process:
                bar.write(checkpoint_run(run, cfg, paths, done, live.step))

    acc.wait_for_everyone()
    wall = time.perf_counter() - t_start
    result: dict = {"steps": cfg.steps, "skipped_steps": skipped, "validation": history,
                    "student_digest": check_ranks_in_sync(acc, acc.unwrap_model(run.student)),
                    "wall_s": round(wall, 1), "steps_per_s": round(steps_run / wall, 3) if wall else None,
                    "samples_per_s": round(steps_run * cfg.batch_size * world / wall, 2) if wall else None,
                    "peak_memory_mb": _peak_memory_mb(acc.device), "processes": world}
    final = gathered_student(run) if sharded else None      # every rank takes part; the main one gets it
    if main_process:
        finish(run, cfg, paths, result, history, final)
        live.end()
    return result


def count_nonfinite(nonfinite: dict[str, int], out: StepResult, limit: int, step: int) -> int:
    """Update the runs of consecutive skipped (non-finite) student and LoRA steps; stop the run with one
    clear error at `limit` in a row. Returns how many of this step's updates were skipped."""
    skipped = 0
    for name, ok in (("student", out.ok_student), ("lora", out.ok_lora)):
        nonfinite[name] = 0 if ok else nonfinite[name] + 1
        skipped += not ok
        if nonfinite[name] >= limit:
            raise NonFiniteError(f"distill: {limit} consecutive non-finite {name} steps at step {step} (loss or "
                                 "gradient NaN/inf); lower `lr`/`distill.lora_lr` or use mixed_precision: bf16 "
                                 "instead of fp16")
    return skipped


def train_row(out: StepResult, cfg: DistillConfig, lr_now: float, dt: float, samples_seen: int,
              skipped: int) -> dict[str, float]:
    """The logged training metrics of one step (`dt`: seconds since the last logged step)."""
    row = {**{k: float(v) for k, v in out.stats.items()}, "loss_lora": out.loss_lora.item(),
           "grad_norm_student": out.grad_norm_student, "grad_norm_lora": out.grad_norm_lora,
           "lr": lr_now, "lora_lr": cfg.lora_lr,
           "steps_per_s": cfg.log_every / dt if dt else 0.0,
           "samples_per_s": samples_seen / dt if dt else 0.0, "skipped_steps": skipped}
    if "loss_clip" in out.stats:
        row["clip_weight"] = out.clip_weight
    return row


def checkpoint_run(run: Run, cfg: DistillConfig, paths: Paths, done: int, live_step: int) -> str:
    """Write the checkpoint after `done` steps (main process); returns the line the progress bar prints."""
    acc, t_save = run.acc, time.perf_counter()
    folder = _save_checkpoint(paths.checkpoints, done, run.fingerprint, live_step, cfg.keep_checkpoints,
                              student_state(acc.unwrap_model(run.student), cfg.student),
                              adapter_state(acc.unwrap_model(run.teacher), SCORE), run.opt_student,
                              run.opt_lora, run.ema)
    size = sum(f.stat().st_size for f in folder.iterdir())
    return f"checkpoint {folder}: {size / 2**30:.2f} GiB written and hashed in {time.perf_counter() - t_save:.1f} s"


def finish(run: Run, cfg: DistillConfig, paths: Paths, result: dict, history: list[dict],
           final: torch.nn.Module | None = None) -> None:
    """Save the shipped student (EMA weights; a LoRA student merged into a plain UNet; `final` when the
    student was sharded and has been gathered) and the metrics."""
    acc = run.acc
    if final is None and cfg.student == "full":
        final = shipped(acc.unwrap_model(run.student), run.ema).eval()      # a copy holding the EMA weights
    lora = None
    if final is None and cfg.student == "lora":
        with shipped_weights(run.student_params, run.ema):   # merged tensors are new: they keep the EMA weights
            final = merge_adapter(run.teacher, STUDENT).eval()
            lora = from_adapter(run.teacher, STUDENT)      # copies: also the EMA weights
    if run.val_records:
        result["final"] = validate(run.pipe, final, run.val_records, run.abar, run.t_student, len(run.timesteps))
    final = final.to(memory_format=torch.contiguous_format)                        # safetensors wants contiguous
    pipe = run.pipe
    if run.frozen != torch.float32:     # ship the teacher's own float32 text encoder(s) and VAE, not rounded copies
        for name in FROZEN[family_of(pipe)]:
            setattr(pipe, name, None)
        for name, part in frozen_parts(cfg.teacher, torch.float32).items():
            setattr(pipe, name, part)
    save_student(paths.student, pipe, final, run.t_student, lora, len(run.timesteps))
    write_json(paths.reports / "metrics.json", {k: v for k, v in result.items() if k != "validation"}
               | {"val_curve": history})


def sharded_state(run: Run) -> dict:
    """What a sharded checkpoint holds, as DCP state dicts of this process's shards: the student, the LoRA
    teacher's adapter, both optimisers and the EMA's shadow weights."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    lora = {k: v for k, v in get_model_state_dict(run.teacher).items() if "lora_" in k and f".{SCORE}." in k}
    state = {"student": get_model_state_dict(run.student), "lora": lora,
             "opt_student": get_optimizer_state_dict(run.student, _bare(run.opt_student)),
             "opt_lora": get_optimizer_state_dict(run.teacher, _bare(run.opt_lora))}
    if run.ema is not None:
        state["ema"] = {f"{i:06d}": t for i, t in enumerate(run.ema.shadow_params)}
    return state


def _bare(optimizer):
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def checkpoint_sharded(run: Run, cfg: DistillConfig, paths: Paths, done: int, live_step: int) -> str:
    """Every rank writes its shards into a staging folder; the main one moves them into a checkpoint folder
    with the manifest (written and verified as any checkpoint). Returns the main rank's line."""
    acc, t_save = run.acc, time.perf_counter()
    staging = paths.checkpoints / f".step-{done:06d}.shards.tmp"     # a killed run's leftover is removed
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    acc.wait_for_everyone()
    save_sharded(sharded_state(run), staging)
    acc.wait_for_everyone()
    line = ""
    if acc.is_main_process:
        state = {"fingerprint": run.fingerprint, "live_step": live_step, "processes": acc.num_processes}
        if run.ema is not None:
            state["ema"] = {k: v for k, v in run.ema.state_dict().items() if k != "shadow_params"}
        folder = checkpoint.save(paths.checkpoints, done, state, lambda tmp: move_files(staging, tmp),
                                 cfg.keep_checkpoints)
        size = sum(f.stat().st_size for f in folder.iterdir())
        line = (f"checkpoint {folder}: {size / 2**30:.2f} GiB in {acc.num_processes} shards, written and hashed in "
                f"{time.perf_counter() - t_save:.1f} s")
    acc.wait_for_everyone()
    return line


def load_sharded_run(run: Run, folder: Path, state: dict) -> None:
    """Load a sharded checkpoint into this process's shards (written by as many processes)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if state.get("processes") != run.acc.num_processes:
        raise UserError(f"{folder} was written by {state.get('processes')} sharded processes; this run has "
                        f"{run.acc.num_processes} (set distill.processes={state.get('processes')} to resume it)")
    shards = sharded_state(run)
    load_sharded(shards, folder)
    set_model_state_dict(run.student, shards["student"])
    set_model_state_dict(run.teacher, shards["lora"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(run.student, _bare(run.opt_student), shards["opt_student"])
    set_optimizer_state_dict(run.teacher, _bare(run.opt_lora), shards["opt_lora"])
    if run.ema is not None:
        run.ema.load_state_dict({**state["ema"], "shadow_params": list(shards["ema"].values())})


def gathered_student(run: Run) -> torch.nn.Module | None:
    """The shipped weights (EMA when enabled) of a sharded student, whole, as a plain UNet on the main process
    (None elsewhere). Every process must call it: the shards are gathered."""
    from diffusers import UNet2DConditionModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    with shipped_weights(run.student_params, run.ema):
        whole = get_model_state_dict(run.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not run.acc.is_main_process:
        return None
    model = UNet2DConditionModel.from_config(run.student.config)
    model.load_state_dict(whole)
    return model.eval()


def adam_options(impl: str) -> dict:
    """torch.optim.Adam keyword arguments for `distill.adam_impl` (the same update, other memory)."""
    return {"auto": {}, "for_loop": {"foreach": False}, "foreach": {"foreach": True},
            "fused": {"fused": True}}[impl]


def student_state(student, kind: str) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of the student: every weight (full) or its adapter only (lora)."""
    return student.state_dict() if kind == "full" else adapter_state(student, STUDENT)


def student_mode(kind: str):
    """Context in which a UNet call is the student's: nothing to switch for a full copy; for the LoRA
    student, its adapter on (and the LoRA teacher's off)."""
    if kind == "full":
        return lambda unet: contextlib.nullcontext()
    return lambda unet: adapters(unet, enabled=True, name=STUDENT)


@contextlib.contextmanager
def shipped_weights(params: list[torch.nn.Parameter], ema):
    """Inside: the student's parameters hold the weights that ship (the EMA average when enabled)."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def latent_size(pipe, resolution: int | None) -> int:
    """The latent side for `distill.resolution` (None: the teacher UNet's own sample_size)."""
    if resolution is None:
        return int(pipe.unet.config.sample_size)
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    multiple = vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise UserError(f"distill.resolution = {resolution}: this teacher needs a multiple of {multiple} "
                        f"(VAE downsampling {vae_scale} x the UNet's {multiple // vae_scale}); "
                        f"its native size is {pipe.unet.config.sample_size * vae_scale}")
    return resolution // vae_scale


def shipped(student, ema):
    """The weights that are saved: the EMA average when enabled (validated too), else the student itself."""
    if ema is None:
        return student
    model = copy.deepcopy(student)
    ema.copy_to(model.parameters())
    return model


def check_ranks_in_sync(acc, model) -> float:
    """A checksum of the student's weights, compared across processes (DDP must keep them equal)."""
    with torch.no_grad():       # a sharded weight is gathered whole (every rank, one weight at a time)
        digest = torch.stack([full(p.detach()).double().sum() * (i + 1)
                              for i, p in enumerate(model.parameters())]).sum()
    # One write per line, so that the ranks' lines do not interleave mid-line.
    print(f"rank {acc.process_index}: student digest {digest.item():.17g}\n", end="", flush=True)
    if acc.num_processes > 1:
        every = acc.gather(digest.to(acc.device).reshape(1))
        if not torch.all(every == every[0]):
            raise RuntimeError(f"distill: ranks hold different student weights after training: {every.tolist()}")
    return float(digest)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else the process's peak resident memory."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _finite(loss: torch.Tensor, grad_norm) -> bool:
    return bool(torch.isfinite(loss).item()) and bool(torch.isfinite(torch.as_tensor(grad_norm)).item())


def _step_or_skip(opt, ok: bool) -> None:
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _open_live(reports: Path, resume: bool, step: int):
    from dvclive import Live

    live = Live(dir=str(reports / "live"), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)
    if resume:
        live.step = step
    return live


def _save_checkpoint(root: Path, step: int, fp: str, live_step: int, keep: int, student: dict, lora: dict,
                     opt_student, opt_lora, ema) -> Path:
    def write(folder: Path) -> None:
        torch.save(student, folder / "student.pt")
        torch.save(lora, folder / "lora.pt")
        torch.save(opt_student.state_dict(), folder / "opt_student.pt")
        torch.save(opt_lora.state_dict(), folder / "opt_lora.pt")
        if ema is not None:
            save_ema(ema, folder / EMA_FILE)

    return checkpoint.save(root, step, {"fingerprint": fp, "live_step": live_step}, write, keep)


@torch.no_grad()
def validate(pipe, student, records: list[dict], abar: torch.Tensor, timestep: int | None = None,
             steps: int = 1) -> dict[str, float]:
    """The student's samples for fixed eval prompts; judge accuracy when the prompts carry attributes."""
    from .world import accuracy, read_scene, score

    was_training = student.training
    student.eval()
    images = one_step_images(pipe, student, [r["prompt"] for r in records], [r["seed"] for r in records], abar,
                             device=next(student.parameters()).device, timestep=timestep, steps=steps)
    student.train(was_training)
    out = {"mean_pixel_std": float(images.reshape(len(images), -1).std(axis=1).mean() / 255)}
    if all("attributes" in r for r in records):
        acc = accuracy(score(read_scene(im), r["attributes"]) for im, r in zip(images, records))
        out.update({f"attribute_accuracy{'' if k == 'all' else '_' + k}": v for k, v in acc.items()})
    return out


def main(argv: list[str] | None = None) -> None:
    from .layout import resolve_teacher

    config, _ = stage_config(__doc__, "distill", argv, top_level=("lr", "tiny_decoder"))
    if config is None:
        return
    resolve_teacher(config.distill.teacher, config.distill.teacher_config)   # a single file: converted once, here
    if config.distill.processes > 1 and launched_world() == 1:
        code = spawn("src.distill", sys.argv[1:] if argv is None else argv, config.distill.processes)
        if code:
            sys.exit(code)          # each process printed its own error
        return
    tiny = Path(config.tiny_decoder) if config.tiny_decoder else None
    result = distill(config.distill, config.lr, config.seed, Paths(tiny_decoder=tiny))
    if "final" in result:
        print(f"distill: {result['steps']} steps; one-step validation {json.dumps(result['final'])}")


if __name__ == "__main__":
    run_cli(main)
