"""Where the time of one SwiftBrush training step goes: torch.profiler over the real step of src/distill.py.

    python -m src.bench.step_profile           # the default variants below
    python -m src.bench.step_profile --steps 3 # fewer profiled steps

For each variant (params.yaml with the variant's overrides, `--variant KEY=VALUE[,KEY=VALUE]`;
by default the CLIP loss decoded through the VAE, through the tiny decoder, torch.compile of the
UNets (inductor; its first step includes the compilation) and bf16 autocast) it builds the run
exactly as `python -m src.distill` does (scratch folders), warms up, times steps without the
profiler, then profiles a few. The step's phases are labelled in src/distill.py (`phase`), so the
table shows each phase's share and the operators that dominate. Writes
reports/bench/step_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from ..core.config import load_config
from ..core.errors import run_cli
from ..core.fileio import atomic_file, write_json
from .common import DistillRun, machine

DEFAULT_VARIANTS = ("distill.clip_decoder=vae", "distill.clip_decoder=tiny", "distill.compile=default",
                    "distill.mixed_precision=bf16")


def profile_group(variants: list[list[str]], steps: int, timed_steps: int, top: int = 12) -> list[dict]:
    """Variants that share accelerate's mixed precision (one process-wide setting): built side by side, their
    steps timed in turns (so that the machine's drift hits all alike), then each profiled over `steps` steps."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [DistillRun(v, Path(tmp) / str(i)) for i, v in enumerate(variants)]
        first = [r.step(0) for r in runs]                # with distill.compile, this one compiles
        for k in (1, 2):
            for r in runs:
                r.step(k)
        times: list[list[float]] = [[] for _ in runs]
        for k in range(timed_steps):
            for i, r in enumerate(runs):
                times[i].append(r.step(3 + k))
        return [summary(r, profiled(r, steps), steps, first[i], times[i], top) for i, r in enumerate(runs)]


def profiled(r: DistillRun, steps: int):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for k in range(steps):
            r.step(100 + k)
    return prof.key_averages()


def summary(r: DistillRun, events, steps: int, first: float, times: list[float], top: int) -> dict:
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    phases = [{"phase": e.key.removeprefix("step: "), "ms_per_step": round(e.cpu_time_total / steps / 1e3, 2),
               "share": round(e.cpu_time_total / steps / 1e3 / total, 4)}
              for e in events if e.key.startswith("step: ")]
    order = ["text encoder", "student forward", "VSD scores", "CLIP loss", "student backward", "student clip",
             "LoRA teacher forward", "LoRA teacher backward", "LoRA teacher clip", "EMA"]
    phases.sort(key=lambda p: next((i for i, o in enumerate(order) if p["phase"].startswith(o)), len(order)))
    ops = sorted((e for e in events if not e.key.startswith("step: ")), key=lambda e: -e.self_cpu_time_total)
    return {"overrides": r.overrides, "mixed_precision": r.cfg.mixed_precision, "first_step_s": round(first, 2),
            "s_per_step": round(statistics.median(times), 4), "profiled_ms_per_step": round(total, 1),
            "phases": phases,
            "top_ops": [{"op": e.key, "self_ms_per_step": round(e.self_cpu_time_total / steps / 1e3, 2),
                         "share": round(e.self_cpu_time_total / steps / 1e3 / total, 4),
                         "calls_per_step": e.count // steps} for e in ops[:top]]}


def report(rows: list[dict], machine: str) -> str:
    lines = [f"# Where a training step's time goes ({machine})", "",
             "`python -m src.bench.step_profile`: the step of `python -m src.distill` with params.yaml's distill "
             "settings and each variant's overrides. Variants with the same mixed precision run side by side and their "
             "steps are timed in turns (s / step: the median), so the machine's drift hits them alike; the first step "
             "includes torch.compile's compilation (inductor caches it on disk: a second process compiles faster). "
             "The tables are torch.profiler over further steps (CPU time; phases nest, operators are self time).", ""]
    base = rows[0]["s_per_step"]
    lines += ["| variant | first step s | s / step | vs the first variant |", "|---|---|---|---|"]
    lines += [f"| {', '.join(r['overrides']) or 'params.yaml'} | {r['first_step_s']} | {r['s_per_step']} | "
              f"{base / r['s_per_step']:.2f}x |" for r in rows]
    for r in rows:
        lines += ["", f"## {', '.join(r['overrides']) or 'params.yaml'}", "",
                  "| phase | ms / step | share |", "|---|---|---|"]
        lines += [f"| {p['phase']} | {p['ms_per_step']} | {p['share']:.1%} |" for p in r["phases"]]
        lines += ["", "| operator (self time) | ms / step | share | calls / step |", "|---|---|---|---|"]
        lines += [f"| `{o['op']}` | {o['self_ms_per_step']} | {o['share']:.1%} | {o['calls_per_step']} |"
                  for o in r["top_ops"]]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[,KEY=VALUE]",
                        help=f"params overrides of one variant (repeatable; default: {' and '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    parser.add_argument("--timed-steps", type=int, default=10, help="unprofiled steps timed per variant")
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    variants = [v.split(",") for v in (args.variant or DEFAULT_VARIANTS)]
    groups: dict[str, list[list[str]]] = {}
    for v in variants:
        groups.setdefault(load_config(overrides=v).distill.mixed_precision, []).append(v)
    rows = [row for group in groups.values() for row in profile_group(group, args.steps, args.timed_steps)]
    write_json(args.out / "step_profile.json", {"machine": machine(), "variants": rows})
    with atomic_file(args.out / "step_profile.md") as f:
        f.write(report(rows, machine()))
    print(report(rows, machine()))


if __name__ == "__main__":
    run_cli(main)
