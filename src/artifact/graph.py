"""ONNX graph surgery for the exported generator: consolidating the exporter's output, the fp16 conversion
(with the float32 list: the x0 glue and the timestep embedding), ONNX Runtime's fusions, saving past
protobuf's 2 GB limit, and opening a graph for a parity check."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import numpy as np
import torch

TWO_GB = 2 * 1024**3


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
        save_graph(strip_debug_info(onnx.load(str(raw))), path)
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


def export_fp16(fp32: Path, path: Path, keep_vae_fp32: bool = False) -> None:
    """ORT's float16 conversion with float32 I/O; the timestep embedding and the glue stay float32, and the VAE
    decoder too with `keep_vae_fp32` (a VAE that overflows in float16: SDXL's `force_upcast`)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    types = value_types(fp32)
    full = onnx.load(str(fp32))
    known = {x.name for x in full.graph.value_info}
    full.graph.value_info.extend(v for v in types if v.name not in known)
    keep = [n.name for n in full.graph.node if fp32_node(n.name) or (keep_vae_fp32 and n.name.startswith(DECODER))]
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
    save_graph(model.model, path)


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
NETWORKS = ("/unet/", "/text_encoder/", "/text_encoder_2/", "/vae/", "/decoder/", "/post_quant_conv/")
DECODER = ("/vae/", "/decoder/", "/post_quant_conv/")


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


def save_graph(model, path: Path) -> None:
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
