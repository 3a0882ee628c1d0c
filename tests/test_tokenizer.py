"""The world tokenizer: CLIP format, grammar words are single tokens, any text still encodes."""

from __future__ import annotations

import random

from transformers import CLIPTokenizer

from src.world.scene import caption, sample_scene, vocabulary


def test_loads_as_clip_tokenizer_and_every_grammar_word_is_one_token(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert tok.model_max_length == 77
    multi = [w for w in vocabulary() if len(tok.tokenize(w)) != 1]
    assert not multi
    rng = random.Random(0)
    text = caption(sample_scene(rng), rng)
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True).replace(" - ", "-").replace(" ,", ",").replace(" ;", ";") \
        == text.lower()


def test_unknown_words_fall_back_to_bytes(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pieces = tok.tokenize("zebra ünïcode 42")
    assert tok.unk_token not in pieces and len(pieces) > 3


def test_committed_tokenizer_is_what_the_builder_makes(tokenizer_dir, repo):
    committed = repo / "models" / "teacher" / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        assert (committed / name).read_bytes() == (tokenizer_dir / name).read_bytes(), name
