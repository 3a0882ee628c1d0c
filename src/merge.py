"""SwiftBrush v2's weight merge of two one-step students (docs/design.md, "SwiftBrush v2, the parts adopted").

    python -m src.merge A B --lam 0.5 --out models/merged
    python -m src.merge A B --curve 0,0.25,0.5,0.75,1 --report reports/distill/merge.md

theta = lam * theta_A + (1 - lam) * theta_B over every UNet weight; v2 merges a fully fine-tuned student
trained with VSD alone (A) and a LoRA student trained with VSD and the clamped CLIP loss (B), lam = 0.5.
A and B are student pipelines as `distill` saves them (a LoRA student is saved merged into its UNet), from
the same teacher: the text encoder, VAE, tokenizer and student timestep must match. The result is a complete
one-step student pipeline (A's other parts), which `python -m src.evaluate --student` and
`python -m src.export --student` take like any other.

With --curve, each lam is merged into <work>/lam_<lam> and evaluated (the `evaluate` section of the params
file, the teacher's images drawn once and reused); the table of every metric with its interval, against the
teacher on the same prompts, goes to --report, with a sample grid (one column per lam) beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .core.errors import UserError, run_cli
from .core.fileio import atomic_dir, atomic_file

SHARED_PARTS = ("text_encoder", "vae", "tokenizer")     # must be the same teacher's in A and B


def read_student(folder: Path) -> dict:
    """A one-step student pipeline's swiftbrush.json, or the error saying what the folder lacks."""
    if not (folder / "model_index.json").is_file():
        raise UserError(f"merge: {folder} is not a diffusers pipeline folder (no model_index.json)")
    marker = folder / "swiftbrush.json"
    if not marker.is_file():
        raise UserError(f"merge: {folder} is not a one-step student (no swiftbrush.json; `distill` writes it)")
    if not list((folder / "unet").glob("diffusion_pytorch_model*.safetensors")):
        adapters = list((folder / "unet").glob("*lora*")) + list((folder / "unet").glob("adapter_*"))
        hint = " (it holds LoRA weights: merge them into the UNet first; `distill` saves LoRA students merged)" \
            if adapters else ""
        raise UserError(f"merge: {folder}/unet has no diffusion_pytorch_model.safetensors{hint}")
    return json.loads(marker.read_text())


def check_pair(a: Path, b: Path) -> dict:
    """Both students' swiftbrush.json after checking that they can be merged (one clear error otherwise)."""
    from .evaluate import tree_digest

    meta_a, meta_b = read_student(a), read_student(b)
    if meta_a.get("timestep") != meta_b.get("timestep"):
        raise UserError(f"merge: the students were trained at different student timesteps ({a}: "
                        f"{meta_a.get('timestep')}, {b}: {meta_b.get('timestep')}); their weights do not mix")
    config_a, config_b = (json.loads((f / "unet" / "config.json").read_text()) for f in (a, b))
    differ = sorted(k for k in set(config_a) | set(config_b)
                    if not k.startswith("_") and config_a.get(k) != config_b.get(k))
    if differ:
        raise UserError(f"merge: {a} and {b} have different UNets (config keys {', '.join(differ)})")
    for part in SHARED_PARTS:
        if (a / part).is_dir() != (b / part).is_dir() or \
                ((a / part).is_dir() and tree_digest(a / part) != tree_digest(b / part)):
            raise UserError(f"merge: {a}/{part} and {b}/{part} differ: both students must come from the same teacher")
    return meta_a


def merge_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """lam * a + (1 - lam) * b for every floating tensor (computed in float64, stored in a's dtype)."""
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))[:3]
        raise UserError(f"merge: the UNets hold different weights ({', '.join(missing)} ...)")
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise UserError(f"merge: weight {k} has shape {tuple(va.shape)} in A and {tuple(vb.shape)} in B")
        out[k] = (lam * va.double() + (1 - lam) * vb.double()).to(va.dtype) if va.is_floating_point() else va
    return out


def merge(a: Path, b: Path, lam: float, out: Path) -> Path:
    """Write the merged student pipeline to `out` (atomically: a failed merge leaves nothing there)."""
    from safetensors.torch import load_file, save_file

    if not 0.0 <= lam <= 1.0:
        raise UserError(f"merge: --lam {lam}: expected a weight in [0, 1] (1 = A alone, 0 = B alone)")
    meta = check_pair(a, b)
    weights = "unet/diffusion_pytorch_model.safetensors"
    if not (a / weights).is_file() or not (b / weights).is_file():
        raise UserError(f"merge: expected one {weights} in each student (sharded UNets are not supported)")
    merged = merge_states(load_file(str(a / weights)), load_file(str(b / weights)), lam)
    with atomic_dir(out) as tmp:
        unet_weights = lambda folder, names: [n for n in names if Path(folder).name == "unet"    # noqa: E731
                                              and n.startswith("diffusion_pytorch_model")]
        shutil.copytree(a, tmp, dirs_exist_ok=True, ignore=unet_weights)
        save_file(merged, str(tmp / weights), metadata={"format": "pt"})
        (tmp / "swiftbrush.json").write_text(json.dumps(
            {**meta, "merge": {"lam": lam, "a": str(a), "b": str(b),
                               "rule": "lam * theta_A + (1 - lam) * theta_B (SwiftBrush v2)"}}, indent=2))
    return out


# --------------------------------------------------------------------------- the curve


def curve(a: Path, b: Path, lams: list[float], work: Path, report: Path, params: str = "params.yaml",
          overrides: list[str] | None = None, labels: tuple[str, str] | None = None) -> list[dict]:
    """Merge and evaluate at every lam; write the markdown table and the sample grid; return the rows."""
    from .core.config import load_config
    from .core.figures import sample_grid
    from .core.prompts import read_prepared
    from .evaluate import Paths, evaluate, load_folder
    from .layout import resolve_teacher

    config = load_config(params, overrides or [])
    cfg = config.evaluate
    for name in ("reference", "teacher_1", f"teacher_{cfg.teacher_steps}"):    # drawn by `evaluate` already?
        if (Path("eval_images") / name).is_dir() and not (work / "images" / name).exists():
            shutil.copytree(Path("eval_images") / name, work / "images" / name)     # (checked by its fingerprint)
    rows = []
    for lam in lams:
        student = merge(a, b, lam, work / f"lam_{lam:g}")
        reports = work / f"eval_lam_{lam:g}"
        metrics = evaluate(cfg, resolve_teacher(config.distill.teacher, config.distill.teacher_config), Paths(student=student, images=work / "images",
                                                              reports=reports, student_name=f"lam_{lam:g}"))
        intervals = json.loads((reports / "intervals.json").read_text())
        rows.append({"lam": lam, "metrics": metrics, "intervals": intervals})
    records = read_prepared(Paths().eval_prompts, cfg.grid_rows)
    teacher = f"teacher_{cfg.teacher_steps}"
    shown = {teacher: load_folder(work / "images" / teacher, records)}
    shown |= {f"lam {r['lam']:g}": load_folder(work / "images" / f"lam_{r['lam']:g}_1", records) for r in rows}
    grid = sample_grid(shown, [r["prompt"] for r in records])
    with atomic_file(report.with_suffix(".png"), "wb") as f:
        grid.save(f, format="PNG")
    with atomic_file(report) as f:
        f.write(curve_report(rows, labels or (f"`{a}`", f"`{b}`"), teacher, report.with_suffix(".png").name))
    with atomic_file(report.with_suffix(".json")) as f:
        json.dump(rows, f, indent=2)
    return rows


def curve_report(rows: list[dict], labels: tuple[str, str], teacher: str, grid_name: str) -> str:
    from .evaluate import HEADLINE, verdict

    first = rows[0]["intervals"]
    lines = ["# Weight merge: lam * A + (1 - lam) * B", "",
             f"A = {labels[0]}, B = {labels[1]} (lam 1 is A alone, 0 is B alone). Each merge evaluated on the same "
             f"{first.get('prompts', '?')} eval prompts and seeds as {teacher}; in brackets the "
             f"{first.get('confidence', 0.95):.0%} bootstrap interval over the prompts; the last columns are the "
             f"paired difference from {teacher} (better / worse only where the whole interval says so).", "",
             "| lam | " + " | ".join(HEADLINE.values()) + " | " +
             " | ".join(f"{v} vs teacher" for v in HEADLINE.values()) + " |",
             "|" + "---|" * (1 + 2 * len(HEADLINE))]
    tm, tci = rows[0]["metrics"][teacher], rows[0]["intervals"].get("intervals", {}).get(teacher, {})
    lines.append(f"| {teacher} | " + " | ".join(f"{tm[k]:.3f} [{tci[k][0]:.3f}, {tci[k][1]:.3f}]" if k in tci
                                                 else f"{tm[k]:.3f}" for k in HEADLINE) + " |" + " - |" * 3)
    for r in rows:
        name = next(k for k in r["metrics"] if k.startswith("lam_"))
        m, ci = r["metrics"][name], r["intervals"].get("intervals", {}).get(name, {})
        vs = r["intervals"].get("vs_teacher", {}).get(name, {})
        cells = [f"{m[k]:.3f} [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else f"{m[k]:.3f}" for k in HEADLINE]
        cells += [f"{vs[k]['difference']:+.3f} [{vs[k]['interval'][0]:+.3f}, {vs[k]['interval'][1]:+.3f}] "
                  f"{verdict(k, *vs[k]['interval'])}" if k in vs else "-" for k in HEADLINE]
        lines.append(f"| {r['lam']:g} | " + " | ".join(cells) + " |")
    best = min(rows, key=lambda r: _rank(r, teacher))
    lines += ["", f"Best by attribute accuracy, then FID: lam {best['lam']:g}.", "",
                              f"![one column per lam]({grid_name})", ""]
    return "\n".join(lines)


def _rank(row: dict, teacher: str) -> tuple[float, float]:
    name = next(k for k in row["metrics"] if k.startswith("lam_"))
    m = row["metrics"][name]
    return -m["attribute_accuracy"], m["fid"]


def parse_lams(text: str) -> list[float]:
    try:
        lams = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"merge: --curve {text!r}: expected comma-separated weights, e.g. 0,0.25,0.5,0.75,1") from None
    bad = [v for v in lams if not 0.0 <= v <= 1.0]
    if not lams or bad:
        raise UserError(f"merge: --curve {text!r}: expected weights in [0, 1]")
    return lams


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="student A (v2: full fine-tune, VSD only); weight lam")
    parser.add_argument("b", type=Path, help="student B (v2: LoRA student, VSD + CLIP loss); weight 1 - lam")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--lam", type=float, help="merge once with this weight on A (v2: 0.5)")
    what.add_argument("--curve", help="comma-separated weights: merge and evaluate each (e.g. 0,0.25,0.5,0.75,1)")
    parser.add_argument("--out", type=Path, default=Path("models/merged"), help="--lam: the merged student folder")
    parser.add_argument("--work", type=Path, default=Path("merge_work"), help="--curve: merged students and images")
    parser.add_argument("--report", type=Path, default=Path("reports/distill/merge.md"), help="--curve: the table")
    parser.add_argument("--params", default="params.yaml", help="--curve: the evaluate settings")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="--curve: how the report names A and B")
    args = parser.parse_args(argv)
    if args.lam is not None:
        out = merge(args.a, args.b, args.lam, args.out)
        print(f"merged student (lam {args.lam:g} on {args.a}) -> {out}")
        return
    rows = curve(args.a, args.b, parse_lams(args.curve), args.work, args.report, args.params, args.overrides,
                 tuple(args.labels) if args.labels else None)
    for r in rows:
        name = next(k for k in r["metrics"] if k.startswith("lam_"))
        m = r["metrics"][name]
        print(f"lam {r['lam']:g}: FID {m['fid']:.3f}, CLIP {m['clip_score']:.4f}, accuracy {m['attribute_accuracy']:.3f}")
    print(f"table: {args.report}")


if __name__ == "__main__":
    run_cli(main)
