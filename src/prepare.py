"""The prepare stage: read prompts, normalise, deduplicate, check token lengths, write JSONL.

    python -m src.prepare              # as the DVC stage `prepare` runs it
    python -m src.prepare --dry-run    # print the resolved `prepare` section and exit

Sources (params.yaml `prepare.train` / `prepare.eval`): the world grammar, a text file
(one prompt per line), a CSV/TSV/JSONL/Parquet table with a named column, or MS-COCO
captions JSON. Files are streamed, so a prompt file of millions of lines fits in memory.
Writes `prompts/train.jsonl`, `prompts/eval.jsonl` (one JSON object per line, with a
per-prompt `seed`; world eval prompts also carry their `attributes` and `scene`) and the
counts to `reports/prompts.json`. Outputs are replaced atomically, all together.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import io
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from tqdm import tqdm

from .core.config import PrepareConfig, SourceConfig, WorldConfig, stage_config
from .core.errors import UserError, run_cli
from .core.fileio import atomic_file, write_json
from .core.prompts import derive_seed, read_prepared
from .core.text import normalize_counted
from .world.scene import caption, sample_scene

TOKENIZE_BATCH = 8192
MAX_EXAMPLES = 5  # bad lines quoted in the stats, per split


@dataclass
class Item:
    """One raw prompt as read: its position in the file (1-based line or record) and fields."""

    where: int
    text: str | None  # None: a bad line; `reason` says why
    extra: dict = field(default_factory=dict)
    reason: str = ""


@dataclass
class SplitStats:
    """Counts for one split, as written to reports/prompts.json."""

    source: str
    path: str | None
    read: int = 0
    kept: int = 0
    empty: int = 0
    duplicates: int = 0
    too_long: int = 0
    control_chars: int = 0  # control characters (NUL, ESC, C1, ...) removed by the normalisation
    with_control_chars: int = 0  # prompts they were removed from
    bad_lines: int = 0
    bad_line_examples: list[str] = field(default_factory=list)
    excluded: int = 0  # world train prompts equal to an eval prompt (skipped: splits stay disjoint)
    overlap_with_train: int = 0  # eval prompts that also occur in train (file sources; counted, kept)
    stopped_at_limit: bool = False


def _dedupe_key(text: str) -> bytes:
    return hashlib.blake2b(text.casefold().encode("utf-8"), digest_size=16).digest()


# --------------------------------------------------------------------------- readers


def _open_binary(path: Path) -> IO[bytes]:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    return path.open("rb")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def read_text(path: Path) -> Iterator[Item]:
    """One prompt per line; a line that is not valid UTF-8 is a counted bad line."""
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield Item(n, None, reason=f"not UTF-8 ({err.reason} at byte {err.start})")
                continue
            if n == 1:
                text = text.removeprefix("\ufeff")
            yield Item(n, text)


def _table_value(value: object, where: int, column: str, extra: dict | None = None) -> Item:
    if value is None:
        return Item(where, None, reason=f"no value in column {column!r}")
    if not isinstance(value, str):
        return Item(where, None, reason=f"column {column!r} holds {type(value).__name__}, not text")
    if _has_surrogates(value):
        return Item(where, None, reason="not UTF-8")
    return Item(where, value, extra or {})


def read_csv(path: Path, column: str, delimiter: str) -> Iterator[Item]:
    """CSV/TSV with a header row; rows are counted from 1 after the header."""
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(text, delimiter=delimiter)
        try:
            header = reader.fieldnames
        except csv.Error as err:
            raise UserError(f"{path}: not a readable CSV header: {err}") from None
        if not header or column not in header:
            found = ", ".join(repr(h) for h in header or []) or "none"
            raise UserError(f"{path}: column {column!r} not found (columns: {found})")
        row_no = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise UserError(f"{path}: malformed CSV near line {reader.line_num}: {err}") from None
            row_no += 1
            yield _table_value(row.get(column), row_no, column)


def read_jsonl(path: Path, column: str) -> Iterator[Item]:
    """One JSON object per line; the prompt is `record[column]`."""
    seen_column = False
    keys_seen: set[str] = set()
    with _open_binary(path) as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                yield Item(n, "")
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                yield Item(n, None, reason=f"not a JSON line ({err.__class__.__name__})")
                continue
            if not isinstance(record, dict):
                yield Item(n, None, reason="not a JSON object")
                continue
            if column in record:
                seen_column = True
            elif len(keys_seen) < 50:
                keys_seen.update(record)
            yield _table_value(record.get(column), n, column)
            if n >= 1000 and not seen_column:
                break
    if not seen_column:
        found = ", ".join(sorted(repr(k) for k in keys_seen)) or "none"
        raise UserError(f"{path}: column {column!r} not found in any record (keys seen: {found})")


def read_parquet(path: Path, column: str) -> Iterator[Item]:
    """Parquet, streamed in record batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _open_binary(path).close()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"{path}: not a valid Parquet file: {err}") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise UserError(f"{path}: column {column!r} not found (columns: {', '.join(map(repr, names))})")
    n = 0
    for batch in pf.iter_batches(columns=[column], batch_size=65536):
        for value in batch.column(0).to_pylist():
            n += 1
            yield _table_value(value, n, column)


def read_coco(path: Path) -> Iterator[Item]:
    """MS-COCO captions JSON (`annotations`: [{image_id, id, caption}, ...]), in file order."""
    with _open_binary(path) as f:
        try:
            data = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{path}: not valid COCO captions JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path}: not COCO captions JSON: expected an object with an 'annotations' list "
                        "(e.g. annotations/captions_val2014.json)")
    for n, ann in enumerate(data["annotations"], start=1):
        if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str):
            yield Item(n, None, reason="annotation without a text 'caption'")
            continue
        extra = {k: ann[k] for k in ("image_id", "id") if k in ann}
        yield Item(n, ann["caption"], extra)


def read_world(world: WorldConfig, rng: random.Random) -> Iterator[Item]:
    """Endless scene captions from the grammar; the scene rides along in `extra`."""
    n = 0
    while True:
        n += 1
        scene = sample_scene(rng, world.p_size_named)
        yield Item(n, caption(scene, rng), {"attributes": scene.attributes(), "scene": scene.to_dict()})


TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None, ".parquet": None, ".pq": None}


def read_source(cfg: SourceConfig, world: WorldConfig, rng: random.Random) -> Iterator[Item]:
    """Dispatch on `cfg.source`."""
    if cfg.source == "world":
        return read_world(world, rng)
    path = Path(cfg.path)
    if cfg.source == "text":
        return read_text(path)
    if cfg.source == "coco":
        return read_coco(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"{path}: unknown table format {suffix!r}; expected one of {', '.join(TABLE_SUFFIXES)}")
    if suffix in (".csv", ".tsv"):
        return read_csv(path, cfg.column, TABLE_SUFFIXES[suffix])
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, cfg.column)
    return read_parquet(path, cfg.column)


# --------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str):
    """A tokenizer folder, or a diffusers pipeline folder holding `tokenizer/`."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise UserError(f"prepare.tokenizer: folder {path} not found (build the world tokenizer with "
                        "`python -m src.world.tokenizer`, or point at your teacher's tokenizer folder)")
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"prepare.tokenizer: {folder} is not a loadable tokenizer folder: {err}") from None


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts with special tokens and without truncation (batched in Rust)."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=True)]


# --------------------------------------------------------------------------- the stage


def _write_split(items: Iterable[Item], cfg: SourceConfig, stats: SplitStats, out: IO[str], *,
                 split: str, seed: int, tokenizer, max_tokens: int, exclude: set[bytes],
                 seen: set[bytes], progress: tqdm) -> None:
    """Filter `items` into `out` (JSONL), filling `stats`; `seen` collects the kept keys.

    Prompts whose key is in `exclude` are skipped (and counted): this keeps world train
    prompts apart from the eval prompts.
    """
    pending: list[tuple[str, dict]] = []

    def flush() -> None:
        lengths = token_lengths(tokenizer, [t for t, _ in pending])
        for (text, extra), n_tokens in zip(pending, lengths):
            stats.too_long += n_tokens > max_tokens
            record = {"id": stats.kept, "prompt": text, "seed": derive_seed(seed, split, stats.kept), **extra}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            stats.kept += 1
        pending.clear()

    for item in items:
        if cfg.limit is not None and stats.kept + len(pending) >= cfg.limit:
            stats.stopped_at_limit = True
            break
        stats.read += 1
        if item.text is None:
            stats.bad_lines += 1
            if len(stats.bad_line_examples) < MAX_EXAMPLES:
                stats.bad_line_examples.append(f"{item.where}: {item.reason}")
            continue
        text, removed = normalize_counted(item.text)
        if removed:
            stats.control_chars += removed
            stats.with_control_chars += 1
        if not text:
            stats.empty += 1
            continue
        key = _dedupe_key(text)
        if key in exclude:
            stats.excluded += 1
            continue
        if cfg.dedupe and key in seen:
            stats.duplicates += 1
            continue
        seen.add(key)
        pending.append((text, item.extra))
        progress.update()
        if len(pending) >= TOKENIZE_BATCH:
            flush()
    if pending:
        flush()


def _check_split(stats: SplitStats, cfg: SourceConfig, name: str) -> None:
    where = cfg.path or "the world grammar"
    if stats.kept == 0:
        raise UserError(f"{where}: no prompts left for prepare.{name} after filtering "
                        f"(read {stats.read}, empty {stats.empty}, duplicates {stats.duplicates}, "
                        f"bad lines {stats.bad_lines}" + (f"; e.g. line {stats.bad_line_examples[0]}"
                                                          if stats.bad_line_examples else "") + ")")
    if cfg.source == "world" and stats.kept < cfg.limit:
        raise UserError(f"prepare.{name}.limit: the grammar could not produce {cfg.limit} distinct prompts "
                        f"(got {stats.kept}); lower the limit")


def prepare(cfg: PrepareConfig, world: WorldConfig, seed: int, out_dir: Path,
            stats_path: Path | None = None) -> dict[str, SplitStats]:
    """Run the stage: write `out_dir/{train,eval}.jsonl` (and the stats JSON); return the stats.

    World eval prompts are drawn first and excluded from train, so the splits are disjoint.
    Both outputs are written to temporary files and renamed into place only on success.
    """
    tokenizer = load_tokenizer(cfg.tokenizer)
    results: dict[str, SplitStats] = {}
    with contextlib.ExitStack() as stack:
        eval_keys: set[bytes] = set()
        train_keys: set[bytes] = set()
        # Eval first, so that world train prompts can avoid every eval prompt.
        for name, split_cfg, keys in (("eval", cfg.eval, eval_keys), ("train", cfg.train, train_keys)):
            exclude = eval_keys if name == "train" and split_cfg.source == "world" else set()
            out = stack.enter_context(atomic_file(out_dir / f"{name}.jsonl"))
            results[name] = write_split(name, split_cfg, world, seed, tokenizer, cfg.max_tokens, out, exclude, keys)
        # Overlap of eval prompts with train is only known once train is read.
        results["eval"].overlap_with_train = len(eval_keys & train_keys)
        if stats_path is not None:
            write_json(stats_path, {name: asdict(results[name]) for name in ("train", "eval")}
                       | {"max_tokens": cfg.max_tokens})
    return results


def write_split(name: str, split_cfg: SourceConfig, world: WorldConfig, seed: int, tokenizer, max_tokens: int,
                out: IO[str], exclude: set[bytes], keys: set[bytes]) -> SplitStats:
    """One split's prompts from its source (its own seeded stream) into `out`; `keys` collects the kept ones."""
    rng = random.Random(derive_seed(seed, "prepare", name))
    stats = SplitStats(source=split_cfg.source, path=split_cfg.path)
    items = read_source(split_cfg, world, rng)
    if split_cfg.source == "world":  # the grammar is endless: bound the attempts
        items = (it for i, it in enumerate(items) if i < 50 * split_cfg.limit)
    with tqdm(desc=f"prepare {name}", unit=" prompts", total=split_cfg.limit, mininterval=1.0,
              disable=None) as progress:
        _write_split(items, split_cfg, stats, out, split=name, seed=seed, tokenizer=tokenizer,
                     max_tokens=max_tokens, exclude=exclude, seen=keys, progress=progress)
    _check_split(stats, split_cfg, name)
    return stats


def wider_eval(cfg: PrepareConfig, world: WorldConfig, seed: int, limit: int, out: Path, train: Path) -> SplitStats:
    """A larger eval set: the eval stream read further, to `limit` prompts. Its first prepare.eval.limit prompts
    are the stage's eval.jsonl, record for record (same ids and seeds); later ones that are in the training file
    `train` are skipped, so it stays held out."""
    if cfg.eval.limit is not None and limit < cfg.eval.limit:
        raise UserError(f"prepare --eval-only {limit}: expected at least prepare.eval.limit ({cfg.eval.limit})")
    exclude = {_dedupe_key(r["prompt"]) for r in read_prepared(train)}
    with atomic_file(out) as f:
        return write_split("eval", cfg.eval.model_copy(update={"limit": limit}), world, seed,
                           load_tokenizer(cfg.tokenizer), cfg.max_tokens, f, exclude, set())


def main(argv: list[str] | None = None) -> None:
    def outputs(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out-dir", type=Path, default=Path("prompts"), help="where the JSONL files go")
        parser.add_argument("--stats", type=Path, default=Path("reports/prompts.json"), help="stats JSON path")
        parser.add_argument("--eval-only", type=int, metavar="N", help="write only a wider eval set of N prompts "
                            "(its first prepare.eval.limit are eval.jsonl's; none in --out-dir/train.jsonl) to --out")
        parser.add_argument("--out", type=Path, help="--eval-only: the file, e.g. prompts/eval_2000.jsonl")

    config, args = stage_config(__doc__, "prepare", argv, outputs)
    if config is None:
        return
    if args.eval_only is not None:
        if args.out is None:
            raise UserError("prepare --eval-only N: give the file with --out (e.g. prompts/eval_2000.jsonl)")
        s = wider_eval(config.prepare, config.world, config.seed, args.eval_only, args.out,
                       args.out_dir / "train.jsonl")
        print(f"eval: kept {s.kept} of {s.read} read (in train.jsonl, skipped: {s.excluded}) -> {args.out}")
        return
    results = prepare(config.prepare, config.world, config.seed, args.out_dir, args.stats)
    for name, s in results.items():
        print(f"{name}: kept {s.kept} of {s.read} read (duplicates {s.duplicates}, empty {s.empty}, "
              f"bad lines {s.bad_lines}, longer than {config.prepare.max_tokens} tokens {s.too_long}, "
              f"control characters removed {s.control_chars}) "
              f"-> {args.out_dir / (name + '.jsonl')}")


if __name__ == "__main__":
    run_cli(main)
