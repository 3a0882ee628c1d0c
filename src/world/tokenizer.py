"""Build a CLIP BPE tokenizer for the world's grammar (same file format as SD's tokenizer).

The vocabulary is CLIP's byte-level base (256 byte symbols, each also with the end-of-word
marker `</w>`) plus BPE merges learned on the grammar's words until every word is one
token, plus the two special tokens. Any text still tokenises (unknown words fall back to
byte symbols); grammar words cost one token each. The result loads with
`CLIPTokenizer.from_pretrained` and `CLIPTokenizerFast.from_pretrained`.

    python -m src.world.tokenizer --out models/teacher/tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from ..core.errors import UserError, run_cli
from ..core.fileio import atomic_dir
from .scene import vocabulary

EOW = "</w>"
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 77


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (in rank order) that turn every word of `words` into a single symbol.

    Classic BPE training (most frequent adjacent pair first) with ties broken by the pair's
    text, so the result is reproducible byte for byte; `tokenizers`' BpeTrainer breaks ties
    in hash order and gives a different file from run to run.
    """
    seqs = [list(w[:-1]) + [w[-1] + EOW] for w in sorted(set(words)) if w]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == best:
                    seq[i:i + 2] = [seq[i] + seq[i + 1]]
                i += 1


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (sorted: stable ids)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + </w>, one entry per merge, then specials."""
    base = byte_alphabet()
    tokens = base + [b + EOW for b in base] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {t: i for i, t in enumerate(tokens)}


def build_tokenizer(out_dir: Path, words: list[str] | None = None) -> CLIPTokenizer:
    """Learn merges for `words` (default: the grammar's vocabulary) and save to `out_dir`."""
    merges = learn_merges(words or vocabulary())
    with atomic_dir(out_dir) as tmp:
        save_tokenizer(tmp, clip_vocab(merges), merges)
    return CLIPTokenizer.from_pretrained(out_dir)


def save_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], **special: str) -> None:
    """A CLIPTokenizer folder: tokenizer.json + config, and the slow-tokenizer files (vocab.json,
    merges.txt) that SD folders carry and older transformers releases read. `special`: e.g. pad_token."""
    CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LENGTH, **special).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/teacher/tokenizer"),
                        help="folder to write (replaced atomically)")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out}: exists and is not a folder")
    tok = build_tokenizer(args.out)
    print(f"wrote {args.out} ({len(tok)} tokens)")


if __name__ == "__main__":
    run_cli(main)
