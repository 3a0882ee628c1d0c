"""src.sweep: the seed-sweep table from `dvc exp show --json` output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from src.core.errors import UserError
from src.sweep import groups, main, runs, summary


def _entry(name, seed, lr, student_fid, teacher_fid, acc):
    return {"rev": name, "name": name, "data": {
        "params": {"params.yaml": {"data": {"seed": seed, "lr": lr, "distill": {"steps": 1100, "targets": ["a"]}}}},
        "metrics": {"reports/eval/metrics.json": {"data": {
            "student_1": {"fid": student_fid, "clip_score": 0.94, "attribute_accuracy": acc},
            "teacher_25": {"fid": teacher_fid, "clip_score": 0.94, "attribute_accuracy": 0.96}}}}}}


def _show():
    workspace = _entry("workspace", 0, 3e-5, 0.20, 0.16, 0.93)
    return [workspace, {"rev": "abc", "name": "main", "data": workspace["data"], "experiments": [
        {"revs": [_entry("exp-one", 1, 3e-5, 0.30, 0.18, 0.91)]},
        {"revs": [_entry("exp-two", 2, 3e-5, 0.25, 0.17, 0.95)]},
        {"revs": [_entry("exp-lr", 1, 1e-4, 0.90, 0.18, 0.50)]},
        {"revs": [{"rev": "failed", "name": "failed", "data": {"params": {}, "metrics": {}}}]},
        # still running: dvc shows the baseline's metrics under its name
        {"executor": {"state": "running"}, "revs": [_entry("exp-running", 3, 3e-5, 0.20, 0.16, 0.93)]}]}]


def test_groups_by_the_other_parameters_and_summarises():
    found = runs(_show())
    assert {r["name"] for r in found} >= {"workspace", "exp-one", "exp-two", "exp-lr"}
    assert "exp-running" not in {r["name"] for r in found}
    biggest = groups(found, "seed")[0]
    assert sorted(r["params"]["seed"] for r in biggest) == [0, 1, 2]       # the commit repeats seed 0: once
    s = summary(biggest, "student_1", "teacher_25")
    assert sorted(s["student_1"]["fid"]) == [0.20, 0.25, 0.30]
    assert sorted(s["difference"]["fid"]) == pytest.approx([0.04, 0.08, 0.12])
    assert np.mean(s["difference"]["attribute_accuracy"]) == pytest.approx(np.mean([-0.03, -0.05, -0.01]))


def test_report_file(tmp_path, capsys):
    show = tmp_path / "show.json"
    show.write_text(json.dumps(_show()))
    out = tmp_path / "seeds.md"
    main(["--by", "seed", "--input", str(show), "--out", str(out)])
    text = out.read_text()
    assert "| 1 | exp-one |" in text and "| 2 | exp-two |" in text
    assert "0.250 ± 0.050 (0.200 to 0.300)" in text          # student FID: mean, sd (ddof 1), range
    assert "exp-lr" not in text                               # alone in its group
    with pytest.raises(UserError, match="no such parameter"):
        main(["--by", "nonsense", "--input", str(show), "--out", str(out)])
    with pytest.raises(UserError, match="no such file"):
        main(["--input", str(tmp_path / "none.json")])
