"""The artifact manifest: SHA-256 and size of every file of an export folder, and its version.

`python -m src.export` writes `manifest.json` last, inside the folder it swaps in whole:

    {"format": 1, "version": "3f9c0a1b2c4d5e6f", "digest": "<sha256 of the file list>",
     "files": {"fp32/model.onnx": {"bytes": 18612345, "sha256": "..."}, ...}}

The version (first 16 hex digits of the digest) names the model everywhere it is served:
the `X-Model-Version` header, `/metrics`, the web page. `verify` checks the files a reader is
about to open; a missing, truncated or altered file is one `UserError` naming it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import UserError
from .fileio import read_json, sha256_file, write_json

NAME = "manifest.json"
FORMAT = 1


def digest_of(files: dict[str, dict]) -> str:
    """The artifact's identity: a hash of its sorted (path, size, sha256) list."""
    text = "\n".join(f"{p} {files[p]['bytes']} {files[p]['sha256']}" for p in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def build(folder: Path) -> dict:
    """The manifest of every file under `folder` (but itself)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != NAME:
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    digest = digest_of(files)
    return {"format": FORMAT, "version": digest[:16], "digest": digest, "files": files}


def write(folder: Path) -> dict:
    """Write `folder/manifest.json` (call it last: it describes the files as they are now)."""
    manifest = build(folder)
    write_json(folder / NAME, manifest)
    return manifest


def read(folder: Path) -> dict:
    """The manifest of `folder`, its shape checked; a clear error when it is missing or damaged."""
    path = folder / NAME
    if not path.is_file():
        raise UserError(f"{path}: missing; this folder is not a complete export (exports write it last), "
                        "re-run `dvc repro export`")
    manifest = read_json(path, "the artifact is damaged, re-export it")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = isinstance(files, dict) and files and all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values())
    if not ok:
        raise UserError(f"{path}: expected {{\"files\": {{path: {{\"bytes\": int, \"sha256\": str}}}}}}; "
                        "the artifact is damaged, re-export it")
    if manifest.get("digest") != digest_of(files):
        raise UserError(f"{path}: its digest does not match its file list (edited by hand?); re-export it")
    return manifest


def verify(folder: Path, needed: list[str] | None = None) -> dict:
    """Check that each of `needed` (paths relative to `folder`; one ending in "/" stands for every listed
    file below it; None: every listed file) is listed and has its recorded size and SHA-256. Returns the
    manifest."""
    manifest = read(folder)
    files = manifest["files"]
    wanted = []
    for item in sorted(files) if needed is None else needed:
        below = sorted(p for p in files if p.startswith(item)) if item.endswith("/") else [item]
        if not below:
            raise UserError(f"{folder / item}: no file below it is listed in {folder / NAME}; the artifact is "
                            "incomplete, re-export it")
        wanted += below
    for rel in wanted:
        path = folder / rel
        entry = files.get(rel)
        if entry is None:
            raise UserError(f"{path}: not listed in {folder / NAME}; the artifact is incomplete, re-export it")
        if not path.is_file():
            raise UserError(f"{path}: missing (the manifest lists it); the artifact is incomplete, re-export it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced); "
                            "re-export or re-promote the artifact")
        if sha256_file(path) != entry["sha256"]:
            raise UserError(f"{path}: SHA-256 differs from the manifest (the file was altered or damaged); "
                            "re-export or re-promote the artifact")
    return manifest
