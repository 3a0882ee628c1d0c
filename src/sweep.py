"""One table for a DVC experiment sweep: the evaluation's mean and spread over the values of one parameter.

    dvc exp run --queue -S seed=0,1,2         # one queued experiment per seed (the whole pipeline each)
    dvc queue start                           # one worker: they run one after another
    dvc queue status                          # until all are Success
    python -m src.sweep --by seed             # -> reports/distill/seeds.md

Reads `dvc exp show --json --all-commits` (or a file saved from it, --input). Runs whose other parameters agree form one
group; each group's table lists every run (a row per value of --by), then mean, standard deviation and range of
the student's and the teacher's FID, CLIP score and attribute accuracy, and of their difference within each run
(the teacher is evaluated on the same prompts and seeds as the student in the same run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from .core.errors import UserError, run_cli
from .core.fileio import atomic_file

METRICS_FILE = "reports/eval/metrics.json"
COLUMNS = {"fid": "FID", "clip_score": "CLIP score", "attribute_accuracy": "accuracy"}


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def runs(show: list) -> list[dict]:
    """Every workspace / commit / finished experiment in `dvc exp show --json` output with evaluation metrics:
    {"name", "params": flat params.yaml, "metrics": reports/eval/metrics.json}. A queued or running experiment
    shows its baseline's metrics, so it is left out until it succeeds."""
    found: list[dict] = []

    def visit(entry: dict) -> None:
        data = entry.get("data") or {}
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data")
        metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
        if params and metrics:
            name = entry.get("name") or entry.get("rev") or "?"
            name = name[:7] if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else name   # a commit
            found.append({"name": name, "params": flatten(params),
                          "metrics": metrics})
        for exp in entry.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state", "success")
            if state not in ("success", "finished"):      # queued, running or failed: no results of its own
                continue
            for rev in exp.get("revs") or []:
                visit(rev)

    for entry in show:
        visit(entry)
    return found


def groups(rows: list[dict], by: str) -> list[list[dict]]:
    """Runs whose parameters other than `by` are equal, one group each, largest first; one run per value of
    `by` (the first seen: the workspace, then the newest experiments)."""
    if rows and not any(by in r["params"] for r in rows):
        raise UserError(f"sweep --by {by}: no such parameter in params.yaml (e.g. seed, lr, distill.steps)")
    grouped: dict[str, dict] = {}
    for r in rows:
        key = json.dumps({k: v for k, v in r["params"].items() if k != by}, sort_keys=True, default=str)
        grouped.setdefault(key, {}).setdefault(json.dumps(r["params"].get(by)), r)
    return sorted((list(g.values()) for g in grouped.values()), key=len, reverse=True)


def summary(group: list[dict], student: str, teacher: str) -> dict[str, dict[str, list[float]]]:
    """Per quantity (student, teacher, student - teacher) and metric: the values over the group's runs."""
    out: dict[str, dict[str, list[float]]] = {student: {}, teacher: {}, "difference": {}}
    for r in group:
        m = r["metrics"]
        for k in COLUMNS:
            if k in m.get(student, {}) and k in m.get(teacher, {}):
                out[student].setdefault(k, []).append(m[student][k])
                out[teacher].setdefault(k, []).append(m[teacher][k])
                out["difference"].setdefault(k, []).append(m[student][k] - m[teacher][k])
    return out


def spread(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    sd = v.std(ddof=1) if len(v) > 1 else float("nan")
    return f"{v.mean():.3f} ± {sd:.3f} ({v.min():.3f} to {v.max():.3f})"


def report(groups_: list[list[dict]], by: str, student: str, teacher: str) -> str:
    lines = [f"# Sweep over `{by}`", "",
             f"Each run is the whole pipeline (`dvc exp run -S {by}=...`); {student} and {teacher} are evaluated on "
             f"that run's eval prompts and seeds. Mean ± standard deviation (range) over the runs; `difference` is "
             f"{student} minus {teacher} within each run (FID: lower is better).", ""]
    for i, group in enumerate(groups_):
        if len(group) < 2:
            continue
        values = sorted(group, key=lambda r: str(r["params"].get(by)))
        lines += [f"## Group {i + 1}: {len(group)} runs", "",
                  f"| {by} | run | " + " | ".join(f"{student} {v}" for v in COLUMNS.values()) + " | "
                  + " | ".join(f"{teacher} {v}" for v in COLUMNS.values()) + " |",
                  "|" + "---|" * (2 + 2 * len(COLUMNS))]
        for r in values:
            m = r["metrics"]
            cells = [f"{m.get(g, {}).get(k, float('nan')):.3f}" for g in (student, teacher) for k in COLUMNS]
            lines.append(f"| {r['params'].get(by)} | {r['name']} | " + " | ".join(cells) + " |")
        lines += ["", "| quantity | " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * (1 + len(COLUMNS))]
        for name, by_metric in summary(group, student, teacher).items():
            lines.append(f"| {name} | " + " | ".join(spread(by_metric[k]) if k in by_metric else "-"
                                                   for k in COLUMNS) + " |")
        lines.append("")
    if len(lines) == 4:
        lines.append(f"No two runs differ in `{by}` alone yet: queue them with `dvc exp run --queue -S {by}=0,1,2`.")
    return "\n".join(lines) + "\n"


def exp_show() -> list:
    try:
        done = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True, text=True,
                              check=True)      # all commits: experiments queued on an earlier one, and their baselines
    except FileNotFoundError:
        raise UserError("sweep: the dvc command is not installed (pip install -e .)") from None
    except subprocess.CalledProcessError as err:
        raise UserError(f"sweep: `dvc exp show --json` failed: {err.stderr.strip()}") from None
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by", default="seed", help="the swept parameter, as in -S (default: seed)")
    parser.add_argument("--input", type=Path, help="a saved `dvc exp show --json` output (default: run it)")
    parser.add_argument("--out", type=Path, default=Path("reports/distill/seeds.md"))
    parser.add_argument("--student", default="student_1")
    parser.add_argument("--teacher", default="teacher_25")
    args = parser.parse_args(argv)
    if args.input is not None and not args.input.is_file():
        raise UserError(f"sweep --input {args.input}: no such file")
    show = json.loads(args.input.read_text()) if args.input else exp_show()
    text = report(groups(runs(show), args.by), args.by, args.student, args.teacher)
    with atomic_file(args.out) as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    run_cli(main)
