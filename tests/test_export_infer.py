"""Export to ONNX (fp32, fp16) and `python -m src.infer`: parity, contract, CLI behaviour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.core.config import ExportConfig
from src.core.errors import UserError
from src.export import Paths, export

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle at the top on a blue background", "a big yellow box on the left, black background",
           "a small white plus sign in the center on a violet canvas"]


@pytest.fixture(scope="module")
def onnx_dir(micro_onnx):
    return micro_onnx


def test_export_writes_both_graphs_with_parity(onnx_dir):
    import onnx
    import onnxruntime as ort

    folder, metrics = onnx_dir
    assert metrics["psnr_fp32"] >= 40 and metrics["psnr_fp16"] >= 30          # export's default parity bars (dB)
    assert metrics["max_abs_err_fp32"] < 1e-3
    on_disk = json.loads((folder.parent / "rep" / "metrics.json").read_text())
    assert {"psnr_fp32", "psnr_fp16", "max_abs_err_fp32", "max_abs_err_fp16"} <= set(on_disk)
    contract = json.loads((folder / "onestep.json").read_text())
    for precision in ("fp32", "fp16"):
        path = folder / precision / "model.onnx"
        onnx.checker.check_model(str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == ["input_ids", "noise"]
        assert sess.get_inputs()[1].type == "tensor(float)"                   # float32 I/O in fp16 too
        out = sess.run(None, {"input_ids": np.zeros((3, contract["max_length"]), np.int64),
                              "noise": np.zeros((3, *contract["latent_shape"]), np.float32)})[0]
        assert out.shape[0] == 3 and out.dtype == np.float32                  # dynamic batch
    half = onnx.load(str(folder / "fp16" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    card = (folder / "README.md").read_text()
    assert "input_ids" in card and "python -m src.infer" in card and str(metrics["psnr_fp32"]) in card


def test_the_artifact_carries_no_path_of_the_checkout(onnx_dir, repo):
    """The dynamo exporter records each node's stack trace (absolute paths of this checkout); export drops
    them, so two clones in different folders write the same bytes (the same artifact version)."""
    folder, _ = onnx_dir
    for graph in (folder / "fp32" / "model.onnx", folder / "fp16" / "model.onnx"):
        data = graph.read_bytes()
        assert str(repo).encode() not in data and b"stack_trace" not in data


def test_export_refuses_to_write_below_the_parity_bar(tmp_path, micro_student, world_prompts):
    with pytest.raises(UserError, match="parity below the bar for fp32"):
        export(ExportConfig(parity_prompts=2, min_psnr_fp32=1e9, exporter="torchscript", opset=17),
               Paths(student=micro_student, out=tmp_path / "onnx", reports=tmp_path / "rep",
                     eval_prompts=world_prompts / "eval.jsonl"))
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "rep").exists()
    assert not [p for p in tmp_path.iterdir()]                               # no temp folder left either


def test_export_without_student_says_what_to_run(tmp_path):
    with pytest.raises(UserError, match="dvc repro distill"):
        export(ExportConfig(), Paths(student=tmp_path / "none", out=tmp_path / "o", reports=tmp_path / "r"))


def test_onnx_images_match_the_pytorch_student_for_the_same_seeds(onnx_dir, micro_student, micro_models):
    from src.method.onestep import one_step_images, timestep_of
    from src.method.teacher import alphas_cumprod, load_pipeline
    from src.serving.runtime import load_artifact, stream_images

    folder, _ = onnx_dir
    pipe = load_pipeline(str(micro_student))
    seeds = [11, 12, 13]
    assert timestep_of(pipe) == 899 == json.loads((folder / "onestep.json").read_text())["timestep"]
    expected = one_step_images(pipe, pipe.unet, PROMPTS, seeds, alphas_cumprod(pipe), timestep=899)
    # Without a timestep, generate reads the saved student's own from its scheduler, also when given
    # the teacher's whole schedule (as evaluate does).
    full = alphas_cumprod(load_pipeline(str(micro_models[0] / "teacher")))
    assert len(full) == 1000
    assert np.array_equal(one_step_images(pipe, pipe.unet, PROMPTS, seeds, full), expected)
    art = load_artifact(folder, "fp32", "cpu")
    got = np.stack([img for _, img in stream_images(art, PROMPTS, seeds, batch_size=2)])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1       # uint8 rounding at most
    # Batch size never changes an image.
    one_by_one = np.stack([img for _, img in stream_images(art, PROMPTS, seeds, batch_size=1)])
    assert np.array_equal(one_by_one, got)
    # Session tuning (no graph optimisation, one thread) changes speed, not pictures.
    plain = load_artifact(folder, "fp32", "cpu", optimization="disable", threads=1)
    same = np.stack([img for _, img in stream_images(plain, PROMPTS, seeds, batch_size=3)])
    assert np.abs(same.astype(int) - got.astype(int)).max() <= 1
    # Workers split a batch into parts that run at once, each on its own thread: the same images.
    split = load_artifact(folder, "fp32", "cpu", workers=2)
    calls = []

    class Recording:              # the real session, with each call's batch and thread noted
        def __init__(self, session):
            self.session = session

        def run(self, names, feed):
            calls.append((len(feed["noise"]), threading.current_thread().name))
            return self.session.run(names, feed)

    split.session = Recording(split.session)
    parts = np.stack([img for _, img in stream_images(split, PROMPTS, seeds, batch_size=3)])
    assert np.array_equal(parts, got)
    assert sorted(n for n, _ in calls) == [1, 2] and all(t.startswith("onnx-worker") for _, t in calls)
    with pytest.raises(UserError, match="workers: expected a positive integer"):
        load_artifact(folder, "fp32", "cpu", workers=0)


def test_tokenization_matches_the_pipeline_and_truncates_like_diffusers(onnx_dir, micro_student):
    from src.method.teacher import load_pipeline
    from src.serving.runtime import contract_token_ids, load_artifact

    folder, _ = onnx_dir
    tok = load_pipeline(str(micro_student)).tokenizer
    prompts = PROMPTS + [" ".join(["a red circle on a blue background"] * 20), "Ünïcode   spaced  OUT"]
    art = load_artifact(folder, "fp32", "cpu")
    ours, cut = contract_token_ids(art.tokenizer, art.contract, prompts)
    theirs = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                 return_tensors="np").input_ids
    assert np.array_equal(ours, theirs)
    assert len(cut) == 1 and prompts[3].endswith(cut[0]) and len(cut[0]) > 50   # the dropped tail


def _infer(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "src.infer", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_infer_cli_writes_pngs_and_never_imports_torch(tmp_path, onnx_dir):
    folder, _ = onnx_dir
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "import contextlib\n"
            "with contextlib.suppress(SystemExit): runpy.run_module('src.infer', run_name='__main__')\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code, "infer", *PROMPTS[:2], "--seed", "5", "--model", str(folder),
                          "--out", str(tmp_path / "imgs"), "--provider", "cpu"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("NO-TORCH")
    assert "CPUExecutionProvider" in run.stderr and "images/s" in run.stderr
    files = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert files == ["0000-seed5.png", "0001-seed6.png"]
    # The same prompt and seed, alone and into a single file: the same picture.
    single = _infer(PROMPTS[1], "--seed", "6", "--model", str(folder), "--out", str(tmp_path / "one.png"))
    assert single.returncode == 0, single.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")),
                          np.asarray(Image.open(tmp_path / "imgs" / "0001-seed6.png")))


@pytest.mark.parametrize("args, message", [
    (["a cat", "--model", "{missing}"], "dvc repro export"),
    (["--model", "{model}"], "no prompts"),
    (["   ", "--model", "{model}"], "no prompts"),
    (["a cat", "--seed", "-3", "--model", "{model}"], "--seed: expected a non-negative integer"),
    (["a cat", "--seed", "1.5", "--model", "{model}"], "--seed: expected a non-negative integer"),
    (["a cat", "b dog", "--seeds", "1", "--model", "{model}"], "2 prompts"),
    (["a cat", "--model", "{model}", "--out", "{blocked}/sub"], "cannot write"),
    (["a cat", "b dog", "--model", "{model}", "--out", "{tmp}/x.png"], "need a folder"),
])
def test_infer_bad_input_is_one_clear_message(tmp_path, onnx_dir, args, message):
    folder, _ = onnx_dir
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder would go")
    fill = {"model": str(folder), "missing": str(tmp_path / "no_model"), "blocked": str(blocked), "tmp": str(tmp_path)}
    run = _infer(*[a.format(**fill) for a in args])
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not list(tmp_path.glob("**/*.png"))


def test_weights_past_the_protobuf_limit_go_to_one_external_file(tmp_path, monkeypatch):
    """The size is counted from the weights' shapes (protobuf's ByteSize() fails past 2 GB); a graph
    over the limit is saved with its weights in <name>.data and still loads and runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    import src.artifact.graph as graph_mod

    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)            # 8 KiB (onnx keeps < 1 KiB inline)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert graph_mod.tensor_bytes(model) == 8192
    monkeypatch.setattr(graph_mod, "TWO_GB", 64 * 1024**2 + 8000)     # the limit, scaled down past the margin
    graph_mod.save_graph(model, tmp_path / "model.onnx")
    assert (tmp_path / "model.onnx.data").stat().st_size >= 8192
    x = np.ones((1, 64), np.float32)
    np.testing.assert_array_equal(ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x})[0], x @ w)
    assert not onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph.initializer[0].raw_data


def test_per_weight_files_are_consolidated_and_converted_to_fp16(tmp_path):
    """What the exporter leaves past 2 GB (one file per weight) becomes one `.data` file, streamed;
    the fp16 conversion types the graph from the weight-less model and the result still runs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from src.artifact.graph import consolidate, export_fp16

    rng = np.random.default_rng(0)
    w1, b1 = rng.standard_normal((64, 320)).astype(np.float32), rng.standard_normal(320).astype(np.float32)
    w2 = rng.standard_normal((320, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="/unet/mm1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="/unet/add"),   # a bias symbolic inference reads
             helper.make_node("Relu", ["hb"], ["r"], name="/unet/relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="/unet/mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
                              initializer=[numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (b1, "b1"),
                                                                                      (w2, "w2"))])
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    str(raw_dir / "raw.onnx"), save_as_external_data=True, all_tensors_to_one_file=False)
    assert len(list(raw_dir.iterdir())) == 4                         # the graph + one file per weight
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    consolidate(raw_dir / "raw.onnx", out_dir / "model.onnx")
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    want = np.maximum(x @ w1 + b1, 0) @ w2
    got = ort.InferenceSession(str(out_dir / "model.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)

    half = tmp_path / "fp16" / "model.onnx"
    half.parent.mkdir()
    export_fp16(out_dir / "model.onnx", half)
    model = onnx.load(str(half))
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    got16 = ort.InferenceSession(str(half)).run(None, {"x": x})[0]
    assert got16.dtype == np.float32 and np.abs(got16 - want).max() < 0.05 * np.abs(want).max()


def test_large_graphs_convert_to_fp16_a_weight_at_a_time_into_mappable_offsets(tmp_path):
    """A graph with external weights converts without loading them: each weight the fp16 graph runs in
    half precision holds exactly the float16 rounding of the float32 weight, a weight kept float32 (the
    decoder with keep_vae_fp32) is copied bit for bit, and weights of 1 MiB or more start on 64 KiB
    boundaries (where ONNX Runtime can map them) in both graphs."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from src.artifact.graph import consolidate, export_fp16

    rng = np.random.default_rng(1)
    small = rng.standard_normal((64, 512)).astype(np.float32)           # 128 KiB: not aligned
    big = rng.standard_normal((512, 512)).astype(np.float32)            # 1 MiB: aligned
    dec = rng.standard_normal((512, 8)).astype(np.float32)              # the decoder's: stays float32
    nodes = [helper.make_node("MatMul", ["x", "small"], ["h"], name="/unet/mm1"),
             helper.make_node("MatMul", ["h", "big"], ["h2"], name="/unet/mm2"),
             helper.make_node("MatMul", ["h2", "dec"], ["y"], name="/vae/decoder/mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              initializer=[numpy_helper.from_array(w, n)
                                           for w, n in ((small, "small"), (big, "big"), (dec, "dec"))])
    raw = tmp_path / "raw" / "raw.onnx"
    raw.parent.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                    str(raw), save_as_external_data=True, all_tensors_to_one_file=False)
    fp32, fp16 = tmp_path / "fp32" / "model.onnx", tmp_path / "fp16" / "model.onnx"
    fp32.parent.mkdir()
    fp16.parent.mkdir()
    consolidate(raw, fp32)
    export_fp16(fp32, fp16, keep_vae_fp32=True)

    for path in (fp32, fp16):
        light = onnx.load(str(path), load_external_data=False)
        offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in light.graph.initializer}
        assert offsets["big"] % 65536 == 0
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp16)).graph.initializer}
    assert weights["small"].dtype == weights["big"].dtype == np.float16
    np.testing.assert_array_equal(weights["small"], small.astype(np.float16))
    np.testing.assert_array_equal(weights["big"], big.astype(np.float16))
    assert weights["dec"].dtype == np.float32
    np.testing.assert_array_equal(weights["dec"], dec)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    want = x @ small @ big @ dec
    got = ort.InferenceSession(str(fp16)).run(None, {"x": x})[0]
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


def _damage(folder: Path, what: str) -> str:
    """Damage a copy of an artifact as a failed copy or a careless edit would; return the file to be named."""
    if what == "truncated model.onnx":
        path = folder / "fp32" / "model.onnx"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif what == "onestep.json not JSON":
        path = folder / "onestep.json"
        path.write_text('{"max_length": 77,')
    elif what == "onestep.json is {}":
        path = folder / "onestep.json"
        path.write_text("{}")
    elif what == "garbage tokenizer.json":
        path = folder / "tokenizer.json"
        path.write_bytes(b"\x00\xffnot a tokenizer" * 10)
    elif what == "no manifest":
        path = folder / "manifest.json"
        path.unlink()
    elif what == "manifest not JSON":
        path = folder / "manifest.json"
        path.write_text("[[[")
    return str(path)


DAMAGE = ["truncated model.onnx", "onestep.json not JSON", "onestep.json is {}", "garbage tokenizer.json"]


@pytest.mark.parametrize("what", DAMAGE + ["no manifest", "manifest not JSON"])
def test_a_damaged_artifact_is_one_clear_error_naming_the_file(tmp_path, onnx_dir, what):
    """The manifest catches every damaged file before anything parses it."""
    import shutil

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_dir[0], folder)
    named = _damage(folder, what)
    run = _infer("a cat", "--model", str(folder), "--out", str(tmp_path / "x.png"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert named in run.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("what, message", [("truncated model.onnx", "ONNX Runtime cannot open it"),
                                           ("onestep.json not JSON", "not valid JSON"),
                                           ("onestep.json is {}", "max_length"),
                                           ("garbage tokenizer.json", "not a Hugging Face tokenizers file")])
def test_damage_behind_a_consistent_manifest_is_still_a_clear_error(tmp_path, onnx_dir, what, message):
    """A hand-assembled folder whose manifest was rewritten after the damage: the file checks still name it."""
    import shutil

    from src.core import manifest
    from src.serving.runtime import load_artifact

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_dir[0], folder)
    named = _damage(folder, what)
    manifest.write(folder)
    with pytest.raises(UserError, match=message) as err:
        load_artifact(folder, provider="cpu")
    assert named in str(err.value)


def test_export_writes_a_manifest_that_verifies_every_file(onnx_dir):
    import hashlib

    from src.core import manifest

    folder, metrics = onnx_dir
    m = manifest.read(folder)
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [p for p in on_disk if p != "manifest.json"]
    for rel, entry in m["files"].items():
        data = (folder / rel).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert metrics["version"] == m["version"] == m["digest"][:16]
    manifest.verify(folder, sorted(m["files"]))
    assert manifest.verify(folder) == manifest.verify(folder, ["fp32/", "fp16/", "onestep.json"]) == m
    with pytest.raises(UserError, match="no file below it is listed"):
        manifest.verify(folder, ["fp64/"])


def test_the_legacy_torchscript_exporter_meets_the_same_parity_bars(tmp_path, micro_student, world_prompts):
    """export.exporter: torchscript (the legacy tracer) writes the same contract as the default dynamo exporter:
    dynamic batch, fp32 and fp16 above the bars."""
    from src.serving.runtime import load_artifact, stream_images

    metrics = export(ExportConfig(exporter="torchscript", opset=17, parity_prompts=3),
                     Paths(student=micro_student, out=tmp_path / "onnx", reports=tmp_path / "rep",
                           eval_prompts=world_prompts / "eval.jsonl"))
    assert metrics["psnr_fp32"] >= 40 and metrics["psnr_fp16"] >= 30
    art = load_artifact(tmp_path / "onnx", provider="cpu")
    assert art.session.get_inputs()[0].shape[0] == "batch"
    one = dict(stream_images(art, PROMPTS[:1], [3], batch_size=1))[0]
    three = dict(stream_images(art, PROMPTS, [3, 4, 5], batch_size=3))
    assert np.abs(one.astype(int) - three[0].astype(int)).max() <= 1             # a batch of 1 is dynamic too
    assert "torchscript exporter" in (tmp_path / "onnx" / "README.md").read_text()


def test_io_binding_gives_the_same_images_as_a_plain_run(onnx_dir):
    """The CUDA path binds inputs and lets ONNX Runtime allocate the output on the device; bound on the CPU here,
    it must give exactly the images of a plain session.run."""
    import dataclasses

    from src.method.noise import initial_noise
    from src.serving.runtime import contract_token_ids, load_artifact

    art = load_artifact(onnx_dir[0], "fp32", "cpu")
    assert art.io_binding is False                   # CPU provider: plain runs
    ids, _ = contract_token_ids(art.tokenizer, art.contract, ["a red circle", "a blue square at the top"])
    noise = initial_noise([3, 4], tuple(art.contract["latent_shape"]))
    plain = art.run(ids, noise)
    bound = dataclasses.replace(art, io_binding=True).run(ids, noise)
    assert bound.shape == plain.shape and np.array_equal(bound, plain)


def test_cuda_fusions_apply_to_the_generator_and_a_cpu_machine_refuses_to_ship_them(tmp_path, onnx_dir,
                                                                                  micro_onnx_b, micro_student):
    """export.fuse: cuda. ONNX Runtime's SD optimiser fuses the exported generator, from either exporter (the
    fused graph is written and carries CUDA-only operators); without a GPU to check its parity the stage
    writes nothing."""
    import onnx
    import torch

    from src.artifact.graph import fuse_cuda

    for name, folder in (("dynamo", onnx_dir[0]), ("torchscript", micro_onnx_b)):
        fused = fuse_cuda(folder / "fp32" / "model.onnx", tmp_path / f"{name}.onnx")
        assert fused.get("GroupNorm", 0) > 0 and fused.get("NhwcConv", 0) > 0, name
        ops = {n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node}
        assert {"GroupNorm", "NhwcConv"} <= ops
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is usable here"):
            export(ExportConfig(fuse="cuda"), Paths(student=micro_student, out=tmp_path / "o", reports=tmp_path / "r"))
        assert not (tmp_path / "o").exists()


def test_ort_fusions_put_contrib_attention_in_both_graphs_with_the_same_images(tmp_path, onnx_dir, micro_student,
                                                                              world_prompts, monkeypatch):
    """export.fuse: ort. Every attention of the exported generator becomes one ONNX Runtime contrib operator
    (no Softmax left), both graphs still pass the parity bars and run on the CPU provider, and the images are
    those of the plain artifact. (The stage's torch -> ONNX step is the plain export's graph, copied: the
    same student, without exporting it again.)"""
    import shutil

    import onnx

    import src.export as export_mod
    from src.serving.runtime import load_artifact, stream_images

    monkeypatch.setattr(export_mod, "export_fp32", lambda pipe, path, opset, exporter: shutil.copy(
        onnx_dir[0] / "fp32" / "model.onnx", path))
    metrics = export(ExportConfig(fuse="ort", parity_prompts=3),
                     Paths(student=micro_student, out=tmp_path / "onnx", reports=tmp_path / "rep",
                           eval_prompts=world_prompts / "eval.jsonl"))
    assert metrics["psnr_fp32"] >= 40 and metrics["psnr_fp16"] >= 30
    assert metrics["fusions"].get("multi_head_attention", 0) > 0
    plain_ops = [n.op_type for n in onnx.load(str(onnx_dir[0] / "fp32" / "model.onnx")).graph.node]
    for precision in ("fp32", "fp16"):
        ops = [n.op_type for n in onnx.load(str(tmp_path / "onnx" / precision / "model.onnx")).graph.node]
        assert "Softmax" not in ops and ops.count("MultiHeadAttention") + ops.count("Attention") == \
            plain_ops.count("Softmax"), precision
    assert "contrib attention operators" in (tmp_path / "onnx" / "README.md").read_text()
    seeds = [3, 4, 5]
    fused = dict(stream_images(load_artifact(tmp_path / "onnx", "fp32", "cpu"), PROMPTS, seeds, batch_size=3))
    plain = dict(stream_images(load_artifact(onnx_dir[0], "fp32", "cpu"), PROMPTS, seeds, batch_size=3))
    for i in range(3):
        assert np.abs(fused[i].astype(int) - plain[i].astype(int)).max() <= 1


def test_ort_fusions_keep_a_large_graph_in_one_external_file(tmp_path, onnx_dir, monkeypatch):
    """Past the protobuf limit the fused graph's weights go to one model.onnx.data beside it, as export writes
    them; the folder holds nothing else and the graph runs."""
    import shutil

    import onnxruntime as ort

    import src.artifact.graph as graph_mod

    graph = tmp_path / "fp32" / "model.onnx"
    graph.parent.mkdir()
    shutil.copy(onnx_dir[0] / "fp32" / "model.onnx", graph)
    monkeypatch.setattr(graph_mod, "TWO_GB", 64 * 1024**2 + 1024)       # every graph counts as large
    assert graph_mod.fuse_ort(graph).get("multi_head_attention", 0) > 0
    assert sorted(p.name for p in graph.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert graph.stat().st_size < (graph.parent / "model.onnx.data").stat().st_size
    contract = json.loads((onnx_dir[0] / "onestep.json").read_text())
    out = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": np.zeros((2, contract["max_length"]), np.int64),
               "noise": np.zeros((2, *contract["latent_shape"]), np.float32)})[0]
    assert out.shape[0] == 2 and np.isfinite(out).all()


def test_the_fp16_graph_keeps_the_glue_and_the_timestep_embedding_float32(onnx_dir):
    """The dynamo exporter's nodes carry their module scope in their names, so the float16 conversion finds the
    generator's own glue (the x0 arithmetic) and keeps it float32, while the networks run in float16."""
    import onnx

    from src.artifact.graph import fp32_node

    half = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_dir[0] / "fp16" / "model.onnx")), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.value_info, *half.graph.output]}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

    def out_types(nodes):
        return [types[o] for n in nodes for o in n.output if types.get(o) in floats]

    nodes = [n for n in half.graph.node if n.op_type != "Cast"]
    glue = [n for n in nodes if fp32_node(n.name)]
    assert glue and set(out_types(glue)) == {onnx.TensorProto.FLOAT}
    for n in glue:                                   # top-level glue (`/node_div_26`) and the timestep embedding
        assert n.name.count("/") == 1 or n.name.startswith(("/unet/time_proj/", "/unet/time_embedding/")) or \
            n.name.startswith("/_empty_nn_module_stack"), n.name
    for network in ("/text_encoder/", "/unet/down_blocks/", "/vae/decoder/"):
        inside = [n for n in nodes if n.name.startswith(network)]
        assert inside and onnx.TensorProto.FLOAT16 in out_types(inside), network
