"""Resumable training checkpoints: written atomically, verified before they are trusted.

A checkpoint is a folder `step-000200/` holding tensors (safetensors / torch files), a
`state.json` and a `MANIFEST.json` with the SHA-256 of every file. It is assembled in a
temporary folder and renamed into place, so a killed writer leaves only a `.step-*.tmp`
folder, which is ignored (and removed). A checkpoint whose files do not match its manifest
is corrupt: loading it raises an error that names it; it is never loaded silently.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .fileio import atomic_dir, sha256_file

MANIFEST = "MANIFEST.json"
STATE = "state.json"
_NAME = re.compile(r"^step-(\d{6,})$")


def step_of(folder: Path) -> int:
    """The training step of a checkpoint folder `step-000200`."""
    return int(_NAME.match(folder.name).group(1))


def save(root: Path, step: int, state: dict[str, Any], write_files: Callable[[Path], None], keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` (files via `write_files(folder)`), then prune to `keep`."""
    final = root / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        write_files(tmp)
        (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=2), encoding="utf-8")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(files, indent=2), encoding="utf-8")
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first (partial temp folders are removed)."""
    if not root.is_dir():
        return []
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=step_of)


def discard_after(root: Path, step: int) -> list[Path]:
    """Remove the complete checkpoints beyond `step` (from a longer run); return what was removed."""
    later = [p for p in complete(root) if step_of(p) > step]
    for folder in later:
        shutil.rmtree(folder, ignore_errors=True)
    return later


def verify(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest; return the state. Raise UserError naming what is wrong."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {folder} is corrupt: unreadable {MANIFEST} ({err}); delete the folder "
                        "to resume from an earlier checkpoint or start afresh") from None
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise UserError(f"checkpoint {folder} is corrupt: {name} is missing or does not match its checksum; "
                            "delete the folder to resume from an earlier checkpoint or start afresh")
    return json.loads((folder / STATE).read_text(encoding="utf-8"))


def latest(root: Path, max_step: int | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint (at or before `max_step` if given), verified; None when there is none."""
    found = [p for p in complete(root) if max_step is None or step_of(p) <= max_step]
    if not found:
        return None
    return found[-1], verify(found[-1])


def student_ema(params, decay: float | None):
    """EMA of the student's trainable weights, or None. diffusers' EMAModel warms the decay up: its
    k-th update (k >= 2) uses min(decay, k / (9 + k)), so decay 0.995 binds only from the 1791st update on."""
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay) if decay else None


EMA_FILE = "ema.safetensors"


def save_ema(ema, path: Path) -> None:
    """The EMA as tensors (safetensors) plus its scalar settings as JSON metadata: no pickle."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    save_file({f"shadow.{i:06d}": t.detach().cpu().contiguous() for i, t in enumerate(shadow)}, str(path),
              metadata={"state": json.dumps(state)})


def load_ema(ema, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        state["shadow_params"] = [f.get_tensor(k) for k in sorted(f.keys())]
    ema.load_state_dict(state)
