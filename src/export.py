"""The export stage: the one-step student as ONNX graphs (fp32 and fp16), checked for parity.

    python -m src.export            # as the DVC stage `export` runs it

One graph per precision, the whole generator (DESIGN.md section 7):

    input_ids  int64   (batch, max_length)   token ids, padded (see tokenizer contract below)
    noise      float32 (batch, C, h, w)      initial latent, N(0, I); src/noise.py for seeds
      -> text encoder -> student UNet at its timestep t_s -> x0 -> decoder ->
    images     float32 (batch, 3, H, W)      in [0, 1]

Inputs and outputs stay float32 in the fp16 graph too (only the inside is half precision),
so `python -m src.infer` feeds both the same way. The decoder is the teacher's VAE
(`export.decoder: vae`) or a TAESD-format tiny decoder (`tiny`: the top-level `tiny_decoder`),
several times cheaper (reports/bench/README.md) at the quality cost reports/eval/README.md shows. The folder also holds `tokenizer.json`
and `onestep.json` (shapes, timestep, tokenizer ids), a model card, README.md, and, written
last, `manifest.json`: the SHA-256 and size of every file and the artifact's version
(src/manifest.py). Every reader (`src.infer`, `src.serve`, promotion) verifies it first.

fp16: the fp32 graph converted by ONNX Runtime's float16 tool with float32 inputs/outputs;
ops whose half-precision version is numerically unsafe or has no kernel (the timestep
embedding's Sin/Cos/Exp, normalisations' reductions, Resize) stay float32.

export.fuse: ort (the world's params.yaml) replaces every attention by ONNX Runtime's contrib
MultiHeadAttention / Attention operators and erf-GELU by Gelu (fuse_ort; CPU and CUDA kernels);
none leaves the plain ONNX graph; cuda adds ORT's Stable Diffusion fusions, whose operators
have CUDA kernels only (fuse_cuda). With none or ort both artifacts load and run on the CPU
provider as well as on CUDA.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import manifest
from .config import ExportConfig, stage_config
from .errors import UserError, run_cli
from .fileio import atomic_dir, write_json
from .noise import initial_noise
from .onestep import decode, student_x0, timestep_of
from .teacher import alphas_cumprod, load_pipeline, with_tiny_decoder
from .prepare import read_prepared

TWO_GB = 2 * 1024**3


@dataclass
class Paths:
    student: Path = Path("models/student")
    out: Path = Path("models/onnx")
    reports: Path = Path("reports/export")
    eval_prompts: Path = Path("prompts/eval.jsonl")
    tiny_decoder: Path | None = None      # the top-level tiny_decoder (export.decoder: tiny)


class OneStepGraph(torch.nn.Module):
    """token ids + noise -> images in [0, 1]: what the ONNX graph computes."""

    def __init__(self, pipe):
        super().__init__()
        self.text_encoder, self.unet, self.vae = pipe.text_encoder, pipe.unet, pipe.vae
        self.register_buffer("abar", alphas_cumprod(pipe), persistent=False)
        self.prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.timestep = timestep_of(pipe)

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        text = self.text_encoder(input_ids)[0]
        return decode(self.vae, student_x0(self.unet, noise, text, self.abar, self.prediction, self.timestep))


def contract(pipe) -> dict:
    """What a caller needs besides the graph: shapes, the tokenizer's ids, the noise convention."""
    tok, unet = pipe.tokenizer, pipe.unet
    return {
        "inputs": {"input_ids": ["batch", tok.model_max_length], "noise": ["batch", unet.config.in_channels,
                                                                             unet.config.sample_size,
                                                                             unet.config.sample_size]},
        "outputs": {"images": ["batch", 3, "H", "W"], "range": [0.0, 1.0]},
        "max_length": tok.model_max_length,
        "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
        "latent_shape": [unet.config.in_channels, unet.config.sample_size, unet.config.sample_size],
        "timestep": timestep_of(pipe),
        "decoder": type(pipe.vae).__name__,
        "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        "noise": "sample i: numpy.random.default_rng(seed_i).standard_normal(latent_shape, dtype=float32)",
    }


def export_fp32(pipe, path: Path, opset: int, exporter: str = "torchscript") -> None:
    """torch -> ONNX with a dynamic batch, external data when over 2 GB. `exporter`: torchscript (the
    legacy tracer, deprecated by PyTorch) or dynamo (torch.export; needs the onnxscript package)."""
    graph = OneStepGraph(pipe).eval()
    c = contract(pipe)
    ids = torch.full((2, c["max_length"]), c["pad_id"], dtype=torch.long)   # batch 2: a size-1 axis is not
    noise = torch.zeros(2, *c["latent_shape"])                             # exported as dynamic
    raw = path.parent / "raw.onnx"
    names = dict(input_names=["input_ids", "noise"], output_names=["images"], opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # shape asserts in diffusers blocks
        # both inputs share the one batch dimension; torch.export says so once per input name
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(graph, (ids, noise), None, dynamo=True, verbose=False,
                                        dynamic_shapes=({0: batch}, {0: batch}), **names)
            program.save(str(raw))            # its weights go to raw.onnx.data past 2 GB
            del program
        else:
            torch.onnx.export(graph, (ids, noise), str(raw), dynamo=False, **names,
                              dynamic_axes={"input_ids": {0: "batch"}, "noise": {0: "batch"}, "images": {0: "batch"}})
    del graph
    consolidate(raw, path)
    for f in path.parent.iterdir():
        if f.name not in (path.name, path.name + ".data"):
            f.unlink()


def strip_debug_info(model):
    """Drop what the dynamo exporter records per node for debugging: the Python stack trace (with the absolute
    paths of this checkout) and module scopes. Without it the graph's bytes depend only on the model, so two
    checkouts export the same artifact version. Each node's module scope goes into its name first, as the
    TorchScript exporter names nodes (`/unet/time_embedding/linear_1/node_linear_12`; the generator's own glue
    `/node_sqrt`): the float16 conversion keeps nodes float32 by these names (fp32_node)."""
    for node in model.graph.node:
        scopes = next((ast.literal_eval(p.value) for p in node.metadata_props if p.key == SCOPES), None)
        if scopes is not None:
            module = scopes[-2] if len(scopes) > 1 else ""     # the innermost module; the last entry is the op
            node.name = "/" + (module.replace(".", "/") + "/" if module else "") + node.name
        del node.metadata_props[:]
    return model


SCOPES = "pkg.torch.onnx.name_scopes"        # the dynamo exporter's per-node module path (a Python list literal)


def consolidate(raw: Path, path: Path) -> None:
    """`raw` (as the exporter wrote it) -> `path`. Past 2 GB the exporter leaves one file per weight;
    they are streamed into one `<name>.data` a tensor at a time (never the whole model in memory)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        _save(strip_debug_info(onnx.load(str(raw))), path)
        return
    strip_debug_info(model)
    with (path.parent / (path.name + ".data")).open("wb") as out:
        for t in external:
            info = {e.key: e.value for e in t.external_data}
            with (raw.parent / info["location"]).open("rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
            offset = out.tell()
            out.write(data)
            del t.external_data[:]
            for key, value in (("location", path.name + ".data"), ("offset", offset), ("length", len(data))):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def export_fp16(fp32: Path, path: Path) -> None:
    """ORT's float16 conversion with float32 I/O; the timestep embedding and the glue stay float32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    from onnxruntime.transformers.float16 import convert_float_to_float16

    types = value_types(fp32)
    full = onnx.load(str(fp32))
    known = {x.name for x in full.graph.value_info}
    full.graph.value_info.extend(v for v in types if v.name not in known)
    keep = [n.name for n in full.graph.node if fp32_node(n.name)]
    # The converter itself, with the types given: OnnxModel's wrapper would run ONNX shape inference,
    # which serialises the whole model and fails past 2 GB. Then the wrapper's own cast clean-ups.
    model = OnnxModel(convert_float_to_float16(full, keep_io_types=True, node_block_list=keep,
                                               disable_shape_infer=True))
    del full
    model.remove_cascaded_cast_nodes()
    model.remove_useless_cast_nodes()
    drop_duplicate_casts(model.model.graph)
    model.topological_sort()      # the converter appends its input casts after their consumers
    del model.model.graph.value_info[:]    # the float32 types given to the converter; stale where it converted
    _save(model.model, path)


def fuse_cuda(fp32: Path, path: Path) -> dict[str, int]:
    """`fp32` -> `path`: ONNX Runtime's Stable Diffusion graph optimiser (model type unet, GPU fusion options)
    over the whole generator, then float16 with float32 I/O and the same float32 islands as export_fp16.
    The fused operators (GroupNorm, SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd) have CUDA kernels
    only. Returns how many of each fusion applied."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("unet")
    try:
        model = optimize_model(str(fp32), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, use_gpu=True)
    except (TypeError, ValueError, IndexError, KeyError, AssertionError):
        # its attention pattern matcher fails on some exporters' graphs (TorchScript's: a 1-element num_heads
        # tensor where it expects a scalar); the other fusions do not depend on it
        options.enable_attention = False
        model = optimize_model(str(fp32), model_type="unet", num_heads=0, hidden_size=0, opt_level=0,
                               optimization_options=options, use_gpu=True)
    fused = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    keep = [n.name for n in model.model.graph.node if fp32_node(n.name)]
    model.convert_float_to_float16(keep_io_types=True, node_block_list=keep)
    big = tensor_bytes(model.model) > TWO_GB
    model.save_model_to_file(str(path), use_external_data_format=big, all_tensors_to_one_file=True)
    return fused


def fuse_ort(path: Path) -> dict[str, int]:
    """In place: ONNX Runtime's contrib attention operators, by onnxscript's ORT fusions. Each
    scaled-dot-product attention of the UNet and the decoder becomes one MultiHeadAttention, the text
    encoder's masked self-attention with its projections one Attention, erf-GELU one Gelu. These
    operators have CPU and CUDA kernels, so the graph stays runnable on both providers (ONNX Runtime
    only). Returns how many of each fusion applied (none on graphs whose pattern differs)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import attention, erfgelu, mha, mha_bias, sdpa, shape_optimization

    model = ir.load(str(path))
    common_passes.ShapeInferencePass()(model)         # the attention patterns match on known ranks and shapes
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    counts = {"gelu": erfgelu.fuse_erfgelu(model), "sdpa": sdpa.fuse_sdpa(model, apply_shape_inference=True)}
    counts["multi_head_attention"] = mha.fuse_mha2(model) + mha.fuse_mha1(model)
    if counts["multi_head_attention"]:
        counts["mha_bias"] = mha_bias.fuse_mha_bias(model)
        counts["attention"] = attention.fuse_attention(model)
    optimize(model)
    counts.pop("sdpa")                                # an intermediate step: MultiHeadAttention consumes them
    big = past_protobuf_limit(sum(v.const_value.nbytes for v in model.graph.initializers.values()
                                  if v.const_value is not None))
    # written beside, then moved over: the weights may still be read lazily from the old data file
    staging = path.parent / ".fused"
    staging.mkdir()
    ir.save(model, str(staging / path.name), external_data=path.name + ".data" if big else None)
    del model
    for f in staging.iterdir():
        f.replace(path.parent / f.name)
    staging.rmdir()
    return {k: int(v) for k, v in counts.items() if v}


def cuda_usable() -> bool:
    """Whether ONNX Runtime can run a graph on a CUDA GPU here (torch's view of the GPU, and the provider)."""
    import onnxruntime as ort

    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


def value_types(path: Path) -> list:
    """The element type of every intermediate value (what the float16 converter needs), by ORT's
    symbolic shape inference on the graph without its weights: the converter's own run would
    copy the whole multi-GB model, and ONNX's shape inference refuses graphs past 2 GB."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    light = onnx.load(str(path), load_external_data=False)      # weights past 1 KiB stay on disk
    # The few weights it reads (constant folding) resolve their external file against the working directory.
    with contextlib.chdir(path.parent):
        typed = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=False)
    out = []
    for vi in typed.graph.value_info:
        if vi.name and vi.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            vi.type.tensor_type.ClearField("shape")          # types only (auto_merge may guess shapes)
            out.append(vi)
    return out


def fp32_node(name: str) -> bool:
    """Nodes kept float32 in the fp16 graph.

    The sinusoidal timestep embedding (a naive conversion breaks it: the Cast mismatch in
    time_proj that makes ONNX Runtime refuse the graph, and fp16 Sin/Cos of t * 10^k loses the
    phase) and the glue outside the three networks: x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)
    divides by sqrt(abar_T) ~ 0.07, which would magnify half-precision error 14x.
    """
    if "/time_proj/" in name or "/time_embedding/" in name:
        return True
    return name.startswith("/") and not name.startswith(NETWORKS)


# node-name prefixes of the three networks: dynamo names nodes by module path (/vae/decoder/...), TorchScript by
# the scope it traced (/decoder/...)
NETWORKS = ("/unet/", "/text_encoder/", "/vae/", "/decoder/", "/post_quant_conv/")


def drop_duplicate_casts(graph) -> int:
    """Remove repeated identical Cast nodes (same output name) that the converter inserts when one
    half-precision value feeds several float32 nodes; the graph must be SSA to load."""
    seen, dupes = set(), []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in seen:
            dupes.append(node)
        seen.update(node.output)
    for node in dupes:
        graph.node.remove(node)
    return len(dupes)


def tensor_bytes(model) -> int:
    """Bytes of the graph's weights, counted from their shapes and types. (protobuf's ByteSize()
    itself fails on a model past 2 GB: "Failed to serialize proto".)"""
    import onnx
    from onnx import helper

    total = 0
    for t in model.graph.initializer:
        itemsize = 1 if t.data_type == onnx.TensorProto.STRING else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


def past_protobuf_limit(weight_bytes: int) -> bool:
    """Whether a graph with this many bytes of weights must keep them in an external file (the graph itself
    and protobuf's framing take the last 64 MiB below 2 GB)."""
    return weight_bytes > TWO_GB - 64 * 1024**2


def _save(model, path: Path) -> None:
    """Save; weights go to one external file `<name>.data` when the graph would pass protobuf's 2 GB."""
    import onnx

    large = past_protobuf_limit(tensor_bytes(model))
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)
    if large:                         # onnx creates it 0600: readable by a serving account like the graph
        (path.parent / (path.name + ".data")).chmod(path.stat().st_mode & 0o777)
    onnx.checker.check_model(str(path))


def run_session(path: Path, provider: str = "CPUExecutionProvider"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=[provider])


PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def tokenize(pipe, prompts: list[str]) -> np.ndarray:
    tok = pipe.tokenizer
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="np").input_ids.astype(np.int64)


def reference(pipe, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, noise, images) of the PyTorch student: what the ONNX graphs must reproduce."""
    c = contract(pipe)
    ids, noise = tokenize(pipe, prompts), initial_noise(seeds, tuple(c["latent_shape"]))
    with torch.no_grad():
        ref = OneStepGraph(pipe).eval()(torch.from_numpy(ids), torch.from_numpy(noise)).numpy()
    return ids, noise, ref


def parity(files: dict[str, Path], ids: np.ndarray, noise: np.ndarray, ref: np.ndarray,
           providers: dict[str, str] | None = None) -> dict[str, float]:
    """ONNX vs the PyTorch student's images `ref` for the same inputs: PSNR and max error on [0, 1].
    `providers`: where each graph runs (cpu unless named: a fused fp16 graph runs on cuda only)."""
    out = {}
    for name, f in files.items():
        t0 = time.perf_counter()
        session = run_session(f, PROVIDER[(providers or {}).get(name, "cpu")])
        out[f"session_load_s_{name}"] = round(time.perf_counter() - t0, 1)
        got = session.run(["images"], {"input_ids": ids, "noise": noise})[0]
        out[f"psnr_{name}"] = round(psnr(got, ref), 3)
        out[f"max_abs_err_{name}"] = float(np.abs(got - ref).max())
        del session                   # one multi-GB session at a time
    return out


def export(cfg: ExportConfig, paths: Paths = Paths()) -> dict:
    """Write models/onnx (fp32/, fp16/, tokenizer.json, onestep.json, README.md) and the parity report."""
    if not (paths.student / "model_index.json").is_file():
        raise UserError(f"{paths.student}: no student pipeline (run `dvc repro distill` first)")
    if cfg.fuse == "cuda" and not cuda_usable():
        raise UserError("export.fuse: cuda: the fused fp16 graph has CUDA-only operators (GroupNorm, NhwcConv), and "
                        "no CUDA GPU is usable here to check its parity; export on a GPU machine, or set "
                        "export.fuse: none (the portable graphs). Nothing was written.")
    pipe = load_pipeline(str(paths.student))
    if cfg.decoder == "tiny":
        pipe = with_tiny_decoder(pipe, paths.tiny_decoder, "export.decoder")
    records = read_prepared(paths.eval_prompts, cfg.parity_prompts) if paths.eval_prompts.is_file() else []
    prompts = [r["prompt"] for r in records] or ["a photo of a cat"]
    seeds = [int(r["seed"]) for r in records] or [0]
    ids, noise, ref = reference(pipe, prompts, seeds)
    t0 = time.perf_counter()
    with atomic_dir(paths.out) as tmp:
        files = {"fp32": tmp / "fp32" / "model.onnx", "fp16": tmp / "fp16" / "model.onnx"}
        for f in files.values():
            f.parent.mkdir(parents=True)
        export_fp32(pipe, files["fp32"], cfg.opset, cfg.exporter)
        pipe.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        c = contract(pipe)
        (tmp / "onestep.json").write_text(json.dumps(c, indent=2) + "\n")
        del pipe                      # the PyTorch weights: gone before the fp16 graph and the sessions load
        gc.collect()
        t_fuse = time.perf_counter()
        fused = fuse_ort(files["fp32"]) if cfg.fuse == "ort" else {}
        t_fp16 = time.perf_counter()
        if cfg.fuse == "cuda":
            fused = fuse_cuda(files["fp32"], files["fp16"])
        else:
            export_fp16(files["fp32"], files["fp16"])
        timings = {"export_fp32_s": round(t_fuse - t0, 1), "fuse_s": round(t_fp16 - t_fuse, 1),
                   "convert_fp16_s": round(time.perf_counter() - t_fp16, 1)}
        metrics = parity(files, ids, noise, ref, {"fp16": cfg.fuse} if cfg.fuse == "cuda" else None) | timings
        metrics |= {"fuse": cfg.fuse, "fusions": fused}
        metrics |= {f"external_data_{k}": (f.parent / (f.name + ".data")).is_file() for k, f in files.items()}
        metrics |= {f"size_mb_{k}": round(sum(p.stat().st_size for p in f.parent.iterdir()) / 2**20, 2)
                    for k, f in files.items()}
        metrics["export_s"] = round(time.perf_counter() - t0, 1)
        metrics["parity_prompts"] = len(prompts)
        failed = [k for k, bar in (("fp32", cfg.min_psnr_fp32), ("fp16", cfg.min_psnr_fp16))
                  if metrics[f"psnr_{k}"] < bar]
        if failed:
            raise UserError("export: parity below the bar for " + ", ".join(
                f"{k} ({metrics[f'psnr_{k}']:.1f} dB)" for k in failed) + f"; bars: fp32 {cfg.min_psnr_fp32} dB, "
                f"fp16 {cfg.min_psnr_fp16} dB. Nothing was written.")
        (tmp / "README.md").write_text(model_card(paths.student, c, metrics, cfg))
        metrics["version"] = manifest.write(tmp)["version"]          # last: it hashes the files as written
    write_json(paths.reports / "metrics.json", metrics)
    return metrics


def fusion_note(m: dict) -> str:
    applied = ", ".join(f"{k} x{v}" for k, v in m.get("fusions", {}).items()) or "none matched"
    if m.get("fuse") == "cuda":
        return ("The fp16 graph carries ONNX Runtime's Stable Diffusion fusions (" + applied + "): it runs on the "
                "CUDA provider only, where its parity was measured. The fp32 graph is the portable one.")
    if m.get("fuse") == "ort":
        return ("Both graphs carry ONNX Runtime's contrib attention operators (" + applied + "), which have CPU\n"
                "and CUDA kernels: they need ONNX Runtime, on either provider.")
    return ("Neither graph uses ONNX Runtime's fused Stable Diffusion operators, so both run on the CPU\n"
            "provider as well as CUDA (fp16 is meant for GPUs; on CPU ONNX Runtime runs its half ops through casts).")


def model_card(student: Path, c: dict, m: dict, cfg: ExportConfig) -> str:
    made = json.loads((student / "swiftbrush.json").read_text()) if (student / "swiftbrush.json").is_file() else {}
    shape = "x".join(map(str, c["latent_shape"]))
    return f"""# One-step SwiftBrush student (ONNX)

A text-to-image generator distilled from a Stable-Diffusion-style teacher with SwiftBrush
(variational score distillation, no training images). One network evaluation per image.

| file | what |
|---|---|
| `fp32/model.onnx` | the whole generator in float32 ({m['size_mb_fp32']} MB) |
| `fp16/model.onnx` | the same in float16 inside, float32 inputs/outputs ({m['size_mb_fp16']} MB) |
| `tokenizer.json` | the teacher's tokenizer (Hugging Face `tokenizers` format) |
| `onestep.json` | the I/O contract below, machine-readable |
| `manifest.json` | SHA-256 and size of every file, and the artifact's version; readers verify it before loading |

## I/O contract

| name | type | shape | meaning |
|---|---|---|---|
| `input_ids` | int64 | (batch, {c['max_length']}) | token ids: BOS ({c['bos_id']}), prompt, EOS ({c['eos_id']}), padded with {c['pad_id']}; longer prompts are cut to {c['max_length']} (EOS kept last) |
| `noise` | float32 | (batch, {shape}) | initial latent, standard normal; `numpy.random.default_rng(seed).standard_normal(({', '.join(map(str, c['latent_shape']))}), dtype=numpy.float32)` per image |
| `images` | float32 | (batch, 3, H, W) | RGB in [0, 1] |

Inside: text encoder -> student UNet at t = {c['timestep']} ({c['prediction_type']} prediction) -> clean
latent x0 -> {'the tiny decoder (TAESD format)' if c['decoder'] == 'AutoencoderTiny' else 'VAE'} decode. No guidance at inference (the student learned the guided teacher).
{fusion_note(m)}

## How it was made

`python -m src.export` from the diffusers pipeline in `{student}` ({json.dumps(made) if made else 'student pipeline'});
decoder {c['decoder']}; ONNX opset {cfg.opset}, {cfg.exporter} exporter; fp16 by ONNX Runtime's float16 converter with float32 I/O.

Parity with the PyTorch student on {m['parity_prompts']} eval prompts and their seeds (images in [0, 1]):

| artifact | PSNR (dB) | max abs error |
|---|---|---|
| fp32 | {m['psnr_fp32']} | {m['max_abs_err_fp32']:.2e} |
| fp16 | {m['psnr_fp16']} | {m['max_abs_err_fp16']:.2e} |

## Run it

    python -m src.infer "a red circle at the top on a blue background" --seed 0 --out cat.png
    python -m src.infer --prompts-file prompts.txt --seed 0 --out images/ --precision fp16 --provider cuda
"""


def cli_args(parser) -> None:
    """Export another student (e.g. a merged one) than the DVC stage's, to another folder."""
    d = Paths()
    parser.add_argument("--student", type=Path, default=d.student, help="student pipeline folder")
    parser.add_argument("--out", type=Path, default=d.out, help="the artifact folder")
    parser.add_argument("--reports", type=Path, default=d.reports, help="where metrics.json goes")


def main(argv: list[str] | None = None) -> None:
    config, args = stage_config(__doc__, "export", argv, extra_args=cli_args, top_level=("tiny_decoder",))
    if config is None:
        return
    m = export(config.export, Paths(student=args.student, out=args.out, reports=args.reports,
                                    tiny_decoder=Path(config.tiny_decoder) if config.tiny_decoder else None))
    print(f"export: fp32 {m['psnr_fp32']:.1f} dB (max err {m['max_abs_err_fp32']:.1e}), "
          f"fp16 {m['psnr_fp16']:.1f} dB (max err {m['max_abs_err_fp16']:.1e}); {args.out} written "
          f"(version {m['version']})")


if __name__ == "__main__":
    run_cli(main)
