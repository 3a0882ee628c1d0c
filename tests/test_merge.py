"""src.merge: SwiftBrush v2's weight merge of two students, and its checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.core.errors import UserError
from src.merge import main, merge, merge_states, parse_lams

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def _perturbed_copy(src, dst, seed=0):
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + torch.randn(v.shape, generator=g).to(v.dtype) * 0.01 if v.is_floating_point() else v
             for k, v in load_file(str(dst / WEIGHTS)).items()}
    save_file(state, str(dst / WEIGHTS))
    return dst


def test_merge_is_the_weighted_average_and_a_working_student(tmp_path, micro_student, world_prompts):
    from src.core.prompts import read_prepared
    from src.method.onestep import one_step_images
    from src.method.teacher import alphas_cumprod, load_pipeline

    b = _perturbed_copy(micro_student, tmp_path / "b")
    wa, wb = load_file(str(micro_student / WEIGHTS)), load_file(str(b / WEIGHTS))
    out = merge(micro_student, b, 0.25, tmp_path / "m")
    wm = load_file(str(out / WEIGHTS))
    assert set(wm) == set(wa)
    for k in wa:
        assert torch.allclose(wm[k], 0.25 * wa[k] + 0.75 * wb[k], atol=1e-6), k
    assert not torch.equal(wm[k], wa[k])
    meta = json.loads((out / "swiftbrush.json").read_text())
    assert meta["merge"]["lam"] == 0.25 and meta["timestep"] == json.loads(
        (micro_student / "swiftbrush.json").read_text())["timestep"]
    # lam 1 is A, lam 0 is B, exactly
    assert all(torch.equal(v, wa[k]) for k, v in load_file(str(merge(micro_student, b, 1.0, tmp_path / "one")
                                                                  / WEIGHTS)).items())
    assert all(torch.equal(v, wb[k]) for k, v in load_file(str(merge(micro_student, b, 0.0, tmp_path / "zero")
                                                                  / WEIGHTS)).items())
    # a complete pipeline that draws like any student
    pipe = load_pipeline(str(out))
    rec = read_prepared(world_prompts / "eval.jsonl", 2)
    images = one_step_images(pipe, pipe.unet, [r["prompt"] for r in rec], [r["seed"] for r in rec], alphas_cumprod(pipe),
                      2, torch.device("cpu"), timestep=meta["timestep"])
    assert images.shape[0] == 2 and images.std() > 0


def test_merge_states_keeps_dtype_and_integers():
    a = {"w": torch.tensor([1.0, 3.0], dtype=torch.float16), "n": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 5.0], dtype=torch.float16), "n": torch.tensor([7])}
    m = merge_states(a, b, 0.5)
    assert m["w"].dtype == torch.float16 and m["w"].tolist() == [2.0, 4.0] and m["n"].tolist() == [7]
    with pytest.raises(UserError, match="different weights"):
        merge_states(a, {"w": b["w"]}, 0.5)
    with pytest.raises(UserError, match="shape"):
        merge_states(a, {"w": torch.zeros(3), "n": b["n"]}, 0.5)


def test_students_that_cannot_be_merged_are_named(tmp_path, micro_student):
    b = _perturbed_copy(micro_student, tmp_path / "b")
    with pytest.raises(UserError, match="in \\[0, 1\\]"):
        merge(micro_student, b, 1.5, tmp_path / "m")
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        merge(micro_student, tmp_path / "nowhere", 0.5, tmp_path / "m")
    other_t = _perturbed_copy(micro_student, tmp_path / "t")
    meta = json.loads((other_t / "swiftbrush.json").read_text())
    (other_t / "swiftbrush.json").write_text(json.dumps(meta | {"timestep": meta["timestep"] - 100}))
    with pytest.raises(UserError, match="student timesteps"):
        merge(micro_student, other_t, 0.5, tmp_path / "m")
    other_vae = _perturbed_copy(micro_student, tmp_path / "v")
    vae = next((other_vae / "vae").glob("*.safetensors"))
    state = load_file(str(vae))
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, str(vae))
    with pytest.raises(UserError, match="vae differ"):
        merge(micro_student, other_vae, 0.5, tmp_path / "m")
    lora = _perturbed_copy(micro_student, tmp_path / "l")
    (lora / WEIGHTS).rename(lora / "unet" / "pytorch_lora_weights.safetensors")
    with pytest.raises(UserError, match="merge them into the UNet first"):
        merge(micro_student, lora, 0.5, tmp_path / "m")
    assert not (tmp_path / "m").exists()            # nothing half-written


def test_cli_and_curve_arguments(tmp_path, micro_student, capsys):
    b = _perturbed_copy(micro_student, tmp_path / "b")
    main([str(micro_student), str(b), "--lam", "0.5", "--out", str(tmp_path / "m")])
    assert (tmp_path / "m" / WEIGHTS).is_file() and "lam 0.5" in capsys.readouterr().out
    assert parse_lams("0, 0.25,1") == [0.0, 0.25, 1.0]
    for bad in ("0,x", "0,2", ""):
        with pytest.raises(UserError, match="--curve"):
            parse_lams(bad)
