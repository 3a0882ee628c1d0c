"""Prefect flows on a tiny workspace: the DVC pipeline end to end, promotion rules, failures, deployment."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from src.flows import Decision, StageFailed, decide, promote

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "seed": 0, "lr": 1.0e-4,
    "tiny_decoder": "models/tiny_decoder",
    "world": {"resolution": 32},
    "prepare": {"tokenizer": "models/teacher/tokenizer", "train": {"source": "world", "limit": 32},
                "eval": {"source": "world", "limit": 6}},
    "distill": {"teacher": "models/teacher", "steps": 2, "batch_size": 2, "lora_rank": 4, "lora_alpha": 8,
                "val_every": 100, "val_prompts": 2, "checkpoint_every": 1, "log_every": 1},
    "evaluate": {"evaluator": "models/evaluator", "teacher_steps": 2, "batch_size": 8, "grid_rows": 2},
    "export": {"parity_prompts": 2, "exporter": "torchscript", "opset": 17},   # the flows are the subject
}


@pytest.fixture(scope="session")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _git(ws: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, micro_models, harness):
    """A git + DVC checkout of this project with the micro models and tiny params, pipeline already run."""
    from src.flows import pipeline_flow

    models, _ = micro_models
    ws = tmp_path_factory.mktemp("ws")
    shutil.copytree(REPO / "src", ws / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", ws / "dvc.yaml")
    shutil.copytree(models / "teacher", ws / "models" / "teacher")
    shutil.copytree(models / "evaluator", ws / "models" / "evaluator")
    shutil.copytree(models / "guide", ws / "models" / "guide")
    shutil.copytree(models / "tiny_decoder", ws / "models" / "tiny_decoder")
    (ws / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    (ws / ".gitignore").write_text("/prompts/\n/eval_images/\n/checkpoints/\n/models/student\n/models/onnx\n"
                                   "/production/\n.flows.lock\n")
    _git(ws, "init", "-q")
    _git(ws, "config", "user.email", "ci@example.invalid")
    _git(ws, "config", "user.name", "ci")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=ws, check=True, capture_output=True)
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "tiny workspace")
    metrics = pipeline_flow(str(ws))
    return ws, metrics


def test_pipeline_flow_runs_every_stage_and_returns_the_metrics(workspace):
    ws, metrics = workspace
    assert set(metrics["eval"]) >= {"teacher_1", "teacher_2", "student_1"}
    assert metrics["export"]["psnr_fp32"] >= 40
    assert (ws / "models" / "onnx" / "fp32" / "model.onnx").is_file()
    assert (ws / "dvc.lock").is_file()
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=ws, capture_output=True, text=True).stdout
    assert "changed" not in status                                   # everything up to date


def test_retrain_promotes_a_winner_and_keeps_the_champion_otherwise(workspace):
    from src.flows import retrain_flow

    ws, _ = workspace
    prod = ws / "production"
    first = retrain_flow(str(ws), production=str(prod))              # no champion yet: promote
    assert first["promote"] and "no champion" in first["reason"]
    current = prod / "current"
    assert (current / "onnx" / "fp32" / "model.onnx").is_file()

    # A champion better than anything the tiny run can reach: the challenger loses, nothing moves.
    champion = json.loads((current / "metrics.json").read_text())
    champion["eval"]["student_1"]["attribute_accuracy"] = 2.0
    (current / "metrics.json").write_text(json.dumps(champion))
    before = {p: p.stat().st_mtime_ns for p in current.rglob("*")}
    lost = retrain_flow(str(ws), production=str(prod))
    assert not lost["promote"] and "does not beat" in lost["reason"]
    assert {p: p.stat().st_mtime_ns for p in current.rglob("*")} == before

    # A worse champion: promoted again, and the record holds every decision with its reason.
    champion["eval"]["student_1"]["attribute_accuracy"] = -1.0
    (current / "metrics.json").write_text(json.dumps(champion))
    won = retrain_flow(str(ws), production=str(prod))
    assert won["promote"] and "beats champion" in won["reason"]
    decisions = [json.loads(line) for line in (prod / "decisions.jsonl").read_text().splitlines()]
    assert [d["promote"] for d in decisions] == [True, False, True]
    assert all(d["reason"] for d in decisions)


def test_a_failing_stage_surfaces_its_error_and_leaves_production_alone(workspace):
    from src.flows import retrain_flow

    ws, _ = workspace
    prod = ws / "production_fail"
    retrain_flow(str(ws), production=str(prod))
    snapshot = {p: p.read_bytes() for p in (prod / "current").rglob("*") if p.is_file()}
    try:
        with pytest.raises(StageFailed) as err:
            retrain_flow(str(ws), overrides=["distill.teacher=no/such/teacher"], production=str(prod))
    finally:
        _git(ws, "checkout", "--", "params.yaml")
    assert "error:" in str(err.value) and "no/such/teacher" in str(err.value)      # the stage's own message
    assert {p: p.read_bytes() for p in (prod / "current").rglob("*") if p.is_file()} == snapshot
    assert len((prod / "decisions.jsonl").read_text().splitlines()) == 1           # no decision was made


def test_decide_follows_the_metric_direction():
    ch = {"eval": {"student_1": {"fid": 3.0, "attribute_accuracy": 0.7}}}
    old = {"eval": {"student_1": {"fid": 4.0, "attribute_accuracy": 0.8}}}
    assert decide(ch, old, "eval.student_1.fid", higher_is_better=False).promote
    assert not decide(ch, old, "eval.student_1.attribute_accuracy", higher_is_better=True).promote
    assert not decide(ch, old, "eval.student_1.fid", higher_is_better=False, min_delta=1.5).promote
    with pytest.raises(KeyError, match="clip"):
        decide(ch, old, "eval.student_1.clip", True)


def test_promotion_is_all_or_nothing(tmp_path):
    ws, prod = tmp_path / "ws", tmp_path / "prod"
    (ws / "models" / "onnx").mkdir(parents=True)                    # an incomplete export: no onestep.json
    (prod / "current").mkdir(parents=True)
    (prod / "current" / "metrics.json").write_text("{}")
    with pytest.raises(StageFailed, match="not a complete export"):
        promote(ws, prod, {}, Decision(True, "test", "m", 1.0, None))
    assert [p.name for p in prod.iterdir()] == ["current"]
    assert (prod / "current" / "metrics.json").read_text() == "{}"


def test_deployments_load_and_validate():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
        flow.validate_parameters(dep.get("parameters", {}))                 # names and types match the flow
        assert dep["work_pool"]["name"] == "gpu-workers" and dep["concurrency_limit"] == 1
        for schedule in dep.get("schedules", []):
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert any(d.get("schedules") for d in spec["deployments"])


def test_the_serve_flow_runs_the_server_command_and_fails_with_it(tmp_path):
    from src.flows import serve_flow

    assert serve_flow(str(REPO), production=str(tmp_path / "prod"), provider="cpu", extra=["--dry-run"]) == 0
    with pytest.raises(StageFailed, match="exited with status 2"):
        serve_flow(str(REPO), production=str(tmp_path / "prod"), port=0, provider="cpu")
