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
    they are streamed into one `<name>.data` a tensor at a time (never the whole model in memory),
    each large weight at an offset ONNX Runtime can memory-map (WeightFile)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(raw), load_external_data=False)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    if not external:
        save_graph(strip_debug_info(onnx.load(str(raw))), path)
        return
    strip_debug_info(model)
    with WeightFile(path) as out:
        for t in external:
            out.add(t, read_external(t, raw.parent))
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def read_external(tensor, folder: Path) -> bytes:
    """The bytes of one externally stored weight (its location is relative to the graph's folder)."""
    info = {e.key: e.value for e in tensor.external_data}
    with (folder / info["location"]).open("rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


class WeightFile:
    """`<graph>.data`, written a weight at a time. Weights of 1 MiB or more start on a 64 KiB boundary:
    ONNX Runtime then memory-maps them from the file instead of copying them into its heap (the boundary
    its loader needs on every platform; ONNX's external-data format recommends page-aligned offsets)."""

    ALIGN, ALIGN_FROM = 64 * 1024, 1024 * 1024

    def __init__(self, graph: Path):
        self.name = graph.name + ".data"
        self.path = graph.parent / self.name

    def __enter__(self) -> "WeightFile":
        self.f = self.path.open("wb")
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def add(self, tensor, data: bytes) -> None:
        """Append `data` and point `tensor`'s external-data record at it."""
        offset = self.f.tell()
        if len(data) >= self.ALIGN_FROM and offset % self.ALIGN:
            offset += self.ALIGN - offset % self.ALIGN
            self.f.write(b"\0" * (offset - self.f.tell()))
        self.f.write(data)
        del tensor.external_data[:]
        for key, value in (("location", self.name), ("offset", offset), ("length", len(data))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)


def export_fp16(fp32: Path, path: Path, keep_vae_fp32: bool = False) -> None:
    """ORT's float16 conversion with float32 I/O; the timestep embedding and the glue stay float32, and the VAE
    decoder too with `keep_vae_fp32` (a VAE that overflows in float16: SDXL's `force_upcast`).

    The converter works on the graph without its external weights: it only retypes them. They are then
    converted and written one at a time (stream_weights), so an SDXL-size graph (13.7 GB of float32
    weights) converts in the memory of its largest weight instead of twice the model's."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    types = value_types(fp32)
    graph = onnx.load(str(fp32), load_external_data=False)
    float32_weights = {t.name for t in graph.graph.initializer
                       if uses_external_data(t) and t.data_type == onnx.TensorProto.FLOAT}
    known = {x.name for x in graph.graph.value_info}
    graph.graph.value_info.extend(v for v in types if v.name not in known)
    keep = [n.name for n in graph.graph.node if fp32_node(n.name) or (keep_vae_fp32 and n.name.startswith(DECODER))]
    # The converter itself, with the types given: OnnxModel's wrapper would run ONNX shape inference,
    # which serialises the whole model and fails past 2 GB. Then the wrapper's own cast clean-ups
    # (its shape inference reads the few external weights it folds relative to the working directory).
    with shapes_from_dims():
        model = OnnxModel(convert_float_to_float16(graph, keep_io_types=True, node_block_list=keep,
                                                   disable_shape_infer=True))
    del graph
    with contextlib.chdir(fp32.parent):
        model.remove_cascaded_cast_nodes()
        model.remove_useless_cast_nodes()
    drop_duplicate_casts(model.model.graph)
    model.topological_sort()      # the converter appends its input casts after their consumers
    del model.model.graph.value_info[:]    # the float32 types given to the converter; stale where it converted
    if not float32_weights:
        save_graph(model.model, path)
        return
    stream_weights(model.model, fp32.parent, path, float32_weights)
    onnx.save_model(model.model, str(path))
    onnx.checker.check_model(str(path))


@contextlib.contextmanager
def shapes_from_dims():
    """Inside, ORT's float16 converter takes a retyped weight's shape from its dims: it loads the whole weight
    (numpy_helper.to_array) only to read the shape, which fails for a weight left on disk."""
    from onnx import helper
    from onnxruntime.transformers import float16

    original = float16.make_value_info_from_tensor
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def stream_weights(model, source: Path, path: Path, float32_weights: set[str]) -> None:
    """Write the external weights of `model` (read from the graph folder `source`) to `path`'s weight file,
    one at a time: those the converter retyped to float16 are converted as it converts the weights it holds
    (values clipped to float16's range), the others copied."""
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.transformers.float16 import convert_np_to_float16

    with WeightFile(path) as out:
        for t in model.graph.initializer:
            if not uses_external_data(t):
                continue
            data = read_external(t, source)
            if t.name in float32_weights and t.data_type == onnx.TensorProto.FLOAT16:
                data = convert_np_to_float16(np.frombuffer(data, dtype=np.float32)).tobytes()
            out.add(t, data)


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
