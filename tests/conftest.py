"""Shared fixtures. Tests never touch the network: hub access is switched off here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A freshly built world tokenizer (the same code that made the committed one)."""
    from src.world.tokenizer import build_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    build_tokenizer(out)
    return out
