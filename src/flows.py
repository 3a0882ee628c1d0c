"""Prefect 3 flows: run the DVC pipeline, and retrain with champion/challenger promotion.

    python -m src.flows pipeline                       # = dvc repro, as a Prefect flow run
    python -m src.flows pipeline --set lr=2e-6         # = dvc exp run -S lr=2e-6
    python -m src.flows retrain --prompts new.txt      # experiment on new prompts; promote if it wins

Without a Prefect server the flows run locally (Prefect starts a temporary one in-process).
`prefect.yaml` deploys `retrain` on a schedule to a `process` work pool of GPU workers; see
the README's "Orchestration" section.

- The flows shell out to `dvc` in the workspace, so DVC's caching and locking apply: a
  stage whose inputs did not change is not rerun. One pipeline at a time per workspace: a
  file lock (here) and the deployment's `concurrency_limit: 1` (on a server).
- A failing stage fails the flow with the stage's own message (`error: ...`), never with a
  generic one; transient failures (the DVC lock held by someone else, I/O errors) are
  retried, a stage's own error is not.
- Promotion copies the challenger's ONNX artifact and metrics into `production/` all or
  nothing (a complete folder swapped in with a rename), and every decision, promoted or not,
  is appended with its reason to `production/decisions.jsonl`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from prefect import flow, get_run_logger, task
except ImportError:                 # the pipeline's install leaves Prefect out
    raise SystemExit("python -m src.flows: prefect is not installed; install the flows extra: "
                     "pip install -e '.[flows]'") from None

from .core import manifest
from .core.errors import UserError, run_cli
from .core.fileio import atomic_dir

METRIC_FILES = ("reports/eval/metrics.json", "reports/export/metrics.json", "reports/distill/metrics.json")
ARTIFACT = "models/onnx"
TRANSIENT = ("Unable to acquire lock", "lock is held", "Resource temporarily unavailable", "Connection reset")


class StageFailed(RuntimeError):
    """A DVC command failed; the message carries the stage's own error lines."""


# --------------------------------------------------------------------------- pure pieces


def metric_value(metrics: dict, key: str) -> float:
    """A dotted key into nested metrics, e.g. 'student_1.attribute_accuracy'."""
    value: object = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"metric {key!r} not found (top-level keys: {', '.join(map(str, metrics))})")
        value = value[part]
    return float(value)


@dataclass
class Decision:
    promote: bool
    reason: str
    metric: str
    challenger: float
    champion: float | None


def decide(challenger: dict, champion: dict | None, metric: str, higher_is_better: bool,
           min_delta: float = 0.0) -> Decision:
    """Promote when there is no champion, or the challenger beats it by more than `min_delta`."""
    new = metric_value(challenger, metric)
    if champion is None:
        return Decision(True, f"no champion yet; {metric} = {new:.4g}", metric, new, None)
    old = metric_value(champion, metric)
    gain = (new - old) if higher_is_better else (old - new)
    better = "higher" if higher_is_better else "lower"
    if gain > min_delta:
        return Decision(True, f"{metric} {new:.4g} beats champion {old:.4g} ({better} is better)", metric, new, old)
    return Decision(False, f"{metric} {new:.4g} does not beat champion {old:.4g} ({better} is better, "
                           f"min delta {min_delta:g})", metric, new, old)


def stage_error(output: str, limit: int = 15) -> str:
    """The lines of a failed DVC run that say what went wrong (our stages print 'error: ...')."""
    lines = [ln for ln in output.splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("error:") or ln.startswith("ERROR:")]
    return "\n".join(ours[-limit:] if ours else lines[-limit:])


def read_metrics(workspace: Path) -> dict:
    """All stage metrics of a workspace, keyed by stage (eval, export, distill)."""
    out = {}
    for rel in METRIC_FILES:
        path = workspace / rel
        if path.is_file():
            out[path.parent.name] = json.loads(path.read_text())
    return out


@contextlib.contextmanager
def workspace_lock(workspace: Path, timeout_s: float = 0.0):
    """One pipeline run per workspace: an exclusive lock on <workspace>/.flows.lock."""
    lock = open(workspace / ".flows.lock", "a+")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                lock.close()
                raise UserError(f"another pipeline run holds {workspace / '.flows.lock'}; one run per workspace")
            time.sleep(1.0)
    try:
        yield
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def promote(workspace: Path, production: Path, metrics: dict, decision: Decision) -> None:
    """Swap a complete copy of the artifact + metrics into production/current (all or nothing)."""
    artifact = workspace / ARTIFACT
    if not (artifact / "onestep.json").is_file():
        raise StageFailed(f"nothing to promote: {artifact} is not a complete export")
    with atomic_dir(production / "current") as tmp:
        shutil.copytree(artifact, tmp / "onnx")
        try:                          # the copy, every file, checked against the export's manifest
            manifest.verify(tmp / "onnx")
        except UserError as err:
            raise StageFailed(f"not promoted: {err}") from None
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (tmp / "decision.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")


def record(production: Path, decision: Decision, extra: dict) -> None:
    production.mkdir(parents=True, exist_ok=True)
    with open(production / "decisions.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(decision), **extra}) + "\n")


# --------------------------------------------------------------------------- tasks and flows


def _transient(task, task_run, state) -> bool:
    """Retry only failures that a later attempt can fix (a lock held elsewhere, I/O hiccups)."""
    try:
        state.result()
    except StageFailed as err:
        return any(marker in str(err) for marker in TRANSIENT)
    except Exception:  # noqa: BLE001 - anything not from a stage (e.g. OSError) is worth a retry
        return True
    return False


@task(retries=2, retry_delay_seconds=10, retry_condition_fn=_transient)
def dvc(workspace: str, args: list[str]) -> str:
    """Run `dvc <args>` in the workspace; raise StageFailed with the stage's error lines."""
    logger = get_run_logger()
    logger.info("dvc %s  (in %s)", " ".join(args), workspace)
    # The same environment's DVC and Python (stage commands say `python -m src....`).
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=workspace, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise StageFailed(f"`dvc {' '.join(args)}` failed (exit {proc.returncode}):\n"
                          + stage_error(proc.stdout + "\n" + proc.stderr))
    return proc.stdout


@flow(name="swiftbrush-pipeline", log_prints=True)
def pipeline_flow(workspace: str = ".", overrides: list[str] | None = None, name: str | None = None) -> dict:
    """`dvc repro` (or `dvc exp run -S ...` with overrides) in the workspace; returns its metrics."""
    ws = Path(workspace).resolve()
    with workspace_lock(ws):
        if overrides:
            args = ["exp", "run"] + [a for o in overrides for a in ("-S", o)] + (["--name", name] if name else [])
        else:
            args = ["repro"]
        dvc(str(ws), args)
    metrics = read_metrics(ws)
    print(f"pipeline done in {ws}: " + json.dumps(metrics.get("eval", {}).get("student_1", {})))
    return metrics


@flow(name="swiftbrush-retrain", log_prints=True)
def retrain_flow(workspace: str = ".", prompts: str | None = None, column: str | None = None,
                 overrides: list[str] | None = None, production: str = "production",
                 metric: str = "eval.student_1.attribute_accuracy", higher_is_better: bool = True,
                 min_delta: float = 0.0) -> dict:
    """Distill on (new) prompts as an experiment, evaluate, and promote the ONNX student if it wins.

    `prompts`: a text file (one prompt per line) or, with `column`, a CSV/TSV/JSONL/Parquet
    table; it becomes `prepare.train`. The challenger is compared with production/current on
    `metric` (a dotted key into the metrics: eval.<generator>.<metric> or export.<key>).
    """
    ws = Path(workspace).resolve()
    prod = (ws / production) if not Path(production).is_absolute() else Path(production)
    sets = list(overrides or [])
    if prompts:
        source = "table" if column else "text"
        sets += [f"prepare.train.source={source}", f"prepare.train.path={Path(prompts).resolve()}"]
        sets += [f"prepare.train.column={column}"] if column else []
    challenger = pipeline_flow(str(ws), sets or None)
    champion_file = prod / "current" / "metrics.json"
    champion = json.loads(champion_file.read_text()) if champion_file.is_file() else None
    decision = decide(challenger, champion, metric, higher_is_better, min_delta)
    if decision.promote:
        promote(ws, prod, challenger, decision)
    record(prod, decision, {"overrides": sets})
    print(("PROMOTED: " if decision.promote else "kept the champion: ") + decision.reason)
    return asdict(decision)


@flow(name="swiftbrush-serve", log_prints=True)
def serve_flow(workspace: str = ".", production: str = "production", host: str = "127.0.0.1", port: int = 8000,
               provider: str = "auto", precision: str = "fp32", extra: list[str] | None = None) -> int:
    """Run `python -m src.serve --production DIR` on this worker until it stops; it swaps in each promotion
    that retrain_flow makes, so one long-running serve deployment follows every nightly retraining."""
    ws = Path(workspace).resolve()
    prod = (ws / production) if not Path(production).is_absolute() else Path(production)
    cmd = [sys.executable, "-m", "src.serve", "--production", str(prod), "--host", host, "--port", str(port),
           "--provider", provider, "--precision", precision, *(extra or [])]
    print("serving: " + " ".join(cmd))
    code = subprocess.run(cmd, cwd=ws).returncode
    if code not in (0, -15):                  # -15: stopped by SIGTERM (the run was cancelled)
        raise StageFailed(f"`python -m src.serve` exited with status {code}")
    return code


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="flow", required=True)
    p = sub.add_parser("pipeline", help="run the DVC pipeline as a flow")
    r = sub.add_parser("retrain", help="experiment + champion/challenger promotion")
    for s in (p, r):
        s.add_argument("--workspace", default=".")
        s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--prompts", help="new training prompts (text file, or a table with --column)")
    r.add_argument("--column")
    r.add_argument("--production", default="production")
    r.add_argument("--metric", default="eval.student_1.attribute_accuracy")
    r.add_argument("--lower-is-better", action="store_true", help="for metrics such as eval.student_1.fid")
    args = parser.parse_args(argv)
    try:
        if args.flow == "pipeline":
            pipeline_flow(args.workspace, args.overrides or None)
        else:
            retrain_flow(args.workspace, args.prompts, args.column, args.overrides or None, args.production,
                         args.metric, not args.lower_is_better)
    except StageFailed as err:
        raise UserError(str(err)) from None


if __name__ == "__main__":
    run_cli(main)
