"""Typed, validated configuration loaded from params.yaml (one section per stage).

Every stage reads its settings through `load_config`, so a misspelt key, a wrong type or an
out-of-range value is reported once, here, with the key's dotted name and what is allowed.
`python -m src.config` prints the resolved configuration (src/config.py).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ruamel.yaml import YAML, YAMLError

from .errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


def parse_yaml(text: str) -> Any:
    """YAML 1.2, as DVC reads and writes params.yaml (ruamel.yaml, safe). PyYAML's YAML 1.1 would
    read the `no` that `dvc exp run -S` writes for `mixed_precision: "no"` as False."""
    return YAML(typ="safe").load(text)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class WorldConfig(Section):
    """The embedded scene world (docs/design.md, "The embedded world")."""

    resolution: int = Field(32, ge=16, le=512, multiple_of=8, description="rendered image side in pixels")
    p_size_named: float = Field(0.5, ge=0.0, le=1.0, description="probability that a caption names the size")


SourceKind = Literal["world", "text", "table", "coco"]


class SourceConfig(Section):
    """Where one split's prompts come from.

    - world: sampled from the scene grammar (`limit` prompts, required);
    - text: a UTF-8 file, one prompt per line;
    - table: CSV / TSV / JSONL / Parquet with the prompts in `column`;
    - coco: MS-COCO captions JSON (annotations format), captions in file order.
    """

    source: SourceKind = Field("world", description="world, text, table or coco (what each reads: above)")
    path: str | None = Field(None, description="input file (text, table, coco)")
    column: str | None = Field(None, description="column holding the prompt (table)")
    limit: int | None = Field(None, ge=1, description="world: how many to generate; files: keep the first N")
    dedupe: bool = Field(True, description="drop repeated prompts (case-insensitive, after normalisation)")

    @model_validator(mode="after")
    def _check_source_fields(self) -> "SourceConfig":
        if self.source == "world":
            if self.path is not None or self.column is not None:
                raise ValueError("'path' and 'column' are not used by source 'world'; remove them")
            if self.limit is None:
                raise ValueError("source 'world' needs 'limit' (how many prompts to generate)")
        else:
            if not self.path:
                raise ValueError(f"source {self.source!r} needs 'path' (the input file)")
            if self.source == "table" and not self.column:
                raise ValueError("source 'table' needs 'column' (the column holding the prompts)")
            if self.source != "table" and self.column is not None:
                raise ValueError(f"'column' is only used by source 'table', not {self.source!r}")
        return self


class PrepareConfig(Section):
    """The prepare stage: read, normalise, deduplicate and check prompts."""

    train: SourceConfig = SourceConfig(source="world", limit=20000)
    eval: SourceConfig = SourceConfig(source="world", limit=500)
    tokenizer: str = Field("models/teacher/tokenizer",
                           description="tokenizer folder (or a diffusers pipeline folder with tokenizer/)")
    max_tokens: int = Field(77, ge=2, le=4096, description="text encoder limit, special tokens included")


class DistillConfig(Section):
    """The distill stage: SwiftBrush VSD (docs/design.md, "The method"). Paper values in the descriptions."""

    teacher: str = Field("models/teacher", description="diffusers SD pipeline folder, a cached hub id, or one "
                                                       ".safetensors checkpoint in the original layout (with "
                                                       "teacher_config)")
    teacher_config: str | None = Field(
        None, description="the architecture of a single-file teacher: sd15, sd21-base, sd21, sdxl (the published "
                          "configs, offline), or a diffusers pipeline folder whose configs fit the file")
    resolution: int | None = Field(
        None, ge=16, le=2048, multiple_of=8, description="image side the student is trained and saved at; "
                                                          "null = the teacher's native size (SD 2.1-base: 512)")
    student: Literal["full", "lora"] = Field(
        "full", description="full: a trainable copy of the teacher UNet (paper); lora: a LoRA adapter on the "
                            "teacher's own UNet (SwiftBrush v2's efficient scheme: no second UNet, no full Adam state)")
    student_lora_rank: int = Field(256, ge=1, le=4096, description="LoRA-student rank (v2: 256)")
    student_lora_alpha: float = Field(512.0, gt=0.0, description="LoRA-student alpha (v2: 512)")
    student_lora_targets: list[str] = Field(["to_q", "to_k", "to_v", "to_out.0"], min_length=1,
                                            description="modules the LoRA student adapts")
    adam_impl: Literal["auto", "for_loop", "foreach", "fused"] = Field(
        "auto", description="Adam's implementation: auto = torch's choice (foreach on GPU, which holds temporary "
                            "copies of the gradients), for_loop, foreach, or fused (one kernel, no temporaries)")
    frozen_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the frozen text encoder and VAE (bfloat16 halves their memory)")
    steps: int = Field(1000, ge=1, description="optimisation steps (paper: ~244k at batch 16 x 8 GPUs)")
    batch_size: int = Field(16, ge=1, le=4096, description="prompts per step per process (paper: 16)")
    processes: int = Field(1, ge=1, le=1024, description="processes that train together (DDP; paper: 8 GPUs); the "
                           "global batch is processes x batch_size. `python -m src.distill` starts them: one per GPU, "
                           "or on a CPU-only machine sharing its cores (gloo on loopback)")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="none: every process holds the whole student (DDP); fsdp: the student and the LoRA "
                            "teacher's UNet are fully sharded over the processes (PyTorch FSDP2), each holding 1/N of "
                            "their weights, gradients and Adam state: a full SDXL student (41 GB with Adam) over GPUs")
    fsdp_min_params: int = Field(100_000_000, ge=1, description="fsdp: size-based wrap, a submodule with at least "
                                                                 "this many weights is its own shard unit")
    lora_lr: float = Field(1e-3, gt=0.0, le=1.0, description="LoRA-teacher Adam lr (paper: 1e-3)")
    lora_rank: int = Field(64, ge=1, le=1024, description="LoRA rank (paper: 64)")
    lora_alpha: float = Field(108.0, gt=0.0, description="LoRA alpha (paper: 108)")
    lora_targets: list[str] = Field(["to_q", "to_v"], min_length=1, description="attention projections (paper)")
    guidance_scale: float = Field(4.5, ge=1.0, le=50.0, description="CFG on teacher and LoRA teacher (paper: 4.5)")
    lora_guidance_scale: float | None = Field(
        None, ge=1.0, le=50.0, description="CFG on the LoRA teacher; null = guidance_scale (paper)")
    student_timestep: int | None = Field(
        None, ge=1, le=999, description="timestep the student is told its pure-noise input is at; null = T-1 "
                                        "(paper: 999). x0 is read with abar at this t (DMD2's SDXL one-step: 399)")
    loss: Literal["vsd", "sid"] = Field(
        "vsd", description="the student's distillation loss: vsd (SwiftBrush's variational score distillation) or "
                           "sid (score identity distillation, SiD-LSG: gradient through both scores; its LoRA-teacher "
                           "update is SiD's: uniform epsilon MSE over t in [t_min, t_max]). docs/method.md")
    sid_alpha: float = Field(1.2, ge=0.0, le=10.0, description="SiD's alpha (paper: 1.2; its SD scripts: 1)")
    lora_train_guidance_scale: float = Field(
        1.0, ge=1.0, le=50.0, description="CFG on the LoRA teacher inside its own denoising loss (SiD-LSG's "
                                          "kappa_1; 1 = its conditional branch alone, SwiftBrush)")
    student_steps: int = Field(
        1, ge=1, le=8, description="the student's steps: 1 (SwiftBrush) or N, at t_s and evenly below (N = 4, t_s = "
                                   "999: DMD2's [999, 749, 499, 249]), trained by backward simulation: each batch "
                                   "trains one step on the input the student's own earlier steps make")
    t_min: int = Field(20, ge=0, le=999, description="distillation-loss timestep range, low end (paper: 20)")
    t_max: int = Field(980, ge=0, le=999, description="distillation-loss timestep range, high end (paper: 980)")
    t_max_end: int | None = Field(
        None, ge=0, le=999, description="anneal the range's high end linearly from t_max to this over the run "
                                        "(lower noise levels late, as score distillation for 3D does); null = fixed")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="student lr over the run: constant (paper) or cosine down to lr / 10")
    lora_weighting: Literal["abar", "uniform"] = Field(
        "abar", description="LoRA-teacher epsilon-MSE weight per timestep: abar_t (official code) or uniform")
    clip_model: str | None = Field(
        None, description="SwiftBrush v2 clamped CLIP loss: a transformers CLIP folder (not the evaluator); null = off")
    clip_weight: float = Field(0.1, ge=0.0, description="CLIP-loss weight at step 0 (v2: 0.1)")
    clip_tau: float = Field(0.35, ge=-1.0, le=1.0, description="CLIP-loss clamp: no push above this cosine (v2: 0.35)")
    clip_schedule: Literal["constant", "linear_decay"] = Field(
        "linear_decay", description="CLIP-loss weight over the run (v2: decayed to 0)")
    clip_decoder: Literal["vae", "tiny"] = Field(
        "vae", description="what decodes x0 for the CLIP loss: vae (the teacher's) or tiny (the top-level "
                           "tiny_decoder, TAESD format: SwiftBrush v2 decodes through TAESD here)")
    lora_updates: int = Field(1, ge=1, le=100, description="LoRA-teacher updates per student update (paper: 1)")
    p_uncond: float = Field(0.1, ge=0.0, le=1.0, description="LoRA-teacher prompt dropout (paper: 0.1)")
    reduction: Literal["mean", "sum_over_batch"] = Field("mean", description="VSD loss reduction (official: mean)")
    grad_clip: float = Field(1.0, gt=0.0, description="max grad norm for both updates (paper: 1.0)")
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0,
                                    description="student EMA decay; null = off (optional). diffusers EMAModel: "
                                                "the k-th update uses min(ema_decay, k / (9 + k))")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="accelerate mixed precision (GPU)")
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (SD 2.1 at 512 px)")
    compile: Literal["off", "auto", "default", "max-autotune"] = Field(
        "off", description="torch.compile the student and teacher UNets: auto = max-autotune on a GPU, default on "
                           "CPU (inductor; needs a C++ compiler, else the step runs eagerly with a warning). "
                           "Measured: reports/bench/step_profile.md")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept")
    log_every: int = Field(10, ge=1, description="steps between DVCLive metric rows")
    val_every: int = Field(100, ge=1, description="steps between one-step validations")
    val_prompts: int = Field(64, ge=1, description="eval prompts used by the validation")
    max_nonfinite: int = Field(5, ge=1, description="consecutive non-finite steps before the run stops")

    @model_validator(mode="after")
    def _check_range(self) -> "DistillConfig":
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if self.t_max_end is not None and not self.t_min <= self.t_max_end <= self.t_max:
            raise ValueError(f"t_max_end ({self.t_max_end}) must lie in [t_min, t_max] = [{self.t_min}, {self.t_max}]")
        if self.loss == "sid" and (self.sharding == "fsdp" or self.gradient_checkpointing):
            raise ValueError("loss: sid takes its gradient through the teacher's and the LoRA teacher's passes, which "
                             "sharding: fsdp and gradient_checkpointing (blocks recomputed under the student's adapter "
                             "state) do not support; use sharding: none and gradient_checkpointing: false")
        if self.teacher.endswith(".safetensors") and self.teacher_config is None:
            raise ValueError(f"teacher {self.teacher!r} is one checkpoint file: set teacher_config to its architecture "
                             "(sd15, sd21-base, sd21, sdxl, or a diffusers folder with matching configs)")
        if self.sharding == "fsdp" and (self.processes < 2 or self.student != "full"):
            raise ValueError(f"sharding: fsdp shards a full student over processes: it needs student: full (is "
                             f"{self.student}) and processes >= 2 (is {self.processes})")
        return self


class CocoEvalConfig(Section):
    """COCO-30K inputs (docs/design.md, "Evaluation protocol"): local paths, never downloaded."""

    images: str | None = Field(None, description="MS-COCO val2014 image folder (the FID reference: every image)")
    inception: str | None = Field(None, description="clean-fid's inception-2015-12-05.pt weights file")
    clip: str | None = Field(None, description="transformers CLIPModel folder, or open_clip:<arch>:<weights file> "
                                               "(SwiftBrush v2: open_clip:ViT-g-14:<laion2b_s12b_b42k weights>)")
    fid_resamples: int = Field(0, ge=0, le=1000, description="bootstrap resamples for the FID intervals (each a "
                               "covariance of 30,000 x 2048 features and a 2048-d matrix root, ~10-30 s on a CPU); "
                               "0 = FID without an interval (CLIP score keeps its own)")


class EvaluateConfig(Section):
    """The evaluate stage (docs/design.md, "Evaluation protocol")."""

    mode: Literal["world", "coco"] = Field("world", description="world (embedded evaluator + judge) or coco (COCO-30K)")
    coco: CocoEvalConfig = CocoEvalConfig()
    evaluator: str = Field("models/evaluator", description="CLIPModel folder for FID features and CLIP score")
    limit: int | None = Field(None, ge=2, description="first N eval prompts (null: all)")
    teacher_steps: int = Field(25, ge=1, le=1000, description="teacher sampling steps (paper table: 25)")
    guidance_scale: float = Field(4.5, ge=1.0, le=50.0, description="teacher CFG (paper: 4.5)")
    batch_size: int = Field(64, ge=1, le=4096, description="images per generation batch")
    grid_rows: int = Field(12, ge=1, le=200, description="prompts shown in the sample grid")
    bootstrap: int = Field(1000, ge=0, le=100000, description="bootstrap resamples over prompts for every metric's "
                           "interval (COCO FID: evaluate.coco.fid_resamples); 0 = none")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the intervals")

    @model_validator(mode="after")
    def _check_coco(self) -> "EvaluateConfig":
        if self.mode == "coco":
            unset = [f"coco.{k}" for k in ("images", "inception", "clip") if not getattr(self.coco, k)]
            if unset:
                raise ValueError(f"mode 'coco' needs {', '.join(unset)} (local paths; see the evaluate section of recipes/sd21-base.yaml)")
        return self


class ExportConfig(Section):
    """The export stage (docs/design.md, "Export contract"): ONNX fp32 + fp16 and their parity with PyTorch."""

    opset: int = Field(18, ge=14, le=23, description="ONNX opset (the dynamo exporter needs >= 18)")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "dynamo", description="torch -> ONNX: dynamo (torch.export) or torchscript (the legacy tracer, deprecated "
                              "by PyTorch: it warns on every export); reports/bench/onnx_exporter*.md")
    decoder: Literal["vae", "tiny"] = Field(
        "vae", description="the artifact's decoder: vae (the teacher's) or tiny (the top-level tiny_decoder)")
    fuse: Literal["none", "ort", "cuda"] = Field(
        "none", description="ort: both graphs get ONNX Runtime's contrib attention operators (MultiHeadAttention, "
                            "Attention, Gelu: CPU and CUDA kernels); cuda: the fp16 graph gets ONNX Runtime's Stable "
                            "Diffusion fusions (GroupNorm, NhwcConv, SkipLayerNorm, ...: CUDA-only kernels), "
                            "parity-checked on a GPU; none: the plain graph, for any ONNX runtime")
    parity_prompts: int = Field(16, ge=1, le=4096, description="eval prompts used for the parity check")
    min_psnr_fp32: float = Field(40.0, ge=0.0, description="export fails below this PSNR (dB) vs PyTorch")
    min_psnr_fp16: float = Field(30.0, ge=0.0, description="export fails below this PSNR (dB) vs PyTorch")

    @model_validator(mode="after")
    def _dynamo_opset(self) -> "ExportConfig":
        if self.exporter == "dynamo" and self.opset < 18:
            raise ValueError(f"exporter 'dynamo' writes opset 18 or later; set export.opset: 18 (got {self.opset})")
        return self


class ServeConfig(Section):
    """The HTTP service, `python -m src.serve` (docs/design.md, "Serving"); not a DVC stage."""

    batching: bool = Field(True, description="gather concurrent requests into one ONNX Runtime call")
    max_batch: int = Field(16, ge=1, le=1024, description="most images in one ONNX Runtime call")
    max_delay_ms: float = Field(5.0, ge=0.0, le=1000.0,
                                description="longest a request waits for others to join its batch")
    max_queue: int = Field(256, ge=1, le=100_000,
                           description="images waiting at most; beyond it requests get 429 + Retry-After")
    request_timeout_s: float = Field(30.0, gt=0.0, le=3600.0,
                                     description="a request not answered by then gets 503 (its work is dropped)")
    max_n: int = Field(4, ge=1, le=1024, description="most images one request may ask for")
    max_prompt_chars: int = Field(2000, ge=1, le=1_000_000,
                                  description="longer prompts are refused (422); token truncation only warns")
    max_body_bytes: int = Field(16384, ge=256, le=16 * 2**20, description="larger request bodies get 413")
    model_name: str = Field("swiftbrush-onestep", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$",
                            description="the served model's name in GET /v1/models and /sdapi/v1/sd-models")
    api_keys_file: str | None = Field(None, description="a file of API keys, one per line (or `sha256:<hex>` of "
                                                        "one); when set, or when SWIFTBRUSH_API_KEYS is, every "
                                                        "generation route needs `Authorization: Bearer KEY`")
    url_images: int = Field(64, ge=0, le=100_000, description="OpenAI response_format 'url': most images held "
                                                              "in memory for download (0: 'url' is not offered)")
    url_ttl_s: float = Field(600.0, gt=0.0, le=86_400.0, description="how long a 'url' image can be downloaded")
    watch_interval_s: float = Field(1.0, gt=0.0, le=3600.0,
                                    description="with --production: how often the promoted model is checked")
    threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime intra-op threads (0 = one per core)")
    workers: int = Field(1, ge=1, le=64, description="CPU: each batch is split over this many concurrent ONNX "
                         "Runtime calls, the cores shared out among them (same images; 2 on 2 cores: ~1.2x images/s)")

    @model_validator(mode="after")
    def _n_fits_a_batch(self) -> "ServeConfig":
        if self.max_n > self.max_batch:
            raise ValueError(f"max_n ({self.max_n}) must not exceed max_batch ({self.max_batch}): "
                             "a request's images run in one call")
        return self


class Config(Section):
    """The whole params.yaml."""

    seed: int = Field(0, ge=0, le=2**31 - 1, description="root seed of every stage")
    lr: float = Field(1e-6, gt=0.0, le=1.0, description="student learning rate (distill; paper: 1e-6)")
    tiny_decoder: str | None = Field(
        None, description="a TAESD-format AutoencoderTiny folder for the teacher's latents (SD 1.x/2.x: "
                          "madebyollin/taesd; the world's: models/tiny_decoder). Used where distill.clip_decoder "
                          "or export.decoder say tiny; evaluate adds a student row decoded by it. null = none")
    world: WorldConfig = WorldConfig()
    prepare: PrepareConfig = PrepareConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _tiny_decoder_given(self) -> "Config":
        users = [k for k, v in (("distill.clip_decoder", self.distill.clip_decoder),
                                ("export.decoder", self.export.decoder)) if v == "tiny"]
        if users and not self.tiny_decoder:
            raise ValueError(f"{' and '.join(users)}: tiny needs the top-level tiny_decoder (a TAESD-format "
                             "AutoencoderTiny folder; the world's: models/tiny_decoder)")
        return self

    @model_validator(mode="after")
    def _guide_is_not_the_evaluator(self) -> "Config":
        clip = self.distill.clip_model
        judges = {self.evaluate.evaluator, self.evaluate.coco.clip}
        if clip is not None and any(j and Path(j).resolve() == Path(clip).resolve() for j in judges):
            raise ValueError(f"distill.clip_model ({clip}) is the CLIP that evaluate scores with: training on the "
                             "evaluator would grade its own signal; use another CLIP (world: models/guide)")
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (the location of an unknown key) in the schema."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(Config, loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"unknown key; allowed: {', '.join(allowed)}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
        else:
            msg = e["msg"]
            if e["type"] not in ("missing", "value_error") and "input" in e:
                msg += f" (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    return f"{source}: invalid configuration\n" + "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a', 'b'], parsed YAML value); the syntax of `dvc exp run -S`."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. lr=1e-6")
    key, value = text.split("=", 1)
    try:
        return key.strip().split("."), parse_yaml(value)
    except YAMLError as err:
        raise UserError(f"--set {text!r}: the value is not valid YAML ({err})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with each `key.path=value` override set."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return out


def config_from_dict(raw: Any, source: str = "params.yaml") -> Config:
    """Validate a parsed params mapping; raise UserError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_errors(err, source)) from None


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} not found (run from the repository root or pass --params)")
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except (YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    return config_from_dict(apply_overrides(raw or {}, overrides or []), str(path))


def dump(section: BaseModel) -> str:
    """YAML text of a (validated) section, as a stage would use it."""
    return yaml.safe_dump(section.model_dump(mode="json"), sort_keys=False)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags every stage CLI shares."""
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set prepare.train.limit=100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved configuration and exit")


def stage_config(doc: str, section: str, argv: list[str] | None = None, extra_args=None,
                 top_level: tuple[str, ...] = ()) -> tuple[Config | None, argparse.Namespace]:
    """The CLI every stage shares: --params, --set, --dry-run (+ `extra_args(parser)`).

    Returns (config, args), or (None, args) after a dry run printed the stage's section
    (preceded by the `top_level` keys it also reads).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    if extra_args is not None:
        extra_args(parser)
    args = parser.parse_args(argv)
    config = load_config(args.params, args.overrides)
    if args.dry_run:
        print("".join(f"{k}: {getattr(config, k)}\n" for k in top_level) + dump(getattr(config, section)), end="")
        return None, args
    return config, args
