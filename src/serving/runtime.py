"""The artifact runtime: open an exported folder (verified against its manifest) in ONNX Runtime and draw
images with it. Needs no PyTorch: `python -m src.infer` and `python -m src.serve` run on this alone."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core import manifest
from ..core.errors import UserError
from ..core.fileio import read_json
from ..core.images import uint8_from_unit
from ..core.launch import cpu_cores
from ..method.noise import initial_noise

OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                "all": "ORT_ENABLE_ALL"}   # names of ort.GraphOptimizationLevel


PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class Artifact:
    """A loaded, verified export folder: the ONNX session, its tokenizer, its I/O contract and version."""

    session: object
    tokenizer: object                 # a `tokenizers` Tokenizer; SDXL: the first of two (tokenizer_2 below)
    contract: dict
    provider: str
    precision: str
    version: str = ""
    folder: Path | None = None
    io_binding: bool = False          # on CUDA: inputs bound once, the output allocated by ONNX Runtime on the device
    workers: int = 1                  # on CPU: a batch is split over this many concurrent calls (see load_artifact)
    tokenizer_2: object = None        # SDXL's second tokenizer; its ids are the graph's input_ids_2
    image_hw: tuple[int, int] | None = None   # (height, width) of its images, from the warm-up (serve)
    _pool: object = field(default=None, repr=False)

    def run(self, ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """images (B, 3, H, W) float32 in [0, 1] for token ids and initial noise."""
        if self.workers > 1 and len(ids) > 1:
            from concurrent.futures import ThreadPoolExecutor

            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="onnx-worker")
            futures = [self._pool.submit(self._run, ids[lo:hi], noise[lo:hi])
                       for lo, hi in contiguous_parts(len(ids), self.workers)]
            return np.concatenate([f.result() for f in futures])
        return self._run(ids, noise)

    def token_ids(self, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
        """The graph's token ids for `prompts` by the I/O contract: (N, max_length), or for SDXL (N, 2,
        max_length), both tokenizers' rows; and the cut-off text of long prompts."""
        ids, cut = contract_token_ids(self.tokenizer, self.contract, prompts)
        if self.tokenizer_2 is None:
            return ids, cut
        ids_2, _ = contract_token_ids(self.tokenizer_2, self.contract["tokenizer_2"], prompts)
        return np.stack([ids, ids_2], axis=1), cut

    def _run(self, ids: np.ndarray, noise: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "noise": noise} if ids.ndim == 2 else \
            {"input_ids": ids[:, 0], "input_ids_2": ids[:, 1], "noise": noise}
        if not self.io_binding:
            return self.session.run(["images"], feeds)[0]
        device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("images", device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def contiguous_parts(n: int, parts: int) -> list[tuple[int, int]]:
    """(lo, hi) of min(parts, n) contiguous slices of range(n), their sizes within one of each other."""
    return [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(n), min(parts, n))]


CONTRACT_KEYS = {"max_length": 2, "bos_id": 0, "eos_id": 0, "pad_id": 0}   # integer keys a reader needs: minimum


def contract_problems(raw: dict) -> list[str]:
    """What is missing or wrong in an onestep.json mapping (export writes more keys than these)."""
    bad = [f"{k}: expected an integer >= {low}" for k, low in CONTRACT_KEYS.items()
           if not (type(raw.get(k)) is int and raw[k] >= low)]
    second = raw.get("tokenizer_2")
    if second is not None and not (isinstance(second, dict) and all(
            type(second.get(k)) is int and second[k] >= low for k, low in CONTRACT_KEYS.items())):
        bad.append("tokenizer_2: expected max_length, bos_id, eos_id and pad_id as integers")
    shape = raw.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int and d > 0 for d in shape)):
        bad.append("latent_shape: expected three positive integers [C, h, w]")
    return bad


def read_contract(path: Path) -> dict:
    raw = read_json(path, "the artifact is damaged, re-export it")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object (the I/O contract), got {type(raw).__name__}")
    bad = contract_problems(raw)
    if bad:
        raise UserError(f"{path}: not a valid I/O contract ({'; '.join(bad)}); re-export the artifact")
    return raw


def read_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:          # tokenizers raises a bare Exception for every parse error
        raise UserError(f"{path}: not a Hugging Face tokenizers file ({err}); re-export the artifact") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def open_session(graph: Path, precision: str, provider: str, optimization: str, threads: int):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)          # no provider-bridge noise on machines without CUDA
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPTIMIZATION[optimization])
    opts.intra_op_num_threads = threads
    wanted = PROVIDERS["cuda"] if provider in ("auto", "cuda") else PROVIDERS["cpu"]
    wanted = [p for p in wanted if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(graph), opts, providers=wanted)
    except Exception as err:          # onnxruntime's InvalidProtobuf, Fail, ... share no public base class
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{graph}: ONNX Runtime cannot open it ({first[:300]})") from None
    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise UserError("--provider cuda: CUDA is not usable here (no GPU, or onnxruntime-gpu without CUDA "
                        "libraries); use --provider cpu or auto")
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names not in ((["input_ids", "noise"], ["images"]), (["input_ids", "input_ids_2", "noise"], ["images"])):
        raise UserError(f"{graph}: inputs {names[0]} and outputs {names[1]}; expected (input_ids, noise) -> images "
                        "or, for SDXL, (input_ids, input_ids_2, noise) -> images")
    return session


def load_artifact(folder: Path, precision: str = "fp32", provider: str = "auto", optimization: str = "all",
                  threads: int = 0, workers: int = 1) -> Artifact:
    """Open an export folder, verified against its manifest first. `optimization`: ONNX Runtime graph
    optimisation level (disable, basic, extended, all); `threads`: intra-op threads on CPU (0 = ONNX
    Runtime's default, one per core; with `workers`, the cores shared out). `workers` (CPU): a batch is split
    into this many parts that run at once on one session, each part on its own threads (the images are the
    same; on a 2-core machine two one-thread workers draw ~1.2-1.3x the images per second of one call on both
    cores: reports/bench). Every problem with the folder is one UserError naming the file."""
    if workers < 1:
        raise UserError(f"workers: expected a positive integer, got {workers}")
    folder = Path(folder)
    graph = folder / precision / "model.onnx"
    missing = [p for p in (graph, folder / "tokenizer.json", folder / "onestep.json") if not p.is_file()]
    if missing:
        raise UserError(f"no exported model at {folder} (missing {', '.join(map(str, missing))}); "
                        "run `dvc repro export` first, or pass --model")
    contract = read_contract(folder / "onestep.json")
    second = ["tokenizer_2.json"] if "tokenizer_2" in contract else []
    if second and not (folder / second[0]).is_file():
        raise UserError(f"{folder}: the contract names tokenizer_2.json (an SDXL artifact), which is missing; "
                        "re-export it")
    version = manifest.verify(folder, ["onestep.json", "tokenizer.json", *second, f"{precision}/"])["version"]
    contract = read_contract(folder / "onestep.json")              # as verified
    tokenizer = read_tokenizer(folder / "tokenizer.json")
    tokenizer_2 = read_tokenizer(folder / second[0]) if second else None
    if workers > 1 and not threads:
        threads = max(1, cpu_cores() // workers)
    session = open_session(graph, precision, provider, optimization, threads)
    declared = next(i for i in session.get_inputs() if i.name == "noise").shape[1:]
    if all(isinstance(d, int) for d in declared) and list(declared) != list(contract["latent_shape"]):
        raise UserError(f"{graph}: takes noise of shape {declared}, but {folder / 'onestep.json'} says "
                        f"{contract['latent_shape']}; the files come from different exports, re-export")
    used = session.get_providers()[0]
    on_cuda = used == "CUDAExecutionProvider"
    return Artifact(session, tokenizer, contract, used, precision, version, folder, io_binding=on_cuda,
                    workers=1 if on_cuda else workers, tokenizer_2=tokenizer_2)


def contract_token_ids(tokenizer, contract: dict, prompts: list[str]) -> tuple[np.ndarray, list[str]]:
    """(N, max_length) int64 ids: BOS, prompt, EOS, padding; returns also the cut-off text of long prompts."""
    n, eos, pad = contract["max_length"], contract["eos_id"], contract["pad_id"]
    ids = np.full((len(prompts), n), pad, np.int64)
    cut = []
    for i, enc in enumerate(tokenizer.encode_batch(prompts)):
        row = enc.ids
        if len(row) > n:
            cut.append(tokenizer.decode(row[n - 1:-1]).replace("</w>", " ").strip())  # CLIP BPE word ends
            row = row[:n - 1] + [eos]
        ids[i, :len(row)] = row
    return ids, cut


def stream_images(art: Artifact, prompts: list[str], seeds: list[int], batch_size: int = 8):
    """Yield (index, uint8 HxWx3 image) in order; batches never change an image."""
    c = art.contract
    ids, cut = art.token_ids(prompts)
    if cut:
        print(f"warning: {len(cut)} prompt(s) longer than {c['max_length']} tokens were truncated (as diffusers "
              f"does); dropped text of the first: {cut[0]!r}", file=sys.stderr)
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        noise = initial_noise(seeds[start:end], tuple(c["latent_shape"]))
        images = art.run(ids[start:end], noise)
        for j, img in enumerate(uint8_from_unit(images)):
            yield start + j, img


def png_bytes(img: np.ndarray) -> bytes:
    """One uint8 HxWx3 image as PNG (the encoding `--out` files and the server's responses share)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
