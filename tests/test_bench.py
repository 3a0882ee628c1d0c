"""Benchmark commands run at toy size (they are measured elsewhere, never timed here)."""

from __future__ import annotations

import json

import pytest


def test_gpu_profile_runs_at_tiny_size_on_cpu(tmp_path):
    from src.bench.gpu_profile import main

    main(["--scale", "tiny", "--batch", "2", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)])
    p = json.loads((tmp_path / "profile.json").read_text())
    assert [r["gradient_checkpointing"] for r in p["vsd_step"]] == [False, True]
    assert all(r["s_per_step"] > 0 for r in p["vsd_step"])
    assert [r["batch"] for r in p["one_step"]] == [1, 2]
    assert p["one_step"][0]["image_size"] == [64, 64]           # VAE upsamples the 8x8 latent 8x
    assert "SwiftBrush step" in (tmp_path / "README.md").read_text()


def test_every_vsd_step_variant_computes_the_reference_gradient(tmp_path, micro_models, world_prompts):
    """The speed-ups of the VSD step keep its mathematics: same student gradient as the 4-call reference,
    each inside a run built as distill builds it, its steps distill's own."""
    from src.bench.vsd_step import BASE_OVERRIDES, VARIANTS, Variant, compare

    models, _ = micro_models

    def wrong_guidance(cfg, *args):               # a variant that changes the maths must be caught
        from dataclasses import replace

        return replace(cfg, guidance_scale=1.0)(*args)[0]

    overrides = BASE_OVERRIDES + [f"distill.teacher={models / 'teacher'}", "distill.batch_size=3",
                                  "distill.lora_rank=4", "distill.lora_alpha=8", "distill.resolution=null"]
    rows = compare(overrides, tmp_path, repeats=1, train_prompts=world_prompts / "train.jsonl",
                   variants=VARIANTS + (Variant("wrong guidance", wrong_guidance),))
    by_name = {r["variant"]: r for r in rows}
    assert len(by_name) == len(VARIANTS) + 1
    for v in VARIANTS:
        assert by_name[v.name]["grad_max_rel_diff"] < 5e-4, v.name     # rounding (measured ~3e-5)
        assert by_name[v.name]["s_per_step"] > 0
    assert by_name["wrong guidance"]["grad_max_rel_diff"] > 1e-2


def test_round_robin_times_every_run_in_turns_and_the_teacher_every_other_round():
    from src.bench.common import round_robin

    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("onnx", "torch", "teacher_25")}
    times = round_robin(runs, repeats=4, sparse=("teacher",))
    warm, timed = calls[:3], calls[3:]
    assert warm == ["onnx", "torch", "teacher_25"]
    assert timed == ["onnx", "torch", "teacher_25", "onnx", "torch", "onnx", "torch", "teacher_25", "onnx", "torch"]
    assert set(times) == set(runs) and all(t >= 0 for t in times.values())
    calls.clear()
    round_robin(runs, repeats=2, sparse=("teacher",), burst=3)
    assert calls[3:] == ["onnx"] * 3 + ["torch"] * 3 + ["teacher_25"] + ["onnx"] * 3 + ["torch"] * 3


def test_headlines_compare_like_with_like_and_pick_the_best_artifact():
    from src.bench.__main__ import headlines

    def row(b, ips):
        return {"batch": b, "latency_s": b / ips, "images_per_s": ips}

    inf = {"onnx_fp32_b64": row(64, 400.0), "onnx_fp16_b64": row(64, 300.0), "onnx_fp32_tiny_b64": row(64, 500.0),
           "torch_student_b64": row(64, 320.0), "torch_student_tiny_b64": row(64, 400.0), "teacher_25_b64": row(64, 10.0),
           "onnx_fp32_b1": row(1, 200.0), "onnx_fp32_tiny_b1": row(1, 250.0), "torch_student_b1": row(1, 50.0),
           "torch_student_tiny_b1": row(1, 100.0), "teacher_25_b1": row(1, 2.5), "provider": "CPUExecutionProvider"}
    h = headlines(inf, 64, 25)
    assert h["best_one_step_artifact"] == "onnx_fp32_tiny"
    assert h["speedup_one_step_vs_teacher_25"] == pytest.approx(50.0)
    assert h["speedup_one_step_vs_teacher_25_b1"] == pytest.approx(100.0)
    assert h["ort_vs_torch_speedup"] == pytest.approx(1.25)            # VAE graph against the VAE student
    assert h["ort_vs_torch_speedup_tiny"] == pytest.approx(1.25)       # tiny against tiny, not against the VAE
    assert h["ort_vs_torch_speedup_tiny_b1"] == pytest.approx(2.5)
    assert h["speedup_torch_student_vs_torch_teacher_25"] == pytest.approx(32.0)
    assert h["speedup_onnx_fp32_tiny_vs_torch_teacher_25"] == pytest.approx(50.0)


def test_split_runs_are_compared_with_split_runs_and_never_named_the_best_artifact():
    from src.bench.__main__ import headlines

    def row(b, ips):
        return {"batch": b, "latency_s": b / ips, "images_per_s": ips}

    inf = {"onnx_fp32_b64": row(64, 400.0), "onnx_fp32_tiny_b64": row(64, 500.0), "torch_student_b64": row(64, 320.0),
           "torch_student_tiny_b64": row(64, 400.0), "teacher_25_b64": row(64, 10.0),
           "onnx_fp32_w2_b64": row(64, 480.0), "onnx_fp32_tiny_w2_b64": row(64, 600.0),
           "torch_student_w2_b64": row(64, 400.0), "torch_student_tiny_w2_b64": row(64, 480.0),
           "teacher_25_w2_b64": row(64, 13.0),
           "onnx_fp32_b1": row(1, 200.0), "onnx_fp32_tiny_b1": row(1, 250.0), "torch_student_b1": row(1, 50.0),
           "torch_student_tiny_b1": row(1, 100.0), "teacher_25_b1": row(1, 2.5)}
    h = headlines(inf, 64, 25)
    assert h["best_one_step_artifact"] == "onnx_fp32_tiny" and h["speedup_one_step_vs_teacher_25"] == pytest.approx(50)
    assert h["speedup_onnx_fp32_tiny_w2_vs_torch_teacher_25_w2"] == pytest.approx(600 / 13)   # split against split
    assert h["ort_vs_torch_speedup_w2"] == pytest.approx(1.2)
    assert h["ort_vs_torch_speedup_tiny_w2"] == pytest.approx(1.25)
    assert h["workers_gain"]["teacher_25"] == pytest.approx(1.3)
    assert h["workers_gain"]["onnx_fp32_tiny"] == pytest.approx(1.2)


def test_fidgap_measures_pin_their_definitions():
    """Edge energy is the mean |difference| of neighbouring pixels (rows plus columns); the high-frequency
    share is the power above 0.25 cycles per pixel: all of a checkerboard's, none of a smooth ramp's."""
    import numpy as np
    import torch

    from src.bench.fidgap import edge_energy, high_frequency_share

    stripes = np.zeros((1, 4, 4, 3), np.uint8)
    stripes[:, :, 1::2] = 10                      # columns alternate 0, 10: 10 across, 0 down
    assert edge_energy(stripes) == 10.0
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(8)] for i in range(8)]).reshape(1, 1, 8, 8)
    assert high_frequency_share(checker) == pytest.approx(1.0)
    ramp = torch.cos(2 * torch.pi * torch.arange(8) / 8).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert high_frequency_share(ramp) == pytest.approx(0.0, abs=1e-6)


def test_quality_cells_call_a_difference_only_when_the_whole_interval_agrees():
    from src.bench.quality import cell

    diff = {"fid": {"difference": -0.02, "interval": [-0.05, -0.01]},
            "attribute_accuracy": {"difference": 0.01, "interval": [-0.01, 0.03]},
            "clip_score": {"difference": -0.01, "interval": [-0.02, -0.005]}}
    assert cell(diff, "fid").endswith("better")                  # lower FID
    assert cell(diff, "attribute_accuracy").endswith("level")
    assert cell(diff, "clip_score").endswith("worse")
