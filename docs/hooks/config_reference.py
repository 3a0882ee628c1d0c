"""MkDocs hook: the configuration page's key tables are generated from src/core/config.py at build time,
so the reference cannot drift from the code; a key without a description fails the build."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- configuration reference: generated from src/core/config.py -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    sys.path.insert(0, str(ROOT))
    from src.core.config import load_config
    from src.config import reference

    return markdown.replace(MARKER, reference(load_config(ROOT / "params.yaml")))
