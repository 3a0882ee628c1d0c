"""The evaluate stage: structure, resumability and metric sanity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from src.core.config import EvaluateConfig
from src.evaluate import Paths, evaluate
from src.scoring.metrics import feature_stats, frechet, world_features
from src.world import render, sample_scene


def test_evaluate_writes_the_generator_table_and_resumes(tmp_path, micro_models, world_prompts, micro_student):
    models, _ = micro_models
    cfg = EvaluateConfig(evaluator=str(models / "evaluator"), teacher_steps=2, batch_size=3, grid_rows=3)
    paths = Paths(eval_prompts=world_prompts / "eval.jsonl", student=micro_student, images=tmp_path / "img",
                  reports=tmp_path / "rep", tiny_decoder=models / "tiny_decoder")
    metrics = evaluate(cfg, str(models / "teacher"), paths)
    assert set(metrics) == {"teacher_1", "teacher_2", "student_1", "student_1_tiny", "ground_truth"}
    for name in ("teacher_1", "teacher_2", "student_1", "student_1_tiny"):
        assert {"fid", "clip_score", "attribute_accuracy", "attribute_accuracy_shape"} <= set(metrics[name])
        assert len(list((paths.images / name).glob("*.png"))) == 8
    # the same student, another decoder: other pixels from the same latents
    first = [np.asarray(Image.open(paths.images / n / "000000.png")) for n in ("student_1", "student_1_tiny")]
    assert first[0].shape == first[1].shape and not np.array_equal(*first)
    assert "| student_1_tiny |" in (paths.reports / "README.md").read_text()
    assert metrics["ground_truth"]["attribute_accuracy"] == 1.0
    on_disk = json.loads((paths.reports / "metrics.json").read_text())
    assert on_disk["student_1"]["fid"] == pytest.approx(metrics["student_1"]["fid"])
    assert "| student_1 |" in (paths.reports / "README.md").read_text()
    assert Image.open(paths.reports / "grid.png").size[1] > 3 * 32

    # every metric with its interval; the students against teacher_2 on the same prompts
    ci = json.loads((paths.reports / "intervals.json").read_text())
    assert ci["prompts"] == 8 and ci["vs_teacher"]["teacher"] == "teacher_2"
    for name, m in metrics.items():
        for k, v in m.items():
            low, high = ci["intervals"][name][k]
            assert low <= v + 1e-9 and v - 1e-9 <= high, (name, k, low, v, high)
    for name in ("student_1", "student_1_tiny"):
        d = ci["vs_teacher"][name]
        assert set(d) >= {"fid", "clip_score", "attribute_accuracy"}
        assert d["fid"]["difference"] == pytest.approx(metrics[name]["fid"] - metrics["teacher_2"]["fid"])
        assert d["fid"]["interval"][0] <= d["fid"]["difference"] <= d["fid"]["interval"][1]
    assert "Against teacher_2, paired" in (paths.reports / "README.md").read_text()

    # Resume: only the missing image is drawn again, and it comes out identical.
    folder = paths.images / "student_1"
    victim = folder / "000003.png"
    before = victim.read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p != victim}
    victim.unlink()
    evaluate(cfg, str(models / "teacher"), paths)
    assert victim.read_bytes() == before
    assert all(p.stat().st_mtime_ns == mtimes[p.name] for p in folder.glob("*.png") if p != victim)

    # another student under another name beside them: the teachers' images are reused, not drawn again
    teacher_times = {p: p.stat().st_mtime_ns for p in (paths.images / "teacher_2").glob("*.png")}
    other = evaluate(cfg.model_copy(update={"bootstrap": 0}), str(models / "teacher"),
                     Paths(eval_prompts=paths.eval_prompts, student=micro_student, images=paths.images,
                           reports=tmp_path / "rep-other", student_name="other"))
    assert set(other) == {"teacher_1", "teacher_2", "other_1", "ground_truth"}
    assert other["other_1"]["fid"] == pytest.approx(metrics["student_1"]["fid"])      # the same student
    assert all(p.stat().st_mtime_ns == t for p, t in teacher_times.items())
    assert json.loads((tmp_path / "rep-other" / "intervals.json").read_text()) == {}


def test_missing_student_is_named(tmp_path, micro_models, world_prompts):
    from src.core.errors import UserError

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

    def world_fid(a, b):                 # as evaluate computes it: evaluator features, their statistics, Frechet
        stats = [feature_stats(world_features(sorted(d.glob("*.png")), clip)) for d in (a, b)]
        return frechet(*stats)

    same = world_fid(tmp_path / "a", tmp_path / "a")
    small, large = world_fid(tmp_path / "a", tmp_path / "b"), world_fid(tmp_path / "a", tmp_path / "c")
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


def test_clip_score_prefers_matched_captions(repo):
    """With the committed evaluator: images score higher with their own caption than with shuffled ones."""
    import random

    from src.scoring.metrics import TransformersClip, clip_similarities
    from src.world import caption

    r = random.Random(1)
    scenes = [sample_scene(r) for _ in range(64)]
    images = [render(s, 32, seed=i) for i, s in enumerate(scenes)]
    captions = [caption(s, r) for s in scenes]
    shuffled = captions[1:] + captions[:1]
    scorer = TransformersClip(repo / "models" / "evaluator")
    matched = float(clip_similarities(scorer, [(images, captions)]).mean())
    other = float(clip_similarities(scorer, [(images, shuffled)]).mean())
    assert matched > other + 0.1


def test_the_table_ranks_a_broken_generator_last(tmp_path, repo):
    """Committed teacher and evaluator; the 'student' is the teacher with its UNet scrambled."""
    from src.core.config import PrepareConfig, SourceConfig, WorldConfig
    from src.method.teacher import load_pipeline
    from src.prepare import prepare

    prompts = tmp_path / "prompts"
    prepare(PrepareConfig(tokenizer=str(repo / "models/teacher/tokenizer"), train=SourceConfig(limit=4),
                          eval=SourceConfig(limit=48)), WorldConfig(), 0, prompts)
    broken = load_pipeline(str(repo / "models" / "teacher"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in broken.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std().nan_to_num(0.02))
    broken.save_pretrained(tmp_path / "broken")
    cfg = EvaluateConfig(evaluator=str(repo / "models" / "evaluator"), teacher_steps=10, batch_size=48,
                         bootstrap=0)          # intervals are tested in test_intervals; here the ranking
    m = evaluate(cfg, str(repo / "models" / "teacher"),
                 Paths(eval_prompts=prompts / "eval.jsonl", student=tmp_path / "broken", images=tmp_path / "img",
                       reports=tmp_path / "rep"))
    good = [m["teacher_1"], m["teacher_10"]]
    assert all(m["student_1"]["fid"] > g["fid"] for g in good)
    assert all(m["student_1"]["clip_score"] < g["clip_score"] for g in good)
    assert all(m["student_1"]["attribute_accuracy"] <= g["attribute_accuracy"] for g in good)
    assert m["teacher_10"]["attribute_accuracy"] > 0.8     # and the good one is really good


def test_two_processes_draw_the_same_images_as_one(tmp_path, micro_models, world_prompts, micro_student, repo):
    """`accelerate launch --num_processes 2 -m src.evaluate` (two CPU processes) splits generation and
    gives the images and metrics of one process; an image removed afterwards is drawn again, identical."""
    import os
    import shutil
    import subprocess
    import sys

    models, _ = micro_models
    cfg = EvaluateConfig(evaluator=str(models / "evaluator"), teacher_steps=2, batch_size=3, grid_rows=3)
    one = Paths(eval_prompts=world_prompts / "eval.jsonl", student=micro_student, images=tmp_path / "one",
                reports=tmp_path / "rep-one")
    single = evaluate(cfg, str(models / "teacher"), one)

    work = tmp_path / "two"
    (work / "prompts").mkdir(parents=True)
    (work / "models").mkdir()
    shutil.copy(world_prompts / "eval.jsonl", work / "prompts" / "eval.jsonl")
    (work / "models" / "student").symlink_to(micro_student)
    (work / "params.yaml").write_text(json.dumps({
        "distill": {"teacher": str(models / "teacher")},
        "evaluate": {"evaluator": str(models / "evaluator"), "teacher_steps": 2, "batch_size": 3, "grid_rows": 3}}))
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "src.evaluate"]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    two = json.loads((work / "reports" / "eval" / "metrics.json").read_text())

    for name in ("teacher_1", "teacher_2", "student_1"):
        a = sorted((one.images / name).glob("*.png"))
        b = sorted((work / "eval_images" / name).glob("*.png"))
        assert [p.name for p in a] == [p.name for p in b] and len(a) == 8
        for x, y in zip(a, b):
            diff = np.abs(np.asarray(Image.open(x), np.int16) - np.asarray(Image.open(y), np.int16))
            assert diff.max() <= 1, (name, x.name)     # same batches; at most a rounding step across thread counts
        assert two[name]["attribute_accuracy"] == pytest.approx(single[name]["attribute_accuracy"], abs=0.13)

    # resume intact: a missing image is drawn again by the two processes, the rest untouched
    victim = work / "eval_images" / "student_1" / "000002.png"
    before = victim.read_bytes()
    victim.unlink()
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert victim.read_bytes() == before
