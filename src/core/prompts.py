"""Reading a prepared prompt file (prompts/*.jsonl, written by the prepare stage) and the per-prompt seeds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError


def derive_seed(seed: int, *keys: object) -> int:
    """A stable 31-bit seed for (seed, keys...): independent of batch sizes and Python's hash salt."""
    text = ":".join(str(k) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & 0x7FFFFFFF


def read_prepared(path: str | Path, limit: int | None = None) -> list[dict]:
    """Records of a prepared prompts file (this stage's output), the first `limit` if given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found (run `dvc repro prepare` first)")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        raise UserError(f"{path}: no prompts")
    return records[:limit] if limit else records
