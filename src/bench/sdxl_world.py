"""The SDXL-layout world: distill, evaluate and export a one-step student of models/teacher_sdxl.

    python -m src.world.build --only-sdxl-teacher      # once: models/teacher_sdxl (about 35 min on 2 cores)
    python -m src.bench.sdxl_world                      # about 20 min: writes reports/sdxl/

The SDXL world teacher has two text encoders (the SD world teacher's, and a second CLIP with a projection
whose pooled embedding feeds SDXL's text-time conditioning with the six time ids) around the same VAE
and tokenizer. This runs the DVC stages on it exactly as `dvc repro` runs them on the SD teacher, each
as its own process in a work folder (the repository's params.yaml and prompts/, models/teacher pointing
at models/teacher_sdxl):

    distill -> evaluate (world mode: teacher 1 step, teacher 25 steps + CFG, student 1 step) ->
    export (fp32, fp16 with the VAE in float32) -> fp16 with the VAE in float16 too (parity only)

and writes reports/sdxl/README.md (the table with intervals, the paired difference against the
teacher, the student's bar against the SD world's), reports/sdxl/metrics.json and the evaluation's
grid. Needs the repository's prompts/ (`dvc repro prepare`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from .common import machine
from .fullsize import REPO, StageRun, run_stage

LINKED = {"models/teacher": "models/teacher_sdxl", "models/guide": "models/guide",
          "models/evaluator": "models/evaluator", "models/tiny_decoder": "models/tiny_decoder", "prompts": "prompts"}
ACCURACY_BAR = 0.95           # the student's attribute accuracy at least this share of the teacher's (25 steps, CFG)


def prepare_work(work: Path, root: Path) -> None:
    """The work folder: root's params.yaml, its inputs linked, models/teacher -> the SDXL teacher."""
    for source in LINKED.values():
        if not (root / source).exists():
            hint = ("python -m src.world.build --only-sdxl-teacher" if "sdxl" in source else "dvc repro prepare")
            raise UserError(f"{root / source} is missing (make it with `{hint}`)")
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "params.yaml", work / "params.yaml")
    for name, source in LINKED.items():
        link = work / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((root / source).resolve(), target_is_directory=True)


def fp16_vae_variant(student: Path, out: Path) -> Path:
    """A copy of the student whose VAE does not ask for float32 (`force_upcast` false), to measure what the
    float32 VAE buys in the fp16 artifact."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(student, out, symlinks=False)
    config = out / "vae" / "config.json"
    spec = json.loads(config.read_text())
    spec["force_upcast"] = False
    config.write_text(json.dumps(spec, indent=2))
    return out


def stage(name: str, argv: list[str], work: Path, runs: dict[str, StageRun]) -> StageRun:
    run = run_stage(argv, work, work / f"{name}.log", limit_gb=20.0)
    runs[name] = run
    if not run.ok:
        raise UserError(f"{name} failed ({run.note or f'exit code {run.returncode}'}); its log: {work / f'{name}.log'}\n"
                        + run.log[-2000:])
    print(f"{name}: {run.wall_s:.0f} s, peak {run.peak_rss_gb:.2f} GB")
    return run


def verdicts(metrics: dict, intervals: dict) -> dict:
    """The student's bar: accuracy >= 0.95x the teacher's (25 steps, CFG); FID and CLIP score level or better
    (the paired interval of student minus teacher does not say worse)."""
    teacher, student = metrics[intervals["vs_teacher"]["teacher"]], metrics["student_1"]
    paired = intervals["vs_teacher"]["student_1"]
    ratio = student["attribute_accuracy"] / teacher["attribute_accuracy"] if teacher["attribute_accuracy"] else float("nan")
    out = {"accuracy_ratio": ratio, "accuracy_ok": ratio >= ACCURACY_BAR}
    for key, better in (("fid", "lower"), ("clip_score", "higher")):
        lo, hi = paired[key]["interval"]
        worse = lo > 0 if better == "lower" else hi < 0
        out[f"{key}_paired"] = [lo, hi]
        out[f"{key}_ok"] = not worse
    out["meets_bar"] = out["accuracy_ok"] and out["fid_ok"] and out["clip_score_ok"]
    return out


def export_parity(work: Path, reports: str) -> dict:
    return json.loads((work / reports / "metrics.json").read_text())


def write_readme(path: Path, record: dict, eval_readme: str) -> None:
    v, build, parity = record["bar"], record["teacher_build"], record["export"]
    curve = build.get("unet_curve", [])
    ok = "meets" if v["meets_bar"] else "does not meet"
    lines = [
        "# The SDXL-layout world",
        "",
        "An SDXL-layout teacher on the embedded world: two text encoders (the SD world teacher's CLIP text tower and "
        "a second CLIP whose projected text embedding is the pooled conditioning), the UNet's `text_time` added "
        "conditioning (pooled embedding + six time ids), zeros for the empty prompt (`force_zeros_for_empty_prompt`), "
        "the SD world's VAE and tokenizer. Built by `python -m src.world.build --only-sdxl-teacher`; distilled, "
        "evaluated and exported by `python -m src.bench.sdxl_world` with the repository's params.yaml (the SD world's "
        "settings, unchanged) on " + record["machine"] + ".",
        "",
        f"**The one-step student {ok} the SD world's bar**: attribute accuracy {v['accuracy_ratio']:.3f}x the teacher's "
        f"(bar: {ACCURACY_BAR}x); FID paired difference [{v['fid_paired'][0]:+.3f}, {v['fid_paired'][1]:+.3f}] "
        f"({'level or better' if v['fid_ok'] else 'worse'}); CLIP score paired difference "
        f"[{v['clip_score_paired'][0]:+.4f}, {v['clip_score_paired'][1]:+.4f}] "
        f"({'level or better' if v['clip_score_ok'] else 'worse'}).",
        "",
        *beside_sd(record),
        "## Evaluation",
        "",
        eval_readme.split("\n", 2)[2].strip().replace("](grid.png)", "](grid.png)"),
        "",
        "## Teacher",
        "",
        "| UNet step | loss | judge accuracy (10 steps, CFG 4.5, 64 held-out scenes) |",
        "|---|---|---|",
        *(f"| {c['step']} | {c['loss']:.4f} | {c['attribute_accuracy_10']:.3f} |" for c in curve),
        "",
        f"Second text CLIP: retrieval accuracy {build['metrics'].get('text_clip_2_retrieval_accuracy', float('nan')):.3f} "
        f"on held-out scenes, {build['wall_s'].get('text_clip_2', 0):.0f} s; UNet "
        f"{build['config'].get('unet_steps', '?')} steps in {build['wall_s'].get('unet', 0):.0f} s (the SD world "
        "teacher's UNet: 7000 steps; the build's wall times were taken with other work sharing the two cores).",
        "",
        "## Distillation and export",
        "",
        "| stage | wall time (s) | peak resident memory (GB) |",
        "|---|---|---|",
        *(f"| {k} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} |" for k, r in record["stages"].items()),
        "",
        "Parity of the ONNX artifact against the PyTorch student on the same prompts and noise (PSNR, dB; "
        "higher is closer):",
        "",
        "| graph | PSNR (dB) | largest pixel error | size (MB) |",
        "|---|---|---|---|",
        *(f"| {name} | {p['psnr']:.1f} | {p['max_abs_err']:.4f} | {p['size_mb']:.2f} |" for name, p in parity.items()),
        "",
        "The fp16 graph keeps the decoder in float32 whenever the VAE's config says `force_upcast` (SDXL base's VAE "
        "overflows in float16). The world's small VAE does not overflow: both fp16 graphs keep parity here.",
        "",
    ]
    with atomic_file(path) as tmp:
        tmp.write("\n".join(lines))


def beside_sd(record: dict) -> list[str]:
    """The SD world's teacher and student (reports/eval/metrics.json, same prompts, seeds and settings) next to
    the SDXL world's, when that file is there."""
    sd = record.get("sd_world")
    if not sd:
        return []
    rows = [("SD world", sd), ("SDXL-layout world", record["metrics"])]
    return ["Beside the SD world (reports/eval: the same 500 prompts, seeds and settings):", "",
            "| world | teacher 25 steps: FID / CLIP / accuracy | student 1 step: FID / CLIP / accuracy | "
            "student / teacher accuracy |", "|---|---|---|---|",
            *(f"| {name} | {m['teacher_25']['fid']:.3f} / {m['teacher_25']['clip_score']:.4f} / "
              f"{m['teacher_25']['attribute_accuracy']:.3f} | {m['student_1']['fid']:.3f} / "
              f"{m['student_1']['clip_score']:.4f} / {m['student_1']['attribute_accuracy']:.3f} | "
              f"{m['student_1']['attribute_accuracy'] / m['teacher_25']['attribute_accuracy']:.3f}x |"
              for name, m in rows), ""]


def parity_rows(metrics: dict, names: dict[str, str]) -> dict:
    """{graph name: PSNR, largest error, size} from an export metrics.json, for the precisions in `names`."""
    return {name: {"psnr": metrics[f"psnr_{p}"], "max_abs_err": metrics[f"max_abs_err_{p}"],
                   "size_mb": metrics[f"size_mb_{p}"]} for p, name in names.items()}


def run(work: Path, reports: Path, root: Path = REPO) -> dict:
    prepare_work(work, root)
    runs: dict[str, StageRun] = {}
    stage("distill", ["-m", "src.distill"], work, runs)
    stage("evaluate", ["-m", "src.evaluate"], work, runs)
    stage("export", ["-m", "src.export"], work, runs)
    variant = fp16_vae_variant(work / "models/student", work / "models/student_vae16")
    stage("export_vae_fp16", ["-m", "src.export", "--student", str(variant), "--out", "models/onnx_vae16",
                              "--reports", "reports/export_vae16", "--set", "export.min_psnr_fp16=0"], work, runs)
    metrics = json.loads((work / "reports/eval/metrics.json").read_text())
    intervals = json.loads((work / "reports/eval/intervals.json").read_text())
    build = json.loads((root / "models/build.json").read_text()).get("teacher_sdxl", {})
    export = parity_rows(export_parity(work, "reports/export"), {"fp32": "fp32", "fp16": "fp16, VAE in float32"})
    export |= parity_rows(export_parity(work, "reports/export_vae16"), {"fp16": "fp16, VAE in float16"})
    distill = json.loads((work / "reports/distill/metrics.json").read_text()) \
        if (work / "reports/distill/metrics.json").is_file() else {}
    sd_metrics = root / "reports/eval/metrics.json"
    record = {"machine": machine(), "metrics": metrics, "intervals": intervals, "bar": verdicts(metrics, intervals),
              "sd_world": json.loads(sd_metrics.read_text()) if sd_metrics.is_file() else None,
              "teacher_build": build, "distill": distill, "export": export,
              "stages": {k: r.row() for k, r in runs.items()}}
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "metrics.json", record)
    shutil.copy(work / "reports/eval/grid.png", reports / "grid.png")
    write_readme(reports / "README.md", record, (work / "reports/eval/README.md").read_text())
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "sdxl_world_work", help="work folder (resumable)")
    parser.add_argument("--reports", type=Path, default=REPO / "reports/sdxl", help="where README.md goes")
    parser.add_argument("--root", type=Path, default=REPO,
                        help="the folder whose params.yaml, prompts/ and models/ (teacher_sdxl, guide, evaluator, "
                             "tiny_decoder, build.json) are used")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite README.md from metrics.json and the work folder's evaluation")
    args = parser.parse_args(argv)
    if args.report_only:
        record = json.loads((args.reports / "metrics.json").read_text())
        write_readme(args.reports / "README.md", record, (args.work / "reports/eval/README.md").read_text())
        return
    record = run(args.work, args.reports, args.root)
    print(f"wrote {args.reports}/README.md: student {'meets' if record['bar']['meets_bar'] else 'misses'} the bar "
          f"(accuracy {record['bar']['accuracy_ratio']:.3f}x the teacher's)")


if __name__ == "__main__":
    run_cli(main)
