"""Prompt text: normalisation (one definition for prepare, infer and serve) and padded token ids.

NFKC Unicode; control characters (C0, DEL, C1) that are not whitespace removed (a NUL byte
or an escape sequence is never part of a prompt); every run of whitespace (tabs, newlines,
NBSP, the separator controls) to one space; trimmed.
"""

from __future__ import annotations

import unicodedata


def is_control(ch: str) -> bool:
    """C0 (U+0000-U+001F), DEL (U+007F) and C1 (U+0080-U+009F): Unicode category Cc."""
    return unicodedata.category(ch) == "Cc"


def normalize_counted(text: str) -> tuple[str, int]:
    """(normalised text, number of non-whitespace control characters removed)."""
    text = unicodedata.normalize("NFKC", text)
    removed = sum(1 for ch in text if is_control(ch) and not ch.isspace())
    if removed:
        text = "".join(ch for ch in text if ch.isspace() or not is_control(ch))
    return " ".join(text.split()), removed


def normalize(text: str) -> str:
    return normalize_counted(text)[0]


def padded_token_ids(tokenizer, texts: list[str], tensors: str = "pt"):
    """Token ids (N, model_max_length) padded and truncated as StableDiffusionPipeline does:
    a torch LongTensor (`tensors="pt"`) or an int64 numpy array (`"np"`)."""
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors=tensors).input_ids
    return ids.astype("int64") if tensors == "np" else ids
