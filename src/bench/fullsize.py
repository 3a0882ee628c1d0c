"""Real-size rehearsal: Stable Diffusion 1.5 / 2.1-base / 2.1 layouts through every real stage.

    python -m src.bench.fullsize --arch sd21-base                  # full size (~0.87B UNet), CPU, ~1 h
    python -m src.bench.fullsize --arch sd15 sd21-base sd21 --scale tiny --work /tmp/fs   # minutes
    python -m src.bench.fullsize --arch sd21-base --levers         # + the memory-lever table

For each teacher: write its folder (src/layout.py, random weights), a small COCO-format set
(captions JSON + JPEGs) and a params.yaml, then run the stages exactly as DVC does, each as
its own process (`python -m src.<stage>`), measuring wall time and peak resident memory:

    layout -> prepare (that teacher's tokenizer) -> distill (killed after its first checkpoint,
    then resumed) -> the saved student loaded by stock diffusers -> evaluate (COCO mode) ->
    export (fp32 + fp16 ONNX) -> python -m src.infer (fp32, fp16) with parity vs PyTorch

Writes reports/fullsize/metrics.json (one entry per teacher, merged with what is there) and
reports/fullsize/README.md. A stage whose anonymous memory passes --limit-gb is stopped and
reported as not fitting. Random weights prove code paths, memory, sizes and speeds; no
image quality is measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from .common import machine

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["a photo of a cat sitting on a wooden table", "a red bus driving down a city street",
            "two people riding horses on a beach at sunset", "a bowl of fruit next to a window",
            "an airplane flying over snowy mountains", "a dog catching a frisbee in a park",
            "a plate of pasta with tomato sauce", "a lighthouse on a rocky coast at night"]


@dataclass
class StageRun:
    """One stage process: how it ended, how long it took, how much memory it held at most."""

    ok: bool
    wall_s: float
    peak_rss_gb: float
    returncode: int | None
    log: str
    note: str = ""
    peak_anon_gb: float | None = None

    def row(self) -> dict:
        out = {"ok": self.ok, "wall_s": round(self.wall_s, 1), "peak_rss_gb": round(self.peak_rss_gb, 2)}
        if self.peak_anon_gb is not None:
            out["peak_anon_gb"] = round(self.peak_anon_gb, 2)
        return out | ({"note": self.note} if self.note else {})


def _memory_gb(pid: int) -> tuple[float, float]:
    """(resident set, its anonymous part) of a process. The anonymous part is what the machine must hold;
    the rest maps files (ONNX Runtime maps large graphs' weights), which the kernel can drop and re-read."""
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon"):
                found[key] = int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return found.get("VmRSS", 0.0), found.get("RssAnon", 0.0)


def run_stage(argv: list[str], cwd: Path, log: Path, limit_gb: float, kill_when=None, stop_when=None) -> StageRun:
    """Run `python <argv>` in `cwd` with the repository importable; stop it when its anonymous memory passes
    `limit_gb`, or (SIGKILL) when `kill_when()` turns true, or (SIGTERM: a server's clean shutdown) when
    `stop_when()` does. Peak RSS from the kernel (wait4), peak anonymous
    memory sampled every 0.2 s."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TQDM_MININTERVAL="5")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
        note, seen, anon = "", 0.0, 0.0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, now = _memory_gb(proc.pid)
            seen, anon = max(seen, rss), max(anon, now)
            if anon > limit_gb and not note:
                note = f"stopped: anonymous memory passed {limit_gb} GB"
                proc.kill()
            elif kill_when is not None and not note and kill_when():
                note = "killed (SIGKILL) as planned"
                os.kill(proc.pid, signal.SIGKILL)
            elif stop_when is not None and not note and stop_when():
                note = "stopped (SIGTERM) when its client finished"
                proc.terminate()
            time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    peak = max(seen, usage.ru_maxrss / 2**20)
    ok = code == 0
    if note.startswith("stopped (SIGTERM)"):    # the planned end of a server stage: uvicorn shuts down cleanly,
        note, ok = "", code in (0, -signal.SIGTERM)   # then re-raises the signal it caught
    return StageRun(ok, time.perf_counter() - t0, peak, code, log.read_text(errors="replace"), note, anon)


# --------------------------------------------------------------------------- inputs


def write_coco_set(root: Path, n_images: int = 4) -> Path:
    """captions_val2014.json (annotations format) + val2014/COCO_val2014_<id>.jpg of odd sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = root / "val2014"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        h, w = int(rng.integers(200, 320)), int(rng.integers(200, 320))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (i + 1) * 3) % 256, (yy * 5 + 40 * i) % 256, ((xx + yy) * 2) % 256], -1)
        Image.fromarray(img.astype(np.uint8)).save(images / f"COCO_val2014_{i + 1:012d}.jpg", quality=90)
    anns = [{"image_id": i % n_images + 1, "id": 100 + i, "caption": c} for i, c in enumerate(CAPTIONS)]
    path = root / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": anns, "images": [{"id": i + 1} for i in range(n_images)]}))
    return path


def write_inception(path: Path) -> Path:
    """clean-fid's weights-file interface (TorchScript with `.layers` -> 2048 features), holding a
    torchvision Inception-v3 with random weights: the real network's size and cost, no download."""
    import torch
    from torchvision.models import inception_v3

    class RandomInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            net = inception_v3(weights=None, aux_logits=False, init_weights=False)
            blocks = [m for name, m in net.named_children() if name not in ("AuxLogits", "dropout", "fc")]
            self.layers = torch.nn.Sequential(*blocks[:-1], torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return self.layers(x)

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(RandomInception().eval()), str(path))
    return path


def write_clip(folder: Path, tokenizer: Path) -> Path:
    """A transformers CLIPModel folder at ViT-B/32 size with random weights (the CLIP-score model)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config={"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                                              "num_hidden_layers": 12},
                                 vision_config={"hidden_size": 768, "intermediate_size": 3072,
                                                "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 32},
                                 projection_dim=512))
    model.save_pretrained(folder, safe_serialization=True)
    tok = CLIPTokenizer.from_pretrained(tokenizer)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok).save_pretrained(folder)
    return folder


@dataclass
class Settings:
    """What one rehearsal runs (the user-facing settings it exercises)."""

    resolution: int = 128          # distill.resolution: every stage draws at this size
    steps: int = 3                 # distill steps; the first checkpoint is at step 2, the kill after it
    student: str = "full"
    gradient_checkpointing: bool = True
    frozen_dtype: str = "bfloat16"
    adam_impl: str = "auto"
    eval_prompts: int = 4
    teacher_steps: int = 10
    evaluate: bool = True          # False skips the evaluate stage (its three 2048-d FID square roots take ~45 s)
    exporter: str = "dynamo"       # export.exporter (the product's default); torchscript exports in seconds
    extra: dict = field(default_factory=dict)


def params_yaml(s: Settings, coco: Path) -> str:
    cfg = {
        "seed": 0, "lr": 1e-6,
        "prepare": {"tokenizer": "teacher",
                    "train": {"source": "coco", "path": str(coco / "captions_val2014.json")},
                    "eval": {"source": "coco", "path": str(coco / "captions_val2014.json"), "limit": s.eval_prompts,
                             "dedupe": False}},
        "distill": {"teacher": "teacher", "steps": s.steps, "batch_size": 1, "resolution": s.resolution,
                    "student": s.student, "gradient_checkpointing": s.gradient_checkpointing,
                    "frozen_dtype": s.frozen_dtype, "adam_impl": s.adam_impl, "checkpoint_every": 2, "keep_checkpoints": 1, "log_every": 1,
                    "val_every": 1000, "val_prompts": 1, "student_timestep": None, **s.extra},
        "evaluate": {"mode": "coco", "coco": {"images": str(coco / "val2014"),
                                              "inception": str(coco / "inception" / "inception-2015-12-05.pt"),
                                              "clip": str(coco / "clip")},
                     "teacher_steps": s.teacher_steps, "batch_size": 2, "grid_rows": 2},
        "export": {"parity_prompts": 2, "exporter": s.exporter, "opset": 18 if s.exporter == "dynamo" else 17},
    }
    return json.dumps(cfg, indent=2)      # JSON is YAML


# --------------------------------------------------------------------------- the rehearsal


def _grep(pattern: str, text: str, cast=float):
    m = re.search(pattern, text)
    return cast(m.group(1)) if m else None


def dir_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30 if path.exists() else 0.0


STOCK_CHECK = r"""
import json, sys, time, numpy as np, torch
import diffusers
from PIL import Image
from src.method.noise import initial_noise
t0 = time.perf_counter()
cls = getattr(diffusers, json.load(open("models/student/model_index.json"))["_class_name"])  # SD or SDXL
pipe = cls.from_pretrained("models/student")      # the stock line, no dtype
pipe.set_progress_bar_config(disable=True)
t1 = time.perf_counter()
side = pipe.unet.config.sample_size
latents = torch.from_numpy(initial_noise([int(sys.argv[2])], (pipe.unet.config.in_channels, side, side)))
img = pipe(sys.argv[1], num_inference_steps=1, guidance_scale=1.0, latents=latents).images[0]
img.save("stock.png")
print(f"stock: loaded in {t1 - t0:.1f} s, one image {img.size} in {time.perf_counter() - t1:.1f} s")
"""


def py(*argv: str) -> list[str]:
    """A `python -m` command line for `run_stage`."""
    return ["-m", *argv]


PROGRESS = "progress.json"      # in the work folder: the rehearsal's entry so far


class Rehearsal:
    """One teacher's rehearsal in `work`: runs each stage as its own process, records it in `out["stages"]`,
    and skips the stages a kept, interrupted rehearsal (`out` from its entry) already finished."""

    def __init__(self, work: Path, limit_gb: float, out: dict):
        self.work, self.limit_gb, self.out = work, limit_gb, out
        self.stages: dict[str, dict] = out.setdefault("stages", {})
        self.finished = {k for k, v in self.stages.items() if v["ok"] or v.get("note", "").startswith("killed")}

    def stage(self, name: str, argv: list[str], **kw) -> StageRun:
        if name in self.finished:
            log = self.work / "logs" / f"{name}.log"
            return StageRun(True, self.stages[name]["wall_s"], self.stages[name]["peak_rss_gb"], 0,
                            log.read_text(errors="replace") if log.is_file() else "", "done before")
        run = run_stage(argv, self.work, self.work / "logs" / f"{name}.log", self.limit_gb, **kw)
        self.stages[name] = run.row()
        print(f"  {name}: {'ok' if run.ok else 'FAILED'} {run.wall_s:.0f} s, peak {run.peak_rss_gb:.1f} GB "
              f"(anonymous {run.peak_anon_gb:.1f} GB) "
              f"{run.note}", flush=True)
        if not run.ok and not run.note.startswith("killed"):
            self.stages[name]["error"] = run.log[-1500:]
        write_json(self.work / PROGRESS, self.out)     # what --resume continues from if the rehearsal is stopped
        return run


def rehearse(arch: str, scale: str, work: Path, s: Settings, limit_gb: float, previous: dict | None = None) -> dict:
    """Every stage on one teacher; returns its metrics entry. With `previous` (the entry of an
    interrupted rehearsal whose work folder was kept), the stages it finished are not run again."""
    if previous is None:
        shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out: dict = dict(previous or {}) | {"arch": arch, "scale": scale, "settings": s.__dict__}
    r = Rehearsal(work, limit_gb, out)
    if teacher_and_inputs(r, arch, scale, s) and r.stage("prepare", py("src.prepare")).ok and distill_twice(r):
        check_evaluate_export(r, s)
    return out


def teacher_and_inputs(r: Rehearsal, arch: str, scale: str, s: Settings) -> bool:
    """The random-weight teacher folder, the COCO-like inputs and params.yaml; False when the layout failed."""
    if not r.stage("layout", py("src.layout", "--arch", arch, "--out", "teacher", "--scale", scale)).ok:
        return False
    work = r.work
    r.out["parameters"] = json.loads((work / "teacher" / "layout.json").read_text())["parameters"]
    r.out["teacher_gb"] = round(dir_gb(work / "teacher"), 2)
    coco = work / "coco"
    if "prepare" not in r.finished:
        write_coco_set(coco)
        if s.evaluate:
            write_inception(coco / "inception" / "inception-2015-12-05.pt")
            write_clip(coco / "clip", work / "teacher" / "tokenizer")
        (work / "params.yaml").write_text(params_yaml(s, coco))
    return True


def distill_twice(r: Rehearsal) -> bool:
    """distill killed (SIGKILL) once its first checkpoint is complete, then resumed to the end; records the
    checkpoint's size and times. False when no student came out."""
    work, out = r.work, r.out
    first = work / "checkpoints" / "step-000002" / "MANIFEST.json"
    killed = r.stage("distill_killed", py("src.distill"), kill_when=first.is_file)
    if "distill_killed" not in r.finished:
        ck = _grep(r"checkpoint \S+: ([\d.]+) GiB written and hashed in", killed.log)
        out["checkpoint"] = {"size_gb": ck, "save_s": _grep(r"GiB written and hashed in ([\d.]+) s", killed.log)}
        if not first.is_file():
            return False
    resumed = r.stage("distill_resume", py("src.distill"))
    if "distill_resume" not in r.finished:
        out["checkpoint"]["resume_s"] = _grep(r"verified and loaded in ([\d.]+) s", resumed.log)
        out["checkpoint"]["resumed_at_step"] = _grep(r"resuming from \S+ \(step (\d+)", resumed.log, int)
    metrics = work / "reports" / "distill" / "metrics.json"
    if metrics.is_file():
        d = json.loads(metrics.read_text())
        out["distill"] = {k: d.get(k) for k in ("steps_per_s", "wall_s", "peak_memory_mb")}
    out["student_gb"] = round(dir_gb(work / "models" / "student"), 2)
    return resumed.ok


def check_evaluate_export(r: Rehearsal, s: Settings) -> None:
    """The stock diffusers pipeline's one-step image, evaluate, export, infer with both graphs, and the
    ONNX images' PSNR against the stock pipeline's."""
    work, out = r.work, r.out
    prompt, seed = CAPTIONS[0], 0
    r.stage("stock_pipeline", ["-c", STOCK_CHECK, prompt, str(seed)])
    if s.evaluate:
        r.stage("evaluate", py("src.evaluate"))
    ev = work / "reports" / "eval" / "metrics.json"
    if ev.is_file():
        out["evaluate_metrics"] = json.loads(ev.read_text())
    shutil.rmtree(work / "checkpoints", ignore_errors=True)          # disk: the ONNX files come next
    if not r.stage("export", py("src.export")).ok:
        return
    out["export"] = json.loads((work / "reports" / "export" / "metrics.json").read_text())
    out["onnx_gb"] = {p: round(dir_gb(work / "models" / "onnx" / p), 2) for p in ("fp32", "fp16")}
    for precision in ("fp32", "fp16"):
        run = r.stage(f"infer_{precision}", py("src.infer", prompt, "--seed", str(seed), "--precision", precision,
                                               "--out", f"infer_{precision}.png"))
        if run.ok:
            out.setdefault("infer", {})[precision] = {
                "load_s": _grep(r"loaded in ([\d.]+) s", run.log),
                "first_image_s": _grep(r"image\(s\) in ([\d.]+) s", run.log)}
    out.update(stock_psnr(work))
    if (work / "infer_fp32.png").is_file():
        check_serve(r, prompt, seed)


def check_serve(r: Rehearsal, prompt: str, seed: int, ready_within_s: float = 900.0) -> None:
    """`python -m src.serve` on the fp32 artifact, bound to 127.0.0.1: a client thread waits for /readyz, asks
    POST /v1/images for the prompt and seed infer drew, and the server is stopped (SIGTERM) when it is done.
    Records the time to ready, the request's latency and whether the image is infer's, pixel for pixel."""
    import threading
    import urllib.request

    from PIL import Image

    if "serve" in r.finished:
        return
    from ..core.launch import free_port

    port, got = free_port(), {}
    base = f"http://127.0.0.1:{port}"

    def client() -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < ready_within_s:
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            return
        got["ready_s"] = round(time.perf_counter() - t0, 1)
        body = json.dumps({"prompt": prompt, "seed": seed}).encode()
        t1 = time.perf_counter()
        request = urllib.request.Request(base + "/v1/images", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as resp:
            (r.work / "serve.png").write_bytes(resp.read())
        got["request_s"] = round(time.perf_counter() - t1, 2)

    def guarded() -> None:
        try:
            client()
        except Exception as err:       # shown in the report instead of dying silently with the thread
            got["client_error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    run = r.stage("serve", py("src.serve", "--model", "models/onnx", "--host", "127.0.0.1", "--port", str(port)),
                  stop_when=lambda: not thread.is_alive())
    thread.join(timeout=5)
    r.out["serve"] = got
    if "client_error" in got:
        r.stages["serve"]["note"] = "client: " + got["client_error"]
    if run.ok and (r.work / "serve.png").is_file():
        same = np.array_equal(np.asarray(Image.open(r.work / "serve.png")), np.asarray(Image.open(r.work / "infer_fp32.png")))
        r.out["serve"] = got | {"same_image_as_infer": bool(same)}


def stock_psnr(work: Path) -> dict[str, float]:
    """PSNR of `src.infer`'s fp32 and fp16 images against the stock pipeline's, where both exist."""
    from PIL import Image

    from ..core.images import psnr

    if not (work / "stock.png").is_file():
        return {}
    ref = np.asarray(Image.open(work / "stock.png").convert("RGB")) / 255.0
    return {f"psnr_{p}": round(psnr(np.asarray(Image.open(work / f"infer_{p}.png").convert("RGB")) / 255.0, ref), 2)
            for p in ("fp32", "fp16") if (work / f"infer_{p}.png").is_file()}


# --------------------------------------------------------------------------- memory levers


LEVERS = [  # (name, settings): each measured by a short distill run on the same teacher
    ("default (full student, fp32, no checkpointing)", dict(student="full", gradient_checkpointing=False,
                                                             frozen_dtype="float32")),
    ("+ gradient checkpointing", dict(student="full", gradient_checkpointing=True, frozen_dtype="float32")),
    ("+ bf16 text encoder and VAE", dict(student="full", gradient_checkpointing=True, frozen_dtype="bfloat16")),
    ("+ fused Adam", dict(student="full", gradient_checkpointing=True, frozen_dtype="bfloat16",
                          adam_impl="fused")),
    ("LoRA student (r=256), checkpointing, bf16 frozen", dict(student="lora", gradient_checkpointing=True,
                                                               frozen_dtype="bfloat16")),
    ("LoRA student alone (fp32, no checkpointing)", dict(student="lora", gradient_checkpointing=False,
                                                         frozen_dtype="float32")),
]


def lever_table(arch: str, scale: str, work: Path, limit_gb: float, resolutions=(64, 128),
                only: str | None = None) -> list[dict]:
    """Peak RSS and step time of a 2-step distill per lever and resolution (`only`: levers whose
    name contains it)."""
    rows = []
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "model_index.json").is_file():
        run_stage(["-m", "src.layout", "--arch", arch, "--out", "teacher", "--scale", scale], work,
                  work / "layout.log", limit_gb)
    coco = work / "coco"
    write_coco_set(coco)
    for name, lever in LEVERS:
        if only is not None and only not in name:
            continue
        row = {"lever": name, **lever}
        for res in resolutions:
            shutil.rmtree(work / "checkpoints", ignore_errors=True)
            s = Settings(resolution=res, steps=2, **lever, extra={"checkpoint_every": 1000})
            (work / "params.yaml").write_text(params_yaml(s, coco))
            if not (work / "prompts" / "train.jsonl").is_file():
                run_stage(["-m", "src.prepare"], work, work / "prepare.log", limit_gb)
            run = run_stage(["-m", "src.distill"], work, work / f"lever-{len(rows)}-{res}.log", limit_gb)
            live = work / "reports" / "distill" / "live" / "metrics.json"
            final = work / "reports" / "distill" / "metrics.json"
            step_s = None
            if run.ok and live.is_file():
                sps = json.loads(live.read_text()).get("train", {}).get("steps_per_s")
                step_s = round(1 / sps, 1) if sps else None
            if run.ok and final.is_file():       # distill's own peak, read before it saves the student
                row[f"train_peak_gb_{res}"] = round(json.loads(final.read_text())["peak_memory_mb"] / 1024, 2)
            row[f"peak_rss_gb_{res}"] = round(run.peak_rss_gb, 2)
            row[f"fits_{res}"] = run.ok
            row[f"step_s_{res}"] = step_s
            if not run.ok and not run.note:
                row[f"error_{res}"] = run.log[-800:]
            print(f"  lever {name} @ {res}px: {'ok' if run.ok else 'FAILED ' + run.note} "
                  f"peak {run.peak_rss_gb:.1f} GB, {step_s} s/step", flush=True)
        rows.append(row | predicted_gpu_gb(arch, lever))
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    return rows


def static_gb(arch: str, lever: dict) -> dict[str, float]:
    """Bytes that do not depend on the image size, by the arithmetic of docs/design.md, "Real teachers"."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..layout import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE

    with torch.device("meta"):
        n_unet = sum(p.numel() for p in UNet2DConditionModel(**UNET[arch]).parameters())
        n_text = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER[arch])).parameters())
        if arch in TEXT_ENCODER_2:         # SDXL: OpenCLIP bigG's text tower with its projection
            n_text += sum(p.numel() for p in
                          CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2[arch])).parameters())
        n_vae = sum(p.numel() for p in AutoencoderKL(**VAE[arch]).parameters())
    gb = 1 / 2**30
    frozen = 2 if lever["frozen_dtype"] == "bfloat16" else 4
    if lever["student"] == "full":
        trainable = n_unet
        student_copy = 4 * n_unet
    else:                                  # r=256 on to_q/k/v/out of every attention block: counted on the model
        trainable = lora_student_params(arch)
        student_copy = 0
    return {"teacher_unet": 4 * n_unet * gb, "student_weights": student_copy * gb,
            "student_grads_adam": 3 * 4 * trainable * gb, "text_encoder_vae": frozen * (n_text + n_vae) * gb}


def lora_student_params(arch: str, rank: int = 256, targets=("to_q", "to_k", "to_v", "to_out.0")) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from ..layout import UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET[arch])
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def saved_activation_gb(arch: str, pixels: int = 512, batch: int = 16, checkpointing: bool = False) -> float:
    """GB of tensors one student forward pass saves for its backward (the activations), counted
    by autograd's saved-tensor hook on the meta device: exact shapes, no memory, no compute.

    Float32; attention as a fused GPU kernel saves it (`saved_bytes`). With checkpointing, the
    tensors kept at each checkpointed block's boundary are not counted.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from ..layout import UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET[arch])
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return saved_bytes(unet, pixels, batch) / 2**30


def saved_bytes(unet, pixels: int, batch: int, fused_attention: bool = True) -> int:
    """Bytes of the tensors autograd saves in one training-mode forward of `unet` (weights excluded).

    `fused_attention`: attention saves what a fused kernel keeps for its backward (q, k, v, the
    output and a float32 log-sum-exp per query), as PyTorch's flash / memory-efficient kernels do
    on a GPU; otherwise as the math path (the full probability matrix)."""
    import contextlib

    import torch

    unet.train()
    device = next(unet.parameters()).device
    side = pixels // 8
    z = torch.randn(batch, unet.config.in_channels, side, side, device=device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    attention = _fused_attention_saves() if fused_attention else contextlib.nullcontext()
    kwargs = {"encoder_hidden_states": text}
    if unet.config.addition_embed_type == "text_time":      # SDXL: pooled embedding + six time ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                       "time_ids": torch.zeros(batch, 6, device=device)}
    with attention, counting_saved(unet) as count:
        unet(z, torch.full((batch,), 999, device=device), **kwargs)
    return count[0]


@contextlib.contextmanager
def counting_saved(module):
    """Inside: count[0] sums the bytes of the tensors autograd saves for the backward, except `module`'s
    weights and views of them (a linear layer saves its weight transposed: the weight's memory, counted
    once, as a weight)."""
    import torch

    params = {id(p) for p in module.parameters()}
    count = [0]

    def pack(t):
        if id(t) not in params and (t._base is None or id(t._base) not in params):
            count[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield count


def decoder_saved_gb(arch: str, pixels: int, batch: int, tiny: bool = False) -> float:
    """GB the decoder saves for its backward when the CLIP loss (distill.clip_model) decodes the student's x0
    with gradients: the teacher's VAE, or (`tiny`, distill.clip_decoder: tiny) a TAESD-format AutoencoderTiny
    (float32, fused attention; counted on the meta device like the UNet's)."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny

    from ..layout import VAE

    with torch.device("meta"):
        vae = (AutoencoderTiny() if tiny else AutoencoderKL(**VAE[arch])).train()
    side = pixels // 8
    z = torch.randn(batch, 4, side, side, device="meta", requires_grad=True)
    with _fused_attention_saves(), counting_saved(vae) as count:
        vae.decode(z)
    return count[0] / 2**30


@contextlib.contextmanager
def _fused_attention_saves():
    """Inside: scaled_dot_product_attention saves what a fused kernel saves (for counting only; its
    output is not attention's value)."""
    import torch
    import torch.nn.functional as F

    class FusedLike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out = q.new_empty(q.shape[:-1] + v.shape[-1:])
            lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):        # never called: the count needs only the forward
            raise NotImplementedError

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: FusedLike.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def predicted_gpu_gb(arch: str, lever: dict) -> dict:
    """Predicted peak GPU memory at 512 px, batch 16: the static bytes (weights, gradients, Adam
    moments, frozen parts) plus the activations one student forward saves (float32)."""
    static = sum(static_gb(arch, lever).values())
    act = saved_activation_gb(arch, 512, 16, lever.get("gradient_checkpointing", False))
    return {"static_gb": round(static, 1), "activations_512_b16_gb": round(act, 1),
            "predicted_gpu_512_b16_gb": round(static + act, 1)}


GPU_SIZES_GB = (24, 48, 80)
HEADROOM = 0.9                # usable share of a card (CUDA context, allocator fragmentation)
PREDICTED = [  # (name, lever): the configurations of the GPU table at the teacher's own resolution
    ("full student, bf16 frozen, checkpointing", dict(student="full", gradient_checkpointing=True,
                                                       frozen_dtype="bfloat16")),
    ("LoRA student, bf16 frozen, no checkpointing", dict(student="lora", gradient_checkpointing=False,
                                                          frozen_dtype="bfloat16")),
    ("LoRA student, bf16 frozen, checkpointing", dict(student="lora", gradient_checkpointing=True,
                                                       frozen_dtype="bfloat16")),
    ("full student, FSDP over 4 GPUs, bf16 frozen, checkpointing", dict(
        student="full", gradient_checkpointing=True, frozen_dtype="bfloat16", shards=4)),
    ("full student, FSDP over 8 GPUs, bf16 frozen, checkpointing", dict(
        student="full", gradient_checkpointing=True, frozen_dtype="bfloat16", shards=8)),
]
SHARDED = ("teacher_unet", "student_weights", "student_grads_adam")   # what distill.sharding: fsdp divides


def card_for(gb: float) -> str:
    """The smallest of 24/48/80 GB cards that holds `gb` within HEADROOM."""
    for size in GPU_SIZES_GB:
        if gb <= size * HEADROOM:
            return f"{size} GB"
    return "over 80 GB"


def gpu_table(arch: str, pixels: int, batches=(1, 2, 4)) -> list[dict]:
    """Predicted peak GPU memory per configuration and batch at `pixels`: static bytes + the student forward's
    saved activations; then with the CLIP loss, whose decode of x0 keeps the decoder's activations too
    (the teacher's VAE, or the tiny TAESD decoder of distill.clip_decoder: tiny)."""
    rows = []
    for name, lever in PREDICTED:
        shards = lever.get("shards", 1)     # fsdp: each GPU holds 1/N of both UNets, their gradients and Adam
        static = sum(v / shards if k in SHARDED else v for k, v in static_gb(arch, lever).items())
        for b in batches:
            act = saved_activation_gb(arch, pixels, b, lever["gradient_checkpointing"])
            base = static + act
            row = {"config": name, **lever, "pixels": pixels, "batch": b, "static_gb": round(static, 1),
                   "activations_gb": round(act, 1), "total_gb": round(base, 1), "card": card_for(base)}
            for key, tiny in (("clip_vae", False), ("clip_tiny", True)):
                total = base + decoder_saved_gb(arch, pixels, b, tiny)
                row[f"{key}_gb"], row[f"{key}_card"] = round(total, 1), card_for(total)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def stage_lines(e: dict) -> list[str]:
    """One rehearsal's stage table and measures."""
    p = e.get("parameters", {})
    lines = ["Parameters: " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in p.items()) +
             f"; teacher folder {e.get('teacher_gb')} GB. Settings: " +
             ", ".join(f"{k} {v}" for k, v in e.get("settings", {}).items() if k != "extra"), "",
             "| stage | ok | wall (s) | peak RSS (GB) | peak anonymous (GB) | note |", "|---|---|---|---|---|---|"]
    for name, st in e.get("stages", {}).items():
        state = "ok" if st["ok"] else "killed" if st.get("note", "").startswith("killed") else "**no**"
        lines.append(f"| {name} | {state} | {st['wall_s']} | {st['peak_rss_gb']} | {st.get('peak_anon_gb', '')} | "
                     f"{st.get('note', '')} |")
    ck, ex, inf, sv = e.get("checkpoint", {}), e.get("export", {}), e.get("infer", {}), e.get("serve", {})
    lines += ["", "| measure | value |", "|---|---|",
              f"| checkpoint size (GB) | {ck.get('size_gb')} |", f"| checkpoint write + hash (s) | {ck.get('save_s')} |",
              f"| checkpoint verify + load on resume (s) | {ck.get('resume_s')} |",
              f"| resumed at step | {ck.get('resumed_at_step')} |",
              f"| distill wall per step, with checkpoint writes and validation (s) | {round(1 / e['distill']['steps_per_s'], 1) if e.get('distill', {}).get('steps_per_s') else None} |",
              f"| student pipeline (GB) | {e.get('student_gb')} |",
              f"| ONNX fp32 / fp16 (GB) | {e.get('onnx_gb', {}).get('fp32')} / {e.get('onnx_gb', {}).get('fp16')} |",
              f"| external data fp32 / fp16 | {ex.get('external_data_fp32')} / {ex.get('external_data_fp16')} |",
              f"| export fp32 / fp16 conversion (s) | {ex.get('export_fp32_s')} / {ex.get('convert_fp16_s')} |",
              f"| ORT session load fp32 / fp16 (s) | {ex.get('session_load_s_fp32')} / {ex.get('session_load_s_fp16')} |",
              f"| export parity PSNR fp32 / fp16 (dB) | {ex.get('psnr_fp32')} / {ex.get('psnr_fp16')} |",
              f"| infer vs stock diffusers PSNR fp32 / fp16 (dB) | {e.get('psnr_fp32')} / {e.get('psnr_fp16')} |",
              f"| infer load / first image fp32 (s) | {inf.get('fp32', {}).get('load_s')} / {inf.get('fp32', {}).get('first_image_s')} |",
              f"| infer load / first image fp16 (s) | {inf.get('fp16', {}).get('load_s')} / {inf.get('fp16', {}).get('first_image_s')} |",
              ]
    if sv:
        lines += [f"| serve fp32: ready after / first request (s) | {sv.get('ready_s')} / {sv.get('request_s')} |",
                  f"| serve's image = infer's, pixel for pixel | {sv.get('same_image_as_infer')} |"]
    lines.append("")
    return lines


def report(entries: dict, machine: str) -> str:
    lines = ["# Real-size rehearsal", "",
             "Stable Diffusion layouts at their published sizes (`python -m src.layout`: configs as numbers, the real "
             "CLIP tokenizer, **random weights**) through the real stages, each run as its own process as DVC runs "
             "it (`python -m src.bench.fullsize`). Random weights prove code paths, memory, file sizes and speeds, "
             "never image quality: the FID and CLIP numbers of these runs mean nothing and are not shown.", "",
             f"Machine: {machine}. Peak RSS is the kernel's maximum resident set of the stage's process; "
             "peak anonymous is the largest part of it not backed by a file (sampled every 0.2 s), what the machine "
             "must hold: ONNX Runtime maps the weights of a large graph from its `.data` file, pages the kernel can "
             "drop. A stage is stopped when its anonymous memory passes the limit.", "",
             "What real sizes demand of the stages, each found by this rehearsal and handled in the code:", "",
             "- **ONNX past 2 GB.** protobuf cannot serialise the fp32 graph (4.7 GB): its size is counted from the "
             "weights' shapes, the weights go to one external `model.onnx.data`, streamed from the exporter's "
             "per-weight files a tensor at a time; ONNX shape inference (which serialises the model) is never "
             "run on it: the fp16 converter gets its types from ORT's symbolic shape inference on the "
             "weight-less graph.",
             "- **Memory of export.** The PyTorch reference images are drawn first and the PyTorch weights freed "
             "before the fp16 graph and the ONNX Runtime sessions load, one session at a time (peak 17.6 GB for "
             "SD 2.1-base; holding both passed 22 GB). The fp16 conversion never loads the weights as a whole: "
             "the converter retypes the weight-less graph, then each weight is read, converted and written on "
             "its own (SDXL: 13.7 GB of float32 weights converted in 112 s; with the whole model loaded it "
             "passed 22 GB). Weights of 1 MiB or more start on 64 KiB boundaries in `model.onnx.data`, where "
             "ONNX Runtime can map them.",
             "- **fp16 on the CPU provider.** ONNX Runtime's CPU kernels are mostly float32, so an fp16 graph "
             "run there casts its weights up and holds both copies (SDXL: 16.1 GB against 12.6 GB for the fp32 "
             "graph). The fp16 graph is for GPUs; on a CPU serve the fp32 one.",
             "- **Multi-GB files are hashed as streams** (evaluate's image-set keys, checkpoint manifests).",
             "- **Stock loading.** Published folders list a safety checker (SD 1.5) or `[null, null]` (SD 2.x), "
             "PNDM or DDIM v-prediction schedulers and fp32 weights; the stages load them without the safety "
             "checker, and the saved student loads with `StableDiffusionPipeline.from_pretrained(path)` "
             "as written, no dtype given.", ""]
    for arch, e in entries.items():
        lines += [f"## {arch} ({e.get('scale')})", ""] + ([e["note"], ""] if e.get("note") else [])
        lines += stage_lines(e) if e.get("stages") else [
            "The rehearsal of the stages has not been run for this layout; the GPU prediction below is "
            "arithmetic and a meta-device count.", ""]
        if e.get("levers"):
            lines += ["### Memory levers (distill, 2 steps, batch 1)", "",
                      "Measured here: a 2-step distill at 128 px, batch 1 (at this size the static memory "
                      "dominates): distill's own peak RSS before it saves the student, and the whole stage's "
                      "(saving serialises the 3.5 GB UNet in memory). Predicted for a GPU at 512 px, batch 16: the static bytes by "
                      "arithmetic (weights 4 B, gradients 4 B and Adam's two moments 8 B per trainable weight, "
                      "frozen parts at their dtype) plus the activations one student forward saves for its "
                      "backward, counted exactly on the meta device (float32; attention as a fused GPU kernel saves "
                      "it, q, k, v, output and log-sum-exp; PyTorch's math path, which keeps every attention "
                      "matrix, would need 90 GB without checkpointing; with checkpointing, block boundaries not "
                      "counted). A prediction, not a GPU measurement.", "",
                      "| lever | training peak RSS 128 px (GB) | stage peak RSS 128 px, saving included (GB) | "
                      "s/step 128 px | static (GB) | activations 512 px b16 (GB) | predicted GPU 512 px b16 (GB) |",
                      "|---|---|---|---|---|---|---|"]
            for r in e["levers"]:
                pred = predicted_gpu_gb(e["arch"], r)
                lines.append(f"| {r['lever']} | {r.get('train_peak_gb_128', '-')} | "
                             f"{r.get('peak_rss_gb_128')}{'' if r.get('fits_128', True) else ' (stopped)'} | "
                             f"{r.get('step_s_128')} | {pred['static_gb']} | {pred['activations_512_b16_gb']} | "
                             f"{pred['predicted_gpu_512_b16_gb']} |")
            lines.append("")
        if e.get("gpu"):
            lines += [f"### Predicted GPU memory at {e['gpu'][0]['pixels']} px", "",
                      "Static bytes by arithmetic (the base UNet in float32; weights + gradients + Adam's two moments, "
                      "16 B per trainable weight; the text encoders and VAE at their dtype) plus the activations one "
                      "student forward saves for its backward, counted on the meta device (float32, fused attention; "
                      "with checkpointing, the block-boundary tensors and one block's recomputation are not counted). "
                      "The CLIP loss (distill.clip_model) also decodes the student's x0 with gradients, which keeps "
                      "the decoder's activations: the teacher's VAE (distill.clip_decoder: vae) or the tiny TAESD "
                      "decoder (clip_decoder: tiny). FSDP rows (distill.sharding: fsdp): per GPU, the UNets, gradients and "
                      "Adam state divided by the GPU count; the whole weights of the one shard unit running at a time "
                      "come on top (at most ~0.4 GB per 100M-weight unit). Card: the smallest of 24/48/80 GB that holds the total within "
                      f"{int(HEADROOM * 100)}% of its memory. A prediction, not a GPU measurement.", "",
                      "| configuration | batch | static (GB) | activations (GB) | total (GB) | card | "
                      "+ CLIP loss through the VAE (GB) | card | + CLIP loss through TAESD (GB) | card |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['config']} | {r['batch']} | {r['static_gb']} | {r['activations_gb']} | {r['total_gb']} | "
                      f"{r['card']} | {r['clip_vae_gb']} | {r['clip_vae_card']} | {r['clip_tiny_gb']} | "
                      f"{r['clip_tiny_card']} |" for r in e["gpu"]]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.bench.fullsize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["sd21-base"], choices=["sd15", "sd21-base", "sd21", "sdxl"])
    parser.add_argument("--scale", choices=("full", "tiny"), default="full")
    parser.add_argument("--work", type=Path, default=Path("fullsize_work"), help="scratch folder (tens of GB at full size)")
    parser.add_argument("--out", type=Path, default=Path("reports/fullsize"))
    parser.add_argument("--resolution", type=int, default=128, help="distill.resolution of the rehearsal")
    parser.add_argument("--limit-gb", type=float, default=22.0, help="stop a stage whose anonymous (not file-backed) memory passes this")
    parser.add_argument("--levers", action="store_true", help="also measure the memory-lever table")
    parser.add_argument("--skip-stages", action="store_true", help="only the lever table")
    parser.add_argument("--lever-resolutions", type=int, nargs="+", default=[64, 128], metavar="PX",
                        help="resolutions of the lever runs (default 64 128)")
    parser.add_argument("--only-levers", metavar="TEXT", help="measure only the levers whose name contains TEXT "
                                                              "(rows replace those of the same name)")
    parser.add_argument("--report-only", action="store_true", help="rewrite README.md from metrics.json")
    parser.add_argument("--predict", type=int, metavar="PX",
                        help="only the predicted GPU memory table at PX pixels (batch 1, 2, 4), for each --arch")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted rehearsal (kept with --keep): skip the stages it finished")
    args = parser.parse_args(argv)
    metrics_path = args.out / "metrics.json"
    entries = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    key = lambda arch: arch if args.scale == "full" else f"{arch}-tiny"  # noqa: E731
    if args.predict:
        for arch in args.arch:
            entries.setdefault(key(arch), {"arch": arch, "scale": args.scale})["gpu"] = gpu_table(arch, args.predict)
        write_json(metrics_path, entries)
    if args.report_only or args.predict:
        with atomic_file(args.out / "README.md") as f:
            f.write(report(entries, machine()))
        return
    if args.scale == "full" and not args.resume and shutil.disk_usage(args.work.parent.resolve()).free < 40 * 2**30:
        raise UserError(f"--work {args.work}: a full-size rehearsal needs ~40 GB free on that disk")
    for arch in args.arch:
        work = (args.work / arch).resolve()      # the stages run inside it: its paths must not be relative
        print(f"{arch} ({args.scale}) in {work}", flush=True)
        entry = entries.get(key(arch), {}) if args.skip_stages else {}
        if not args.skip_stages:
            progress = work / PROGRESS
            previous = None
            if args.resume and work.is_dir():     # the entry written after each stage, else the last report's
                previous = json.loads(progress.read_text()) if progress.is_file() else entries.get(key(arch))
            settings = Settings(resolution=args.resolution, student="lora" if arch == "sdxl" else "full")
            entry = rehearse(arch, args.scale, work, settings, args.limit_gb, previous)
        if args.levers:
            rows = lever_table(arch, args.scale, work, args.limit_gb, tuple(args.lever_resolutions), args.only_levers)
            fresh = {r["lever"] for r in rows}
            kept = [r for r in entry.get("levers", []) if r["lever"] not in fresh] if args.only_levers else []
            order = [name for name, _ in LEVERS]
            entry["levers"] = sorted(kept + rows, key=lambda r: order.index(r["lever"]) if r["lever"] in order else 99)
        entries[key(arch)] = entry
        write_json(metrics_path, entries)
        with atomic_file(args.out / "README.md") as f:
            f.write(report(entries, machine()))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
