"""What turning the full student into a LoRA of its teacher costs, per rank, on the embedded world.

    python -m src.bench.lora_ranks                       # ranks 4 8 16 32 64 128 256; reports/lora/README.md
    python -m src.bench.lora_ranks --ranks 16 64 --report-only

For each rank: `python -m src.lora`'s extraction (src/artifact/lora.py), the teacher's UNet with that LoRA
added, its one-step images on the eval prompts and seeds of `evaluate`, and accuracy, FID and CLIP score with
their intervals, and the paired difference from the full student on the same prompts (better / worse only
where the whole interval says so). Needs `dvc repro evaluate` first: the full student's and the teacher's
images are reused from eval_images/.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..artifact.lora import DIFFUSERS_FILE, apply, extract, write
from ..core.config import load_config
from ..core.errors import UserError, run_cli
from ..core.figures import sample_grid
from ..core.fileio import atomic_file, write_json
from ..core.prompts import read_prepared
from ..lora import student_of
from .common import machine

RANKS = [4, 8, 16, 32, 64, 128, 256]


def rank_student(student: Path, teacher_unet, lora, out: Path) -> Path:
    """A student pipeline folder whose UNet is the teacher's plus the LoRA: what a LoRA loader draws."""
    unet = apply(teacher_unet, lora)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(student, out, ignore=lambda folder, names: names if Path(folder).name == "unet" else
                    [n for n in names if n in ("lora",)])
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def measure(cfg, work: Path, names: list[str], baseline: str) -> tuple[dict, dict]:
    """(metrics, intervals) of the named image folders in work/images, paired against `baseline`."""
    from ..evaluate import Paths, fid_statistic, intervals, measure_world, point_metrics
    from ..scoring.metrics import load_clip

    records = read_prepared(Paths().eval_prompts, cfg.limit)
    scorer = load_clip(cfg.evaluator, torch.device("cpu"))
    measured, reference_stats, _ = measure_world(cfg, Paths(images=work / "images"), records, names, scorer,
                                                 torch.device("cpu"))
    fids = {n: fid_statistic(m.features, reference_stats) for n, m in measured.items() if m.features is not None}
    metrics = {n: point_metrics(m, fids.get(n)) for n, m in measured.items()}
    return metrics, intervals(measured, fids, metrics, baseline, cfg)


def run(ranks: list[int], student: Path, work: Path, reports: Path, params: str) -> list[dict]:
    from diffusers import UNet2DConditionModel

    from ..evaluate import CONVENTION, Paths, fill_folder, make_generators, tree_digest

    config = load_config(params, [])
    cfg, teacher = config.evaluate, config.distill.teacher
    if cfg.mode != "world":
        raise UserError("lora_ranks: measured on the embedded world (evaluate.mode: world)")
    teacher_n = f"teacher_{cfg.teacher_steps}"
    for name in ("reference", "student_1", teacher_n):
        if not (Path("eval_images") / name).is_dir():
            raise UserError(f"eval_images/{name}: missing; run `dvc repro evaluate` first")
        if not (work / "images" / name).is_dir():
            shutil.copytree(Path("eval_images") / name, work / "images" / name)
    records = read_prepared(Paths().eval_prompts, cfg.limit)
    prompts_digest = tree_digest(Paths().eval_prompts, cfg.limit, cfg.mode)
    pipeline_class, timesteps = student_of(student)
    student_unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet")
    rows = []
    for rank in ranks:
        teacher_unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
        lora = extract(student_unet, teacher_unet, rank)
        folder = work / f"rank_{rank}"
        m = write(folder / "lora", lora, pipeline_class, timesteps, "student_lora")
        size = (folder / "lora" / DIFFUSERS_FILE).stat().st_size
        pipe_dir = rank_student(student, teacher_unet, lora, folder / "student")
        name = f"rank_{rank}_1"
        gens = make_generators(cfg, teacher, pipe_dir, cfg.batch_size, student_name=f"rank_{rank}")
        fill_folder(work / "images" / name, records, gens[name], cfg.batch_size, name,
                    tree_digest(name, prompts_digest, tree_digest(pipe_dir), CONVENTION))
        rows.append({"rank": rank, "name": name, "kept_energy": m["kept_energy"], "ranks": m["ranks"],
                     "left_out_relative": m["left_out_relative"], "parameters": m["parameters"],
                     "file_mb": round(size / 2**20, 2)})
        print(f"rank {rank}: keeps {100 * m['kept_energy']:.2f}% of the weight change, {size / 2**20:.2f} MB",
              flush=True)
    metrics, uncertainty = measure(cfg, work, [teacher_n, "student_1", *[r["name"] for r in rows]],
                                   "student_1")
    out = {"rows": rows, "metrics": metrics, "intervals": uncertainty, "teacher": teacher_n, "machine": machine(),
           "student_parameters": sum(p.numel() for p in student_unet.parameters())}
    write_json(reports / "metrics.json", out)
    grid_records = records[:cfg.grid_rows]
    from ..evaluate import load_folder

    shown = {"teacher": load_folder(work / "images" / teacher_n, grid_records),
             "full student": load_folder(work / "images" / "student_1", grid_records)}
    shown |= {f"rank {r['rank']}": load_folder(work / "images" / r["name"], grid_records) for r in rows}
    with atomic_file(reports / "grid.png", "wb") as f:
        sample_grid(shown, [r["prompt"] for r in grid_records]).save(f, format="PNG")
    with atomic_file(reports / "README.md") as f:
        f.write(report(out))
    return rows


def cell(m: dict, ci: dict, key: str) -> str:
    return f"{m[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]" if key in ci else f"{m[key]:.3f}"


def report(out: dict) -> str:
    from ..evaluate import HEADLINE, verdict

    unc, metrics = out["intervals"], out["metrics"]
    ci = unc.get("intervals", {})
    n = unc.get("prompts", "?")
    lines = ["# The student as a LoRA of its teacher: what each rank costs", "",
             f"`python -m src.bench.lora_ranks` on {out.get('machine', 'this machine')}. The full student of `dvc repro` (UNet "
             f"{out['student_parameters'] / 1e6:.1f}M parameters) turned into a LoRA of the teacher by `python -m "
             "src.lora` (truncated SVD of each Linear and Conv2d weight change, rank r = min(rank, the layer's "
             "own)), added to the teacher's UNet as a LoRA loader adds it, and drawn in one step on the "
             f"{n} eval prompts and seeds of `evaluate`. In brackets the {unc.get('confidence', 0.95):.0%} bootstrap "
             "interval over the prompts; the last columns are the paired difference from the full student on the "
             "same prompts (better / worse only where the whole interval says so).", "",
             "| model | parameters | file (MB) | weight change kept | " + " | ".join(HEADLINE.values()) + " | " +
             " | ".join(f"{v} vs full student" for v in HEADLINE.values()) + " |",
             "|" + "---|" * (4 + 2 * len(HEADLINE))]
    for label, name in ((f"teacher, {out['teacher'].split('_')[1]} steps", out["teacher"]),
                        ("full student", "student_1")):
        lines.append(f"| {label} | | | | " + " | ".join(cell(metrics[name], ci.get(name, {}), k) for k in HEADLINE)
                     + " |" + " |" * len(HEADLINE))
    for r in out["rows"]:
        m, vs = metrics[r["name"]], unc.get("vs_teacher", {}).get(r["name"], {})
        diffs = [f"{vs[k]['difference']:+.3f} [{vs[k]['interval'][0]:+.3f}, {vs[k]['interval'][1]:+.3f}] "
                 f"{verdict(k, *vs[k]['interval'])}" if k in vs else "-" for k in HEADLINE]
        lines.append(f"| LoRA rank {r['rank']} | {r['parameters'] / 1e6:.2f}M | {r['file_mb']} | "
                     f"{100 * r['kept_energy']:.1f}% | " + " | ".join(cell(m, ci.get(r["name"], {}), k)
                                                                      for k in HEADLINE) + " | " + " | ".join(diffs) + " |")
    left = out["rows"][0]["left_out_relative"] if out["rows"] else 0
    pick = default_rank(out)
    lines += ["", f"**Default rank: {pick}**: the smallest rank with no metric worse than the full student on the "
              f"paired test and at least {KEEP:.0%} of the weight change kept (`python -m src.lora` prints the share it "
              "keeps: on a real UNet, whose layers are wider than the world's, that share is the guide to a rank).",
              "", f"Bias and normalisation changes cannot ride on a LoRA (diffusers' and kohya's formats carry "
              f"Linear and Conv2d weights): they are {100 * left:.1f}% of the student's change (in norm) and stay "
              "the teacher's at every rank.", "", "![teacher, full student, then one column per rank](grid.png)", ""]
    return "\n".join(lines)


KEEP = 0.95


def default_rank(out: dict) -> int | None:
    """The smallest rank whose paired differences from the full student are none of them worse and that keeps
    at least KEEP of the weight change."""
    from ..evaluate import HEADLINE, verdict

    for r in sorted(out["rows"], key=lambda r: r["rank"]):
        vs = out["intervals"].get("vs_teacher", {}).get(r["name"], {})
        if r["kept_energy"] >= KEEP and all(verdict(k, *vs[k]["interval"]) != "worse" for k in HEADLINE if k in vs):
            return r["rank"]
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.bench.lora_ranks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=RANKS)
    parser.add_argument("--student", type=Path, default=Path("models/student"))
    parser.add_argument("--work", type=Path, default=Path("lora_work"), help="rank folders and their images")
    parser.add_argument("--reports", type=Path, default=Path("reports/lora"))
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--report-only", action="store_true", help="rewrite README.md from metrics.json")
    args = parser.parse_args(argv)
    if args.report_only:
        with atomic_file(args.reports / "README.md") as f:
            f.write(report(json.loads((args.reports / "metrics.json").read_text())))
        return
    run(args.ranks, args.student, args.work, args.reports, args.params)


if __name__ == "__main__":
    run_cli(main)
