"""Screens of distillation recipes on the embedded world: each trained as `dvc repro distill` would with its
settings changed, evaluated on the eval prompts against the same teacher images, timed on this machine.

    python -m src.bench.quality --run sid_lsg anneal500      # train (resumable) + evaluate; one JSON each
    python -m src.bench.quality --run sid_lsg --seed 1       # the same recipe from another root seed
    python -m src.bench.quality --wide default steps4_s0     # finalists on the 2000-prompt eval set
    python -m src.bench.quality --speed steps2_s0 steps4_s0  # ONNX images/s of each against models/onnx
    python -m src.bench.quality --report                     # -> reports/distill/quality.md (+ a grid per run)

A recipe is a list of `dvc exp run -S` overrides (RECIPES); the default recipe's row is the DVC pipeline's own
student (reports/eval). Runs live in quality_work/<recipe>_s<seed>/: their checkpoints make an interrupted run
continue where it stopped. `--seed` changes the run's random draws (initial weights of the LoRA teacher, batches,
noise, t), not the prompts: every run is paired with the same teacher images. Needs `dvc repro evaluate` first
(the teacher's images are reused from eval_images/).
The screen's yardstick is the within-run gap to the teacher (accuracy, FID), set against the `fixed` recipe's
(the paper's fixed t range): retrained from other seeds, that student's gap moves by about 0.8 accuracy points
(reports/distill/seeds.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ..core.config import load_config
from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_file, write_json
from .common import machine

WORK = Path("quality_work")
OUT = Path("reports/distill/quality")
REPORT = Path("reports/distill/quality.md")
METRICS = ("attribute_accuracy", "fid", "clip_score")
HEAD = {"attribute_accuracy": "accuracy", "fid": "FID", "clip_score": "CLIP score"}

FIXED = "distill.t_max_end=null"         # the paper's fixed t range
BASELINE = "fixed"                       # the screens' yardstick: every lever was screened against this recipe
# name: (overrides in `dvc exp run -S` syntax, what the recipe changes)
RECIPES: dict[str, tuple[list[str], str]] = {
    "default": ([], "the default recipe (params.yaml: t_max annealed 980 -> 500), retrained with another seed"),
    "fixed": ([FIXED], "VSD + CLIP loss over the paper's fixed range, t in [20, 980] throughout the run"),
    "sid_lsg": ([FIXED, "distill.loss=sid", "distill.lora_guidance_scale=4.5", "distill.lora_train_guidance_scale=4.5"],
                "SiD-LSG, alpha 1.2, CFG 4.5 for the teacher, the fake score and its training"),
    "sid_fake1": ([FIXED, "distill.loss=sid"],
                  "SiD, alpha 1.2, CFG 4.5 on the teacher, 1 on the fake score (its conditional branch)"),
    "sid_clip4": ([FIXED, "distill.loss=sid", "distill.clip_weight=4.0"],
                  "SiD as sid_fake1, CLIP-loss weight 4 (SiD's gradient is ~3x VSD's: about the default's balance)"),
    "sid_lsg_alpha1": ([FIXED, "distill.loss=sid", "distill.sid_alpha=1.0", "distill.lora_guidance_scale=4.5",
                        "distill.lora_train_guidance_scale=4.5"], "SiD-LSG with alpha 1 (its SD scripts)"),
    "anneal500": (["distill.t_max_end=500"], "VSD, t_max annealed 980 -> 500 over the run"),
    "anneal300": (["distill.t_max_end=300"], "VSD, t_max annealed 980 -> 300 over the run"),
    "tmax700": ([FIXED, "distill.t_max=700"], "VSD, t in [20, 700]"),
    "cfg3": ([FIXED, "distill.guidance_scale=3.0"], "VSD, teacher CFG 3"),
    "cfg6": ([FIXED, "distill.guidance_scale=6.0"], "VSD, teacher CFG 6"),
    "steps2": ([FIXED, "distill.student_steps=2"], "VSD, a 2-step student (t = 599, 299), backward simulation"),
    "steps4": ([FIXED, "distill.student_steps=4"], "VSD, a 4-step student (t = 599, 449, 299, 149), backward simulation"),
    "steps2_anneal500": (["distill.student_steps=2", "distill.t_max_end=500"],
                         "a 2-step student with t_max annealed 980 -> 500"),
    "steps4_anneal500": (["distill.student_steps=4", "distill.t_max_end=500"],
                         "a 4-step student with t_max annealed 980 -> 500"),
    "steps4_t999": ([FIXED, "distill.student_steps=4", "distill.student_timestep=999"],
                    "VSD, a 4-step student at DMD2's timesteps (999, 749, 499, 249)"),
}


WIDE_PROMPTS = Path("prompts/eval_2000.jsonl")   # python -m src.prepare --eval-only 2000 --out prompts/eval_2000.jsonl
WIDE_IMAGES = Path("eval_wide")


def run_tag(recipe: str, seed: int, steps: int | None) -> str:
    """A run's name (its folder in WORK, its JSON and grid in OUT): recipe_s<seed>, _<steps> when --steps set it."""
    return f"{recipe}_s{seed}" + (f"_{steps}" if steps else "")


def set_length(row: dict) -> int | None:
    """The run's `--steps`, or None when it kept params.yaml's length."""
    return row["steps"] if f"distill.steps={row['steps']}" in row["overrides"] else None


def evaluate_wide(tag: str) -> dict:
    """A finished run's student (or `default`: models/student) on the 2000-prompt eval set, paired with the
    teacher on the same prompts and seeds (its images drawn once, in eval_wide/)."""
    from ..evaluate import Paths as EvalPaths
    from ..evaluate import evaluate
    from ..layout import resolve_teacher

    if not WIDE_PROMPTS.is_file():
        raise UserError(f"{WIDE_PROMPTS}: missing; write it with `python -m src.prepare --eval-only 2000 --out "
                        f"{WIDE_PROMPTS}`")
    config = load_config()
    student = Path("models/student") if tag == "default" else WORK / tag / "student"
    reports = WORK / tag / "eval_2000"
    teacher = resolve_teacher(config.distill.teacher, config.distill.teacher_config)
    evaluate(config.evaluate, teacher, EvalPaths(eval_prompts=WIDE_PROMPTS, student=student, images=WIDE_IMAGES,
                                                 student_name=tag, reports=reports))
    metrics = json.loads((reports / "metrics.json").read_text())
    versus = json.loads((reports / "intervals.json").read_text())["vs_teacher"]
    row = {"tag": tag, "prompts": 2000, "student": metrics[f"{tag}_1"], "teacher": metrics[versus["teacher"]],
           "vs_teacher": versus[f"{tag}_1"], "machine": machine()}
    write_json(OUT / "wide" / f"{tag}.json", row)
    return row


def run_recipe(name: str, seed: int, steps: int | None) -> dict:
    """Train (or resume) and evaluate one recipe; returns and writes its row."""
    from ..distill import Paths as DistillPaths
    from ..distill import distill
    from ..evaluate import Paths as EvalPaths
    from ..evaluate import evaluate
    from ..layout import resolve_teacher

    if name not in RECIPES:
        raise UserError(f"--run {name}: unknown recipe (expected one of {', '.join(RECIPES)})")
    overrides = [*RECIPES[name][0], f"seed={seed}"] + ([f"distill.steps={steps}"] if steps else [])
    config = load_config(overrides=overrides)
    tag = run_tag(name, seed, steps)
    work = WORK / tag
    tiny = Path(config.tiny_decoder) if config.tiny_decoder else None
    t0 = time.perf_counter()
    trained = distill(config.distill, config.lr, config.seed,
                      DistillPaths(checkpoints=work / "checkpoints", student=work / "student",
                                   reports=work / "distill", tiny_decoder=tiny))
    train_s = time.perf_counter() - t0
    teacher = resolve_teacher(config.distill.teacher, config.distill.teacher_config)
    evaluate(config.evaluate, teacher, EvalPaths(student=work / "student", student_name=tag,
                                                 reports=work / "eval"))
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    versus = json.loads((work / "eval" / "intervals.json").read_text())["vs_teacher"]
    row = {"recipe": name, "seed": seed, "overrides": overrides, "what": RECIPES[name][1],
           "steps": trained["steps"], "train_wall_s": round(train_s, 1), "steps_per_s": trained["steps_per_s"],
           "student": metrics[f"{tag}_1"], "teacher": metrics[versus["teacher"]], "vs_teacher": versus[f"{tag}_1"],
           "machine": machine()}
    write_json(OUT / f"{tag}.json", row)
    shutil.copyfile(work / "eval" / "grid.png", OUT / f"{tag}.png")
    return row


def speed(tags: list[str], batch: int = 16, repeats: int = 5) -> dict:
    """Images/s of the ONNX artifact (fp32, CPU) of each finished run against the pipeline's own (models/onnx),
    timed in turns on the same machine: what each extra step costs users of `src.infer` and `src.serve`."""
    from ..core.prompts import read_prepared
    from ..export import Paths as ExportPaths
    from ..export import export
    from ..method.noise import initial_noise
    from ..serving.runtime import load_artifact
    from .common import round_robin

    folders = {"default": Path("models/onnx")}
    for tag in tags:
        out = WORK / tag / "onnx"
        if not (out / "manifest.json").is_file():
            export(load_config().export, ExportPaths(student=WORK / tag / "student", out=out,
                                                     reports=WORK / tag / "export"))
        folders[tag] = out
    prompts = [r["prompt"] for r in read_prepared(Path("prompts/eval.jsonl"), batch)]
    calls, steps = {}, {}
    for tag, folder in folders.items():
        art = load_artifact(folder)
        ids, _ = art.token_ids(prompts)
        noise = initial_noise(list(range(batch)), tuple(art.contract["latent_shape"]))
        calls[tag] = lambda art=art, ids=ids, noise=noise: art.run(ids, noise)
        steps[tag] = art.contract.get("steps", 1)
    seconds = round_robin(calls, repeats)
    rows = {tag: {"steps": steps[tag], "batch": batch, "s_per_batch": round(t, 4), "images_per_s": round(batch / t, 1)}
            for tag, t in seconds.items()}
    write_json(OUT / "speed.json", {"machine": machine(), "rows": rows})
    return rows


def time_recipes(names: list[str], steps: int = 40) -> dict:
    """Training speed of each recipe, timed alone: `steps` steps from scratch in a scratch folder, no validation
    (the runs' own wall time shares the machine with whatever else ran). Written to OUT/timing.json."""
    import tempfile

    from ..distill import Paths as DistillPaths
    from ..distill import distill

    timing = json.loads((OUT / "timing.json").read_text()) if (OUT / "timing.json").is_file() else {}
    for name in names:
        if name not in RECIPES:
            raise UserError(f"--time {name}: unknown recipe (expected one of {', '.join(RECIPES)})")
        config = load_config(overrides=[*RECIPES[name][0], f"distill.steps={steps}", "distill.checkpoint_every=1000"])
        tiny = Path(config.tiny_decoder) if config.tiny_decoder else None
        with tempfile.TemporaryDirectory() as tmp:
            out = distill(config.distill, config.lr, config.seed,
                          DistillPaths(eval_prompts=Path(tmp) / "none.jsonl", checkpoints=Path(tmp) / "ck",
                                       student=Path(tmp) / "student", reports=Path(tmp) / "rep", tiny_decoder=tiny))
        timing[name] = {"steps": steps, "steps_per_s": out["steps_per_s"]}
        print(f"{name}: {out['steps_per_s']} steps/s")
    write_json(OUT / "timing.json", {**timing, "machine": machine()})
    return timing


def default_row() -> dict:
    """The DVC pipeline's student (the default recipe, seed 0) from reports/eval and reports/distill."""
    metrics = json.loads(Path("reports/eval/metrics.json").read_text())
    versus = json.loads(Path("reports/eval/intervals.json").read_text())["vs_teacher"]
    trained = json.loads(Path("reports/distill/metrics.json").read_text())
    return {"recipe": "default", "seed": 0, "overrides": [], "pipeline": True,
            "what": "the default (params.yaml): VSD + CLIP loss, t_max annealed 980 -> 500",
            "steps": trained["steps"], "train_wall_s": trained["wall_s"], "steps_per_s": trained["steps_per_s"],
            "student": metrics["student_1"], "teacher": metrics[versus["teacher"]], "vs_teacher": versus["student_1"]}


def cell(diff: dict, metric: str) -> str:
    low, high = diff[metric]["interval"]
    better = (high < 0) if metric == "fid" else (low > 0)
    worse = (low > 0) if metric == "fid" else (high < 0)
    word = "better" if better else "worse" if worse else "level"
    return f"{diff[metric]['difference']:+.3f} [{low:+.3f}, {high:+.3f}] {word}"


def table(rows: list[dict], timing: dict) -> list[str]:
    base = next((r for r in rows if r["recipe"] == BASELINE), None)
    lines = ["| recipe | seed | steps | train time, timed alone | accuracy | FID | CLIP score | accuracy vs teacher | FID vs teacher "
             f"| CLIP vs teacher | accuracy gap vs {BASELINE}'s | FID gap vs {BASELINE}'s |", "|" + "---|" * 12]
    for r in rows:
        s, v = r["student"], r["vs_teacher"]
        moved = ["-", "-"] if base is None or r is base else [
            f"{v[m]['difference'] - base['vs_teacher'][m]['difference']:+.3f}" for m in ("attribute_accuracy", "fid")]
        speed = timing.get(r["recipe"], {}).get("steps_per_s")
        cost = f"{r['steps'] / speed / 60:.1f} min ({speed:.2f} steps/s)" if speed else "-"
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['steps']} | {cost} | {s['attribute_accuracy']:.3f} | {s['fid']:.3f} | "
                     f"{s['clip_score']:.4f} | " + " | ".join(cell(v, m) for m in METRICS) + " | " + " | ".join(moved)
                     + " |")
    return lines


def over_seeds(rows: list[dict]) -> list[str]:
    """Mean and standard deviation of the within-run gap to the teacher for every recipe run with several
    seeds (the default's pipeline seeds are in seeds.md)."""
    import numpy as np

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if not r.get("pipeline"):
            name = r["recipe"] + (f" ({r['steps']} steps)" if set_length(r) else "")
            groups.setdefault(name, []).append(r)
    lines = []
    for name, group in groups.items():
        if len(group) < 2:
            continue
        if not lines:
            lines = ["", "## Over seeds", "",
                     "The within-run gap to the teacher (student minus teacher on the same prompts), mean ± standard "
                     "deviation over the seeds run with `--seed`. For the fixed range, seeds 0, 1 and 2 of the whole "
                     "pipeline: accuracy -0.035 ± 0.008, FID +0.064 ± 0.059 ([seeds.md](seeds.md)).", "",
                     "| recipe | seeds | accuracy gap | FID gap | CLIP-score gap |", "|---|---|---|---|---|"]
        cells = []
        for m in ("attribute_accuracy", "fid", "clip_score"):
            v = np.array([r["vs_teacher"][m]["difference"] for r in group])
            cells.append(f"{v.mean():+.3f} ± {v.std(ddof=1):.3f}")
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in group)} | " + " | ".join(cells) + " |")
    return lines


def report() -> str:
    rows = [default_row()] + [r for r in (json.loads(p.read_text()) for p in sorted(OUT.glob("*.json")))
                              if "recipe" in r]             # not speed.json / timing.json
    ran = [r for r in rows if not r.get("pipeline")]
    lines = ["# Distillation recipes, screened", "",
             f"Machine: {ran[0]['machine'] if ran else machine()}. Every row is one student trained with "
             "`src.distill` (the `dvc repro distill` code) from the recipe's overrides of params.yaml, then "
             "evaluated with `src.evaluate` on the same 500 eval prompts, seeds and teacher images as the "
             "default (teacher: 25 DDIM steps, CFG 4.5). In brackets: 95% bootstrap intervals of the paired "
             "difference from the teacher; better / worse only where the whole interval is on one side. The last "
             "two columns move the within-run gap relative to the `fixed` recipe's (the paper's fixed t range, which every "
             "lever was screened against): retrained from other seeds, that student's gap moves by about "
             "0.8 accuracy points ([seeds.md](seeds.md)). Train time: the run's steps at the "
             "recipe's speed timed alone on this machine (`--time`: 40 steps from scratch, no validation).", ""]
    notes = OUT / "notes.md"             # the findings, written by hand from the tables below
    if notes.is_file():
        lines += [notes.read_text().strip(), "", "## Screens (500 prompts)", ""]
    timing = json.loads((OUT / "timing.json").read_text()) if (OUT / "timing.json").is_file() else {}
    lines += table(rows, timing)
    lines += ["", "| recipe | overrides (`dvc exp run -S ...`) | what it changes |", "|---|---|---|"]
    for name, (overrides, what) in RECIPES.items():
        if any(r["recipe"] == name for r in ran):
            lines.append(f"| {name} | {' '.join(f'`{o}`' for o in overrides)} | {what} |")
    lines += over_seeds(rows)
    wide = sorted((json.loads(p.read_text()) for p in (OUT / "wide").glob("*.json")),
                  key=lambda w: (not w["tag"].startswith(BASELINE), w["tag"]))
    if wide:
        lines += ["", "## Finalists on 2000 prompts", "",
                  "The 2000-prompt eval set (`prompts/eval_2000.jsonl`; its first 500 are the ones above), paired "
                  "with the teacher on the same prompts and seeds (`python -m src.bench.quality --wide RUN`).", "",
                  "| student | accuracy | FID | CLIP score | accuracy vs teacher | FID vs teacher | CLIP vs teacher |",
                  "|---|---|---|---|---|---|---|"]
        t = wide[0]["teacher"]
        lines.append(f"| teacher, 25 steps + CFG | {t['attribute_accuracy']:.3f} | {t['fid']:.3f} | "
                     f"{t['clip_score']:.4f} | - | - | - |")
        for w in wide:
            st = w["student"]
            lines.append(f"| {w['tag']} | {st['attribute_accuracy']:.3f} | {st['fid']:.3f} | {st['clip_score']:.4f} | "
                         + " | ".join(cell(w["vs_teacher"], m) for m in METRICS) + " |")
    if (OUT / "speed.json").is_file():
        timed = json.loads((OUT / "speed.json").read_text())
        lines += ["", "## What each step costs", "",
                  f"ONNX Runtime, fp32, CPU provider, batch {next(iter(timed['rows'].values()))['batch']}, "
                  f"on {timed['machine']}; each artifact exported by `src.export` from the run's student and timed "
                  "in turns with the others (`python -m src.bench.quality --speed ...`).", "",
                  "| student | steps | s per batch | images/s | vs the one-step default |", "|---|---|---|---|---|"]
        base = timed["rows"]["default"]["images_per_s"]
        for tag, r in timed["rows"].items():
            lines.append(f"| {tag} | {r['steps']} | {r['s_per_batch']:.3f} | {r['images_per_s']:.1f} | "
                         f"{r['images_per_s'] / base:.2f}x |")
    lines += ["", "## Samples", ""]
    for r in ran:
        tag = run_tag(r["recipe"], r["seed"], set_length(r))
        lines += [f"### {tag}", "", f"![{tag}](quality/{tag}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", nargs="*", default=[], help=f"recipes to train and evaluate: {', '.join(RECIPES)}")
    parser.add_argument("--seed", type=int, default=0, help="root seed of the runs (prompts, noise, draws)")
    parser.add_argument("--steps", type=int, default=None, help="distill.steps (default: params.yaml's)")
    parser.add_argument("--speed", nargs="*", default=[], metavar="RUN",
                        help="finished runs (e.g. steps2_s0) to export and time against models/onnx")
    parser.add_argument("--wide", nargs="*", default=[], metavar="RUN",
                        help=f"finished runs (or default) to evaluate on {WIDE_PROMPTS}")
    parser.add_argument("--time", nargs="*", default=[], metavar="RECIPE",
                        help="time each recipe's training alone (40 steps; run it on an idle machine)")
    parser.add_argument("--report", action="store_true", help=f"write {REPORT} from every finished run")
    args = parser.parse_args(argv)
    if not (args.run or args.report or args.speed or args.wide or args.time):
        parser.error("nothing to do: give --run RECIPE..., --wide RUN..., --speed RUN... and/or --report")
    for name in args.run:
        row = run_recipe(name, args.seed, args.steps)
        print(f"{name} (seed {args.seed}): " + ", ".join(f"{HEAD[m]} {row['student'][m]:.3f}" for m in METRICS))
    if args.time:
        time_recipes(args.time)
    for tag in args.wide:
        row = evaluate_wide(tag)
        print(f"{tag} on 2000 prompts: " + ", ".join(f"{HEAD[m]} {row['student'][m]:.3f}" for m in METRICS))
    if args.speed:
        for tag, r in speed(args.speed).items():
            print(f"{tag}: {r['steps']} step(s), {r['images_per_s']} images/s")
    if args.report:
        with atomic_file(REPORT) as f:
            f.write(report())
        print(f"wrote {REPORT}")


if __name__ == "__main__":
    run_cli(main)
