"""Scale check of the prepare stage: a 1.5-million-line prompt file must stream.

    python -m src.bench.prepare            # writes reports/bench/prepare.{json,md}

Generates a synthetic prompt file (world captions plus free-text variations, with
duplicates, blank lines, over-long prompts and non-UTF-8 lines mixed in), runs
`python -m src.prepare` on it as a separate process and records its wall time and peak
resident memory. The budget it is checked against: under 2 minutes and under 2 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ..core.errors import run_cli
from ..core.fileio import atomic_file, write_json
from ..world.scene import caption, sample_scene, vocabulary


def make_prompt_file(path: Path, lines: int, seed: int = 0) -> dict:
    """Write `lines` lines of synthetic prompts; return how many of each kind were written."""
    rng = random.Random(seed)
    words = vocabulary()
    counts = {"lines": lines, "blank": 0, "non_utf8": 0, "long": 0, "repeat": 0}
    recent: list[str] = []
    with path.open("wb") as f:
        for i in range(lines):
            r = rng.random()
            if r < 0.01:
                line, counts["blank"] = b"   ", counts["blank"] + 1
            elif r < 0.012:
                line, counts["non_utf8"] = b"caf\xe9 \xff prompt", counts["non_utf8"] + 1
            elif r < 0.05 and recent:
                line, counts["repeat"] = rng.choice(recent).upper().encode(), counts["repeat"] + 1
            else:
                text = caption(sample_scene(rng), rng) + ", " + " ".join(rng.choices(words, k=rng.randint(3, 25)))
                if r > 0.995:
                    text += " " + " ".join(rng.choices(words, k=90))
                    counts["long"] += 1
                text += f" v{i}"
                recent = (recent + [text])[-1000:]
                line = text.encode()
            f.write(line + b"\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1_500_000)
    parser.add_argument("--out", type=Path, default=Path("reports/bench"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "prompts.txt"
        t0 = time.perf_counter()
        made = make_prompt_file(src, args.lines)
        print(f"generated {src.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s")
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump({"prepare": {
            "train": {"source": "text", "path": str(src)},
            "eval": {"source": "world", "limit": 500},
        }}))
        cmd = [sys.executable, "-m", "src.prepare", "--params", str(params),
               "--out-dir", str(tmp / "out"), "--stats", str(tmp / "stats.json")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        wall = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        stats = yaml.safe_load((tmp / "stats.json").read_text())["train"]
    result = {
        "lines": args.lines,
        "wall_s": round(wall, 1), "peak_rss_mb": round(peak_mb),
        "prompts_per_s": round(args.lines / wall),
        "targets": {"wall_s": 120, "peak_rss_mb": 2048},
        "generated": made, "stats": stats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
    }
    write_json(args.out / "prepare.json", result)
    with atomic_file(args.out / "prepare.md") as f:
        f.write("# Prepare stage at scale\n\n"
                f"{args.lines:,} lines of synthetic prompts through `python -m src.prepare` "
                f"({result['machine']}). Reproduce: `python -m src.bench.prepare`.\n\n"
                "| wall time | peak memory | prompts/s | kept | duplicates | blank | bad lines | too long |\n"
                "|---|---|---|---|---|---|---|---|\n"
                f"| {wall:.1f} s (target < 120 s) | {peak_mb:.0f} MB (target < 2048 MB) | "
                f"{result['prompts_per_s']:,} | {stats['kept']:,} | {stats['duplicates']:,} | {stats['empty']:,} | "
                f"{stats['bad_lines']:,} | {stats['too_long']:,} |\n")
    print(f"prepare: {wall:.1f} s, peak {peak_mb:.0f} MB -> {args.out / 'prepare.md'}")


if __name__ == "__main__":
    run_cli(main)
