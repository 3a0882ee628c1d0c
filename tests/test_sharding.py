"""distill.sharding: fsdp on two CPU processes (gloo) with a tiny SDXL teacher: the sharded run trains, writes
sharded checkpoints, is killed, resumes to exactly the weights of an uninterrupted sharded run, and ends where
the unsharded (DDP) run of the same steps ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from src.core import checkpoint

REPO = Path(__file__).resolve().parents[1]
UNET_FILE = "models/student/unet/diffusion_pytorch_model.safetensors"


def _workspace(tmp: Path, teacher: Path, prompts: Path, sharding: str) -> Path:
    import shutil

    tmp.mkdir()
    shutil.copytree(prompts, tmp / "prompts")
    distill = {"teacher": str(teacher), "steps": 3, "batch_size": 2, "lora_rank": 4, "lora_alpha": 8,
               "resolution": 128, "checkpoint_every": 2, "log_every": 1, "val_every": 100, "val_prompts": 2,
               "ema_decay": 0.9, "processes": 2, "sharding": sharding, "fsdp_min_params": 20_000}
    (tmp / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "lr": 1e-4, "distill": distill}))
    return tmp


def _distill(cwd: Path, kill_after_checkpoint: int | None = None) -> subprocess.CompletedProcess | None:
    """`python -m src.distill` (which starts both processes); with kill_after_checkpoint, SIGKILL to the whole
    process group once that checkpoint is complete."""
    cmd = [sys.executable, "-m", "src.distill", "--params", str(cwd / "params.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    if kill_after_checkpoint is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = cwd / "checkpoints" / f"step-{kill_after_checkpoint:06d}" / checkpoint.MANIFEST
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return None


def _curve(cwd: Path, name: str) -> list[float]:
    rows = (cwd / f"reports/distill/live/plots/metrics/train/{name}.tsv").read_text().split("\n")[1:]
    return [float(r.split("\t")[1]) for r in rows if r]


def _flat(path: Path, keys: list[str]) -> torch.Tensor:
    from safetensors.torch import load_file

    weights = load_file(path)
    return torch.cat([weights[k].float().flatten() for k in keys])


@pytest.mark.timeout(1200)
def test_a_sharded_run_resumes_exactly_and_matches_the_unsharded_one(tmp_path, sdxl_folder, world_prompts):
    from safetensors import safe_open

    teacher = sdxl_folder("micro")
    ddp = _workspace(tmp_path / "ddp", teacher, world_prompts, "none")
    straight = _workspace(tmp_path / "fsdp", teacher, world_prompts, "fsdp")
    killed = _workspace(tmp_path / "fsdp_killed", teacher, world_prompts, "fsdp")
    for ws in (ddp, straight):
        run = _distill(ws)
        assert run.returncode == 0, run.stderr[-3000:]

    _distill(killed, kill_after_checkpoint=2)
    assert not (killed / "models" / "student").exists()                    # nothing half-written
    shards = checkpoint.verify(killed / "checkpoints" / "step-000002")     # hashed like any checkpoint
    manifest = json.loads((killed / "checkpoints" / "step-000002" / checkpoint.MANIFEST).read_text())
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(manifest), manifest
    assert shards["processes"] == 2
    resumed = _distill(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "sharded; verified and loaded" in resumed.stdout + resumed.stderr

    with safe_open(str(ddp / UNET_FILE), "pt") as f:
        keys = sorted(f.keys())
    teacher_w = _flat(teacher / "unet" / "diffusion_pytorch_model.safetensors", keys)
    w_ddp, w_fsdp, w_resumed = (_flat(ws / UNET_FILE, keys) for ws in (ddp, straight, killed))
    assert torch.equal(w_resumed, w_fsdp)                                  # resumed bit for bit
    # The same training as DDP. VSD's gradient is the difference of two nearly equal scores, so rounding
    # (channels-last convolutions in the DDP run, contiguous weights in the sharded one) moves it by ~0.1%
    # and Adam turns that into small weight differences: compared against how far training moved them.
    moved = w_ddp - teacher_w
    assert moved.norm() > 0
    assert (w_fsdp - w_ddp).norm() / moved.norm() < 0.1
    assert torch.nn.functional.cosine_similarity(moved[None], (w_fsdp - teacher_w)[None]).item() > 0.99
    # gradients are averaged over the processes as DDP averages them (a sum would double the norms)
    for name, tol in (("grad_norm_lora", 1e-4), ("grad_norm_student", 0.02)):
        a, b = _curve(ddp, name), _curve(straight, name)
        assert len(a) == len(b) == 3 and all(abs(x - y) <= tol * max(abs(x), 1e-12) for x, y in zip(a, b)), (name, a, b)


def test_sharding_needs_a_full_student_and_several_processes():
    from pydantic import ValidationError

    from src.core.config import DistillConfig

    with pytest.raises(ValidationError, match="sharding: fsdp shards a full student over processes"):
        DistillConfig(sharding="fsdp", processes=1)
    with pytest.raises(ValidationError, match="needs student: full"):
        DistillConfig(sharding="fsdp", processes=2, student="lora")


def test_size_based_wrapping_makes_units_of_large_modules_only():
    """Bottom-up by size: a submodule whose unwrapped weights reach the bound becomes a unit, a ModuleList (no
    forward) passes its weights up. Checked on one process (a gloo group of size 1)."""
    import torch.distributed as dist

    from src.core.sharding import shard_by_size

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ModuleList([torch.nn.Linear(4, 4)]),
                                    torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(8, 8)))
        wrapped = shard_by_size(model, min_params=4000)
        assert wrapped == ["0", "2.0"]              # 4160 weights each; the small rest goes to the root
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    finally:
        dist.destroy_process_group()
