"""The distill stage on the micro teacher: output pipeline, resume after a real kill, faults."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from src.core import checkpoint
from src.core.config import DistillConfig
from src.core.errors import UserError
from src.distill import NonFiniteError, Paths, batch_indices, distill

REPO = Path(__file__).resolve().parents[1]

FAST = dict(steps=4, batch_size=2, lora_rank=4, lora_alpha=8, checkpoint_every=2, log_every=1, val_every=2,
            val_prompts=4)


def _paths(tmp: Path, prompts: Path) -> Paths:
    return Paths(train_prompts=prompts / "train.jsonl", eval_prompts=prompts / "eval.jsonl",
                 checkpoints=tmp / "checkpoints", student=tmp / "student", reports=tmp / "reports")


@pytest.mark.parametrize("student_timestep", [None, 899])
def test_distill_writes_a_one_step_pipeline_that_matches_the_shared_generator(tmp_path, micro_models, world_prompts,
                                                                              student_timestep):
    from diffusers import StableDiffusionPipeline

    from src.method.noise import initial_noise
    from src.method.onestep import one_step_images, timestep_of
    from src.method.teacher import alphas_cumprod, load_pipeline

    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    result = distill(DistillConfig(teacher=str(models / "teacher"), student_timestep=student_timestep, **FAST),
                     lr=1e-4, seed=0, paths=paths)
    assert result["skipped_steps"] == 0 and "attribute_accuracy" in result["final"]
    metrics = json.loads((paths.reports / "metrics.json").read_text())
    assert [row["step"] for row in metrics["val_curve"]] == [2, 4]
    assert (paths.reports / "live" / "metrics.json").is_file()  # DVCLive summary
    assert (paths.reports / "live" / "plots" / "metrics" / "train" / "loss_vsd.tsv").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(paths.student, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    t_s = 999 if student_timestep is None else student_timestep
    assert timestep_of(pipe) == t_s                      # the saved scheduler carries the student's timestep
    assert json.loads((paths.student / "swiftbrush.json").read_text())["timestep"] == t_s
    prompts, seeds = ["a red circle in the center on a blue background", "a big white box at the top"], [3, 4]
    latents = initial_noise(seeds, (pipe.unet.config.in_channels,) + (pipe.unet.config.sample_size,) * 2)
    via_pipeline = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np",
                        latents=torch.from_numpy(latents)).images
    teacher = load_pipeline(str(models / "teacher"))
    ours = one_step_images(teacher, pipe.unet, prompts, seeds, alphas_cumprod(teacher), timestep=t_s)
    assert np.abs(via_pipeline * 255 - ours.astype(np.float32)).max() <= 1.0  # same image (uint8 rounding)
    # The call the model card states with a stock scheduler: LCM's one step at t_s returns its x0.
    from diffusers import LCMScheduler

    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    via_lcm = pipe(prompts, num_inference_steps=1, timesteps=[t_s], guidance_scale=0, output_type="np",
                   latents=torch.from_numpy(latents)).images
    assert np.abs(via_lcm * 255 - ours.astype(np.float32)).max() <= 1.0
    assert f"timesteps=[{t_s}]" in (paths.student / "README.md").read_text()
    # The student moved away from the teacher.
    diff = sum((a - b).abs().sum() for a, b in zip(pipe.unet.parameters(), teacher.unet.parameters()))
    assert diff > 0


def test_sid_with_lsg_guidance_and_an_annealed_range_trains_end_to_end(tmp_path, micro_models, world_prompts):
    """distill.loss: sid on the micro teacher: it logs SiD's loss, moves the student, and the loss's t range
    narrows over the run as t_max_end asks."""
    from src.distill import t_max_at
    from src.method.teacher import load_pipeline

    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    cfg = DistillConfig(teacher=str(models / "teacher"), loss="sid", guidance_scale=2.0, lora_guidance_scale=1.5,
                        lora_train_guidance_scale=1.5, t_max_end=500, **FAST)
    assert [t_max_at(cfg, s) for s in (0, 2, 4, 9)] == [980, 740, 500, 500]
    result = distill(cfg, lr=1e-4, seed=0, paths=paths)
    assert result["skipped_steps"] == 0
    logged = paths.reports / "live" / "plots" / "metrics" / "train"
    assert (logged / "loss_sid.tsv").is_file() and (logged / "score_gap.tsv").is_file()
    assert not (logged / "loss_vsd.tsv").exists()
    student = load_pipeline(str(paths.student)).unet
    teacher = load_pipeline(str(models / "teacher")).unet
    assert sum((a - b).abs().sum() for a, b in zip(student.parameters(), teacher.parameters())) > 0


def test_student_lr_schedules():
    from src.distill import fingerprint, student_lr

    assert [student_lr(1e-5, s, 100, "constant") for s in (0, 50, 99)] == [1e-5] * 3
    cos = [student_lr(1e-5, s, 100, "cosine") for s in range(101)]
    assert cos[0] == pytest.approx(1e-5) and cos[100] == pytest.approx(1e-6) and cos[50] == pytest.approx(5.5e-6)
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    # With a cosine schedule the total length shapes the trajectory, so it is part of the resume key.
    short, long = DistillConfig(steps=10, lr_schedule="cosine"), DistillConfig(steps=20, lr_schedule="cosine")
    assert fingerprint(short, 1e-5, 0) != fingerprint(long, 1e-5, 0)
    assert fingerprint(DistillConfig(steps=10), 1e-5, 0) == fingerprint(DistillConfig(steps=20), 1e-5, 0)


def test_the_ema_round_trips_through_safetensors_without_pickle(tmp_path):
    """A resumed EMA continues exactly: the same shadow weights and the same warm-up position."""
    from safetensors import safe_open

    from src.core.checkpoint import load_ema, save_ema, student_ema

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = student_ema(model.parameters(), 0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape))
        ema.step(model.parameters())
    save_ema(ema, tmp_path / "ema.safetensors")
    with safe_open(str(tmp_path / "ema.safetensors"), framework="pt") as f:      # tensors + JSON, nothing else
        assert len(list(f.keys())) == 2 and "optimization_step" in f.metadata()["state"]
    again = student_ema(torch.nn.Linear(4, 3).parameters(), 0.9)
    load_ema(again, tmp_path / "ema.safetensors")
    assert again.optimization_step == ema.optimization_step == 5
    for a, b in zip(again.shadow_params, ema.shadow_params):
        assert torch.equal(a, b)


def test_no_load_in_src_uses_pickle():
    """Every torch.load passes weights_only=True; no pickle, no numpy allow_pickle, no joblib."""
    import ast

    for path in (REPO / "src").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                    assert kw.get("weights_only") == "True", f"{path}:{node.lineno}: {ast.unparse(node)}"
                assert kw.get("allow_pickle") != "True", f"{path}:{node.lineno}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cPickle", "joblib", "dill"} & set(names), f"{path}:{node.lineno}"


def test_student_ema_follows_the_documented_warm_up():
    """The shipped weights are an EMA whose k-th update uses min(decay, k / (9 + k)) (k >= 2; the
    first copies the weights), as params.yaml and the config describe; checked by a recurrence."""
    from src.core.checkpoint import student_ema

    assert student_ema(torch.nn.Linear(2, 2).parameters(), None) is None
    model = torch.nn.Linear(3, 2)
    ema = student_ema(model.parameters(), 0.8)
    gen = torch.Generator().manual_seed(0)
    expected = None
    for k in range(1, 41):                                   # k / (9 + k) passes 0.8 at k = 36
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        ema.step(model.parameters())
        current = [p.detach().clone() for p in model.parameters()]
        d = 0.0 if k == 1 else min(0.8, k / (9 + k))
        expected = current if expected is None else [d * e + (1 - d) * c for e, c in zip(expected, current)]
    for shadow, want in zip(ema.shadow_params, expected):
        torch.testing.assert_close(shadow, want)


def test_batches_are_sharded_and_wrap_without_dropping_a_tail():
    n = 10
    one = [batch_indices(n, 4, s, 0, 1, seed=0) for s in range(5)]          # 20 draws = 2 epochs
    assert sorted(sum(one[:2], []) + one[2][:2]) == list(range(n))       # epoch 0 is a permutation
    two = [batch_indices(n, 2, 0, r, 2, seed=0) for r in range(2)]
    assert two[0] + two[1] == one[0]                                      # ranks split the global batch


def _run_cli(cwd: Path, *, steps: int, kill_after_checkpoint: int | None = None) -> subprocess.CompletedProcess | None:
    cmd = [sys.executable, "-m", "src.distill", "--params", str(cwd / "params.yaml"), "--set", f"distill.steps={steps}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1"}
    if kill_after_checkpoint is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = cwd / "checkpoints" / f"step-{kill_after_checkpoint:06d}" / checkpoint.MANIFEST
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return None


def _workspace(tmp: Path, models: Path, prompts: Path) -> Path:
    tmp.mkdir()
    shutil.copytree(prompts, tmp / "prompts")
    params = {"seed": 0, "lr": 1e-4, "distill": {**FAST, "teacher": str(models / "teacher"), "val_every": 100}}
    (tmp / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, micro_models, world_prompts):
    from safetensors.torch import load_file

    models, _ = micro_models
    a = _workspace(tmp_path / "a", models, world_prompts)
    b = _workspace(tmp_path / "b", models, world_prompts)
    run = _run_cli(a, steps=6)
    assert run.returncode == 0, run.stderr
    _run_cli(b, steps=6, kill_after_checkpoint=2)                      # SIGKILL mid-run
    assert not (b / "models" / "student").exists()                       # nothing half-written
    resumed = _run_cli(b, steps=6)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    wa = load_file(a / "models/student/unet/diffusion_pytorch_model.safetensors")
    wb = load_file(b / "models/student/unet/diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_corrupt_checkpoint_is_reported_not_loaded(tmp_path, micro_models, world_prompts):
    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    cfg = DistillConfig(teacher=str(models / "teacher"), **{**FAST, "steps": 2})
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    ckpt = paths.checkpoints / "step-000002" / "student.pt"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"checkpoint .*step-000002 is corrupt: student.pt"):
        distill(cfg.model_copy(update={"steps": 4}), lr=1e-4, seed=0, paths=paths)


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, micro_models, world_prompts, capsys):
    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    cfg = DistillConfig(teacher=str(models / "teacher"), **{**FAST, "steps": 2})
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    distill(cfg, lr=2e-4, seed=0, paths=paths)  # `dvc exp run -S lr=...` must not continue the old run
    assert "belong to other settings, code or prompts; starting afresh" in capsys.readouterr().out


def test_a_changed_prompt_file_or_method_code_is_part_of_the_resume_key(tmp_path, world_prompts):
    from src.distill import fingerprint, inputs_digest

    cfg = DistillConfig()
    assert fingerprint(cfg, 1e-5, 0, "code-a") != fingerprint(cfg, 1e-5, 0, "code-b")
    edited = tmp_path / "train.jsonl"
    edited.write_bytes((world_prompts / "train.jsonl").read_bytes() + b"\n")
    assert inputs_digest(world_prompts / "train.jsonl") != inputs_digest(edited)


def test_every_method_module_is_part_of_the_resume_key():
    from src.distill import method_sources

    src = Path(__file__).resolve().parents[1] / "src"
    assert set(method_sources()) >= set((src / "method").glob("*.py")) | {src / "distill.py", src / "core" / "text.py"}


def test_a_run_on_an_edited_prompt_file_starts_afresh(tmp_path, micro_models, world_prompts, capsys):
    """distill passes the digest into the resume key: same settings, other prompts -> not resumed."""
    models, _ = micro_models
    prompts = tmp_path / "prompts"
    shutil.copytree(world_prompts, prompts)
    paths = _paths(tmp_path, prompts)
    cfg = DistillConfig(teacher=str(models / "teacher"), **{**FAST, "steps": 2})
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    train = prompts / "train.jsonl"
    train.write_text("".join(reversed(train.read_text().splitlines(keepends=True))))
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    assert "belong to other settings, code or prompts; starting afresh" in capsys.readouterr().out


def test_a_shorter_run_after_a_longer_one_ships_its_own_step(tmp_path, micro_models, world_prompts, capsys):
    """`dvc exp run -S distill.steps=4` then back to 2 steps: resume at step 2, never ship step 4."""
    from safetensors.torch import load_file

    models, _ = micro_models
    cfg = DistillConfig(teacher=str(models / "teacher"), **{**FAST, "steps": 2, "keep_checkpoints": 3})
    fresh = _paths(tmp_path / "fresh", world_prompts)
    distill(cfg, lr=1e-4, seed=0, paths=fresh)
    paths = _paths(tmp_path / "reused", world_prompts)
    distill(cfg.model_copy(update={"steps": 4}), lr=1e-4, seed=0, paths=paths)
    distill(cfg, lr=1e-4, seed=0, paths=paths)
    out = capsys.readouterr().out
    assert "beyond distill.steps=2 (a longer run) removed" in out and "(step 2;" in out
    assert [p.name for p in checkpoint.complete(paths.checkpoints)] == ["step-000002"]
    weights = "unet/diffusion_pytorch_model.safetensors"
    wa, wb = load_file(fresh.student / weights), load_file(paths.student / weights)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_non_finite_steps_stop_the_run_with_a_clear_error(tmp_path, micro_models, world_prompts):
    from safetensors.torch import load_file, save_file

    models, _ = micro_models
    broken = tmp_path / "teacher"
    shutil.copytree(models / "teacher", broken)
    f = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(f)
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, f)
    cfg = DistillConfig(teacher=str(broken), **{**FAST, "max_nonfinite": 2})
    with pytest.raises(NonFiniteError, match="2 consecutive non-finite"):
        distill(cfg, lr=1e-4, seed=0, paths=_paths(tmp_path, world_prompts))


def test_teacher_folder_errors(tmp_path, micro_models):
    from src.method.teacher import load_pipeline

    with pytest.raises(UserError, match="no model_index.json"):
        load_pipeline(str(tmp_path))
    partial = tmp_path / "partial"
    (partial / "vae").mkdir(parents=True)
    (partial / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                          "vae": ["diffusers", "AutoencoderKL"]}))
    with pytest.raises(UserError, match="missing unet, text_encoder, tokenizer, scheduler"):
        load_pipeline(str(partial))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        load_pipeline("someone/not-a-cached-model")
    models, _ = micro_models
    sample = tmp_path / "sample"
    shutil.copytree(models / "teacher", sample)
    sched = sample / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "sample"}))
    with pytest.raises(UserError, match="prediction_type 'sample' is not supported"):
        load_pipeline(str(sample))


def test_two_processes_keep_identical_student_weights(tmp_path, micro_models, world_prompts):
    """`python -m src.distill --set distill.processes=2` starts two processes that train together (DDP over gloo
    on the CPU): both ranks take part and end with the same weights, and the run ships one student."""
    models, _ = micro_models
    ws = _workspace(tmp_path / "ddp", models, world_prompts)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "src.distill", "--params", str(ws / "params.yaml"), "--set", "distill.steps=3",
           "--set", "distill.processes=2"]
    run = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    digests = dict(re.findall(r"rank (\d+): student digest ([-+0-9.e]+)", run.stdout))
    assert set(digests) == {"0", "1"}, run.stdout
    assert digests["0"] == digests["1"]
    assert (ws / "models" / "student" / "model_index.json").is_file()


def test_a_launch_with_another_process_count_is_refused_by_name(tmp_path, micro_models, world_prompts, monkeypatch):
    """Under a launcher (torchrun / accelerate launch), distill.processes must match its count: the global batch
    it records is processes x batch_size."""
    models, _ = micro_models
    cfg = DistillConfig(teacher=str(models / "teacher"), processes=2, **FAST)
    with pytest.raises(UserError, match=r"distill.processes is 2, but this run has 1 process"):
        distill(cfg, 1e-4, 0, _paths(tmp_path, world_prompts))


def test_worker_environment_joins_the_processes_on_loopback():
    from src.core.launch import worker_env

    env = worker_env({"PATH": "/bin"}, 1, 2, 29500, cuda=False, cores=2)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "1", "2", "127.0.0.1", "29500")
    assert env["ACCELERATE_USE_CPU"] == "true" and env["OMP_NUM_THREADS"] == "1" and env["TQDM_DISABLE"] == "1"
    assert worker_env({"OMP_NUM_THREADS": "3"}, 0, 2, 1, cuda=False, cores=8)["OMP_NUM_THREADS"] == "3"
    assert "ACCELERATE_USE_CPU" not in worker_env({}, 0, 2, 1, cuda=True, cores=8)


LORA = dict(FAST, student="lora", student_lora_rank=4, student_lora_alpha=8, val_every=100)


def test_lora_student_trains_its_adapter_and_ships_a_plain_unet(tmp_path, micro_models, world_prompts):
    """SwiftBrush v2's LoRA student: only the adapted modules move, the saved UNet is a plain one
    (adapter merged), and a bf16 text encoder during training is not what ships."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from src.method.teacher import load_pipeline

    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    distill(DistillConfig(teacher=str(models / "teacher"), frozen_dtype="bfloat16", ema_decay=0.9, **LORA),
            lr=1e-3, seed=0, paths=paths)
    saved = load_file(paths.student / "unet" / "diffusion_pytorch_model.safetensors")
    assert not any("lora" in k for k in saved)
    teacher = load_pipeline(str(models / "teacher"))
    base = teacher.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], saved[k])}
    assert changed, "the LoRA student did not move (no gradient reached its adapter)"
    assert all(any(f".{t}." in k for t in ("to_q", "to_k", "to_v", "to_out.0")) and k.endswith(".weight")
               for k in changed), sorted(changed)[:5]
    text = load_file(paths.student / "text_encoder" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in text.values())
    assert all(torch.equal(v, teacher.text_encoder.state_dict()[k]) for k, v in text.items())
    pipe = StableDiffusionPipeline.from_pretrained(paths.student)         # stock, no dtype
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=1, guidance_scale=1.0).images[0].size == (32, 32)


def test_lora_student_resumes_to_the_weights_of_one_run(tmp_path, micro_models, world_prompts):
    models, _ = micro_models
    cfg = DistillConfig(teacher=str(models / "teacher"), **LORA)
    straight = _paths(tmp_path / "a", world_prompts)
    distill(cfg, lr=1e-3, seed=0, paths=straight)
    split = _paths(tmp_path / "b", world_prompts)
    distill(cfg.model_copy(update={"steps": 2}), lr=1e-3, seed=0, paths=split)
    distill(cfg, lr=1e-3, seed=0, paths=split)                      # resumes at step 2
    from safetensors.torch import load_file

    a = load_file(straight.student / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(split.student / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_merge_adapter_is_w_plus_scaled_ba(tiny_unet):
    """The merged UNet computes what the UNet with its adapter on computes: W' = W + (alpha / r) B A."""
    from peft import LoraConfig

    from src.method.adapters import adapters, merge_adapter

    unet = tiny_unet()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v"]), "student")
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    merged = merge_adapter(unet, "student")
    name = next(k for k in base if k.endswith("attn1.to_q.weight"))
    module = unet.get_submodule(name[:-len(".weight")])
    want = base[name] + 3.0 * module.lora_B["student"].weight @ module.lora_A["student"].weight
    torch.testing.assert_close(merged.state_dict()[name], want)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 5, 16)
    with torch.no_grad(), adapters(unet, True, "student"):
        torch.testing.assert_close(merged(x, t, text).sample, unet(x, t, text).sample, rtol=1e-4, atol=1e-5)


def test_resolution_sets_the_students_size_and_is_checked(tmp_path, micro_models, world_prompts):
    from diffusers import StableDiffusionPipeline

    models, _ = micro_models
    cfg = DistillConfig(teacher=str(models / "teacher"), **dict(FAST, steps=1, val_every=100))
    with pytest.raises(UserError, match=r"distill.resolution = 36: this teacher needs a multiple of"):
        distill(cfg.model_copy(update={"resolution": 36}), lr=1e-4, seed=0, paths=_paths(tmp_path, world_prompts))
    paths = _paths(tmp_path / "ok", world_prompts)
    distill(cfg.model_copy(update={"resolution": 64}), lr=1e-4, seed=0, paths=paths)
    pipe = StableDiffusionPipeline.from_pretrained(paths.student)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=1, guidance_scale=1.0).images[0].size == (64, 64)


def test_adam_implementations_make_the_same_student(tmp_path, micro_models, world_prompts):
    """distill.adam_impl changes memory, not the method: fused and for-loop Adam make the same step."""
    from safetensors.torch import load_file

    models, _ = micro_models
    # One step: the student's first update does not depend on the LoRA teacher's (Adam steps on
    # near-zero LoRA gradients amplify rounding, so later steps are compared only loosely elsewhere).
    cfg = DistillConfig(teacher=str(models / "teacher"), lora_guidance_scale=1.0,   # a non-zero first gradient
                        **dict(FAST, steps=1, val_every=100))
    out = {}
    for impl in ("for_loop", "fused"):
        paths = _paths(tmp_path / impl, world_prompts)
        distill(cfg.model_copy(update={"adam_impl": impl}), lr=1e-3, seed=0, paths=paths)
        out[impl] = load_file(paths.student / "unet" / "diffusion_pytorch_model.safetensors")
    teacher = load_file(models / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    moved = max((out["for_loop"][k] - teacher[k].float()).abs().max() for k in teacher)
    apart = max((out["fused"][k] - out["for_loop"][k]).abs().max() for k in teacher)
    assert moved > 1e-4 and apart < 0.01 * moved           # the same Adam step, up to float rounding


def test_lora_student_with_gradient_checkpointing_trains_the_same_weights(tmp_path, micro_models, world_prompts):
    """Checkpointed blocks are recomputed in backward; with the student and the LoRA teacher sharing one
    UNet, that recomputation must run under the adapter the forward ran with (else: CheckpointError)."""
    from safetensors.torch import load_file

    models, _ = micro_models
    out = {}
    for ckpt in (False, True):
        paths = _paths(tmp_path / str(ckpt), world_prompts)
        distill(DistillConfig(teacher=str(models / "teacher"), gradient_checkpointing=ckpt, lora_guidance_scale=1.0,
                              **dict(LORA, steps=2)), lr=1e-3, seed=0, paths=paths)
        out[ckpt] = load_file(paths.student / "unet" / "diffusion_pytorch_model.safetensors")
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_saved_student_holds_the_ema_weights(tmp_path, micro_models, world_prompts, kind):
    """With distill.ema_decay the shipped UNet is the EMA average (the checkpoint's shadow), not the raw weights."""
    from safetensors.torch import load_file

    models, _ = micro_models
    paths = _paths(tmp_path, world_prompts)
    extra = LORA if kind == "lora" else FAST
    distill(DistillConfig(teacher=str(models / "teacher"), ema_decay=0.5, lora_guidance_scale=1.0,
                          **dict(extra, steps=2, checkpoint_every=2, val_every=100)), lr=1e-3, seed=0, paths=paths)
    saved = load_file(paths.student / "unet" / "diffusion_pytorch_model.safetensors")
    folder = checkpoint.latest(paths.checkpoints)[0]
    ema = load_file(folder / "ema.safetensors")
    shadow = [ema[k] for k in sorted(ema)]
    raw = torch.load(folder / "student.pt", weights_only=True)
    trained = list(raw.values())                       # the EMA follows the trainable tensors, in this order
    assert len(shadow) == len(trained)
    differs = [not torch.equal(s, r) for s, r in zip(shadow, trained)]
    assert any(differs)                                # the EMA is not the raw student here
    if kind == "full":
        for (name, r), s in zip(raw.items(), shadow):
            torch.testing.assert_close(saved[name], s.contiguous())
    else:
        teacher = load_file(models / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
        changed = [k for k in teacher if not torch.equal(saved[k], teacher[k].float())]
        assert changed                                  # the merged EMA adapter moved the adapted weights
