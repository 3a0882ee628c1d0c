"""The evaluate stage: structure, resumability and metric sanity."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from src.config import DistillConfig, EvaluateConfig
from src.distill import Paths as DistillPaths
from src.distill import distill
from src.evaluate import Paths, evaluate, world_fid
from src.world import render, sample_scene


@pytest.fixture(scope="module")
def micro_student(tmp_path_factory, micro_models, world_prompts):
    models, _ = micro_models
    out = tmp_path_factory.mktemp("student")
    distill(DistillConfig(teacher=str(models / "teacher"), steps=2, batch_size=2, lora_rank=4, lora_alpha=8,
                          val_every=100, val_prompts=2),
            lr=1e-4, seed=0, paths=DistillPaths(train_prompts=world_prompts / "train.jsonl",
                                                eval_prompts=world_prompts / "eval.jsonl",
                                                checkpoints=out / "ck", student=out / "student",
                                                reports=out / "rep"))
    return out / "student"


def test_evaluate_writes_the_three_generator_table_and_resumes(tmp_path, micro_models, world_prompts, micro_student):
    models, _ = micro_models
    cfg = EvaluateConfig(evaluator=str(models / "evaluator"), teacher_steps=2, batch_size=3, grid_rows=3)
    paths = Paths(eval_prompts=world_prompts / "eval.jsonl", student=micro_student, images=tmp_path / "img",
                  reports=tmp_path / "rep")
    metrics = evaluate(cfg, str(models / "teacher"), paths)
    assert set(metrics) == {"teacher_1", "teacher_2", "student_1", "ground_truth"}
    for name in ("teacher_1", "teacher_2", "student_1"):
        assert {"fid", "clip_score", "attribute_accuracy", "attribute_accuracy_shape"} <= set(metrics[name])
        assert len(list((paths.images / name).glob("*.png"))) == 8
    assert metrics["ground_truth"]["attribute_accuracy"] == 1.0
    on_disk = json.loads((paths.reports / "metrics.json").read_text())
    assert on_disk["student_1"]["fid"] == pytest.approx(metrics["student_1"]["fid"])
    assert "| student_1 |" in (paths.reports / "README.md").read_text()
    assert Image.open(paths.reports / "grid.png").size[1] > 3 * 32

    # Resume: only the missing image is drawn again, and it comes out identical.
    folder = paths.images / "student_1"
    victim = folder / "000003.png"
    before = victim.read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p != victim}
    victim.unlink()
    evaluate(cfg, str(models / "teacher"), paths)
    assert victim.read_bytes() == before
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in folder.glob("*.png") if p != victim)


def test_missing_student_is_named(tmp_path, micro_models, world_prompts):
    from src.errors import UserError

    models, _ = micro_models
    cfg = EvaluateConfig(evaluator=str(models / "evaluator"))
    with pytest.raises(UserError, match="dvc repro distill"):
        evaluate(cfg, str(models / "teacher"), Paths(eval_prompts=world_prompts / "eval.jsonl",
                                                      student=tmp_path / "none", images=tmp_path / "i",
                                                      reports=tmp_path / "r"))


def _write_set(folder, images):
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def test_fid_is_zero_against_itself_and_grows_with_noise(tmp_path, micro_models):
    from transformers import CLIPModel

    models, _ = micro_models
    clip = CLIPModel.from_pretrained(models / "evaluator", dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    import random
    r = random.Random(0)
    clean = [render(sample_scene(r), 32, seed=i) for i in range(80)]
    noisy = lambda s: [np.clip(im + rng.normal(0, s, im.shape), 0, 255).astype(np.uint8) for im in clean]
    _write_set(tmp_path / "a", clean)
    _write_set(tmp_path / "b", noisy(20))
    _write_set(tmp_path / "c", noisy(80))
    same = world_fid(tmp_path / "a", tmp_path / "a", clip)
    small, large = world_fid(tmp_path / "a", tmp_path / "b", clip), world_fid(tmp_path / "a", tmp_path / "c", clip)
    assert abs(same) < 1e-3
    assert same < small < large


def test_images_of_other_models_are_not_reused(tmp_path):
    from src.evaluate import fill_folder

    records = [{"id": i, "prompt": f"p{i}", "seed": i} for i in range(3)]
    calls = []

    def gen(value):
        def run(prompts, seeds):
            calls.append(len(prompts))
            return np.full((len(prompts), 4, 4, 3), value, np.uint8)
        return run

    fill_folder(tmp_path / "g", records, gen(10), 2, "g", "model-a")
    fill_folder(tmp_path / "g", records, gen(10), 2, "g", "model-a")    # nothing to do
    assert calls == [2, 1]
    fill_folder(tmp_path / "g", records, gen(200), 2, "g", "model-b")   # another model: redraw all
    assert calls == [2, 1, 2, 1]
    assert np.asarray(Image.open(tmp_path / "g" / "000000.png")).max() == 200
