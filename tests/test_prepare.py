"""The prepare stage: every source, normalisation, dedup, token-length report, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from src.core.config import PrepareConfig, SourceConfig, WorldConfig
from src.core.errors import UserError
from src.core.text import normalize, normalize_counted
from src.prepare import prepare
from src.world import read_scene, render, score
from src.world.scene import Scene

WORLD = WorldConfig()


def _cfg(tokenizer_dir, train: dict, eval: dict | None = None, **kw) -> PrepareConfig:
    return PrepareConfig(train=SourceConfig(**train), eval=SourceConfig(**(eval or {"source": "world", "limit": 5})),
                         tokenizer=str(tokenizer_dir), **kw)


def _run(tmp_path, cfg, seed=0):
    stats = prepare(cfg, WORLD, seed, tmp_path / "prompts", tmp_path / "prompts.json")
    read = lambda n: [json.loads(line) for line in (tmp_path / "prompts" / f"{n}.jsonl").read_text().splitlines()]
    return stats, read("train"), read("eval")


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# --------------------------------------------------------------------------- world source

def test_world_splits_are_disjoint_deterministic_and_renderable(tmp_path, tokenizer_dir):
    cfg = _cfg(tokenizer_dir, {"source": "world", "limit": 400}, {"source": "world", "limit": 100})
    stats, train, evals = _run(tmp_path / "a", cfg)
    assert len(train) == 400 and len(evals) == 100
    assert not {r["prompt"].casefold() for r in train} & {r["prompt"].casefold() for r in evals}
    assert stats["eval"].overlap_with_train == 0
    # Same seed: identical bytes. Another seed: other prompts.
    _run(tmp_path / "b", cfg)
    for name in ("train", "eval"):
        assert (tmp_path / "a/prompts" / f"{name}.jsonl").read_bytes() == \
            (tmp_path / "b/prompts" / f"{name}.jsonl").read_bytes()
    _, train_c, _ = _run(tmp_path / "c", cfg, seed=1)
    assert [r["prompt"] for r in train_c] != [r["prompt"] for r in train]
    # Eval prompts carry what is needed for a ground-truth render that the judge accepts.
    for r in evals[:20]:
        img = render(Scene(**r["scene"]), WORLD.resolution, seed=r["seed"])
        assert score(read_scene(img), r["attributes"])["all"]
    assert len({r["seed"] for r in evals}) == len(evals)
    assert json.loads((tmp_path / "a/prompts.json").read_text())["train"]["kept"] == 400


# --------------------------------------------------------------------------- text source

def test_text_normalises_dedupes_and_keeps_the_unterminated_last_line(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.txt",
               "\ufeffA  red\tcircle\n"          # BOM, tab, double space
               "a red circle\n"                  # duplicate, case-insensitively
               "   \n\n"                          # empty lines
               "ＦＵＬＬ\u00a0width\n"             # NFKC: fullwidth letters, no-break space
               "last line without newline")
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))
    assert [r["prompt"] for r in train] == ["A red circle", "FULL width", "last line without newline"]
    s = stats["train"]
    assert (s.read, s.kept, s.duplicates, s.empty, s.bad_lines) == (6, 3, 1, 2, 0)


def test_prepare_removes_control_characters_and_counts_them(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.txt", "a red\x00 circle\nblue \x1b[1msquare\x9b\n\x00\x07\nplain\n")
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))
    assert [r["prompt"] for r in train] == ["a red circle", "blue [1msquare", "plain"]
    s = stats["train"]
    assert (s.control_chars, s.with_control_chars, s.empty) == (5, 3, 1)


def test_dedupe_can_be_switched_off(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.txt", "x\nx\nX\n")
    _, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f), "dedupe": False}))
    assert [r["prompt"] for r in train] == ["x", "x", "X"]


def test_too_long_prompts_are_counted_not_dropped(tmp_path, tokenizer_dir):
    long = " ".join(["red"] * 80)  # 80 word tokens + BOS + EOS
    f = _write(tmp_path / "p.txt", f"short\n{long}\n")
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))
    assert stats["train"].too_long == 1 and len(train) == 2
    stats, _, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}, max_tokens=100))
    assert stats["train"].too_long == 0


def test_limit_keeps_the_first_n_in_file_order(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(10)))
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f), "limit": 4}))
    assert [r["prompt"] for r in train] == [f"prompt {i}" for i in range(4)]
    assert stats["train"].stopped_at_limit


def test_non_utf8_lines_are_counted_and_located(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.txt", b"good one\n\xff\xfe bad bytes\ngood two\n")
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))
    assert [r["prompt"] for r in train] == ["good one", "good two"]
    assert stats["train"].bad_lines == 1 and stats["train"].bad_line_examples[0].startswith("2: not UTF-8")


def test_a_file_of_only_bad_bytes_names_the_file(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1") * 3)
    with pytest.raises(UserError, match=r"latin1.txt: no prompts left.*bad lines 3"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))


@pytest.mark.parametrize("content, words", [(None, "file not found"), (b"", "file is empty"),
                                            (b"\n  \n\t\n", "no prompts left")])
def test_missing_empty_and_blank_files(tmp_path, tokenizer_dir, content, words):
    f = tmp_path / "prompts.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(UserError, match=f"prompts.txt: {words}"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(f)}))


# --------------------------------------------------------------------------- tables

def test_csv_and_tsv_read_the_named_column(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.csv", 'id,text\n1,"a blue, square"\n2,"multi\nline"\n3,\n')
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "text"}))
    assert [r["prompt"] for r in train] == ["a blue, square", "multi line"]
    assert stats["train"].empty == 1
    t = _write(tmp_path / "p.tsv", "text\tother\nhello there\tx\n")
    _, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(t), "column": "text"}))
    assert [r["prompt"] for r in train] == ["hello there"]


def test_csv_missing_column_lists_the_columns(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.csv", "id,caption\n1,x\n")
    with pytest.raises(UserError, match=r"p.csv: column 'prompt' not found \(columns: 'id', 'caption'\)"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "prompt"}))


def test_jsonl_counts_bad_records(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.jsonl", '{"prompt": "one"}\nnot json\n[1, 2]\n{"prompt": 5}\n{"other": 1}\n'
                                     '{"prompt": "two"}')
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "prompt"}))
    assert [r["prompt"] for r in train] == ["one", "two"]
    assert stats["train"].bad_lines == 4
    assert stats["train"].bad_line_examples[0].startswith("2: not a JSON line")


def test_jsonl_without_the_column_anywhere(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    with pytest.raises(UserError, match=r"p.jsonl: column 'prompt' not found in any record \(keys seen: 'text'\)"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "prompt"}))


def test_parquet_streams_the_column_and_checks_it(tmp_path, tokenizer_dir):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "b", "a"], "n": [1, 2, 3, 4]}), f)
    stats, train, _ = _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "prompt"}))
    assert [r["prompt"] for r in train] == ["a", "b"]
    assert (stats["train"].bad_lines, stats["train"].duplicates) == (1, 1)
    with pytest.raises(UserError, match=r"column 'text' not found \(columns: 'prompt', 'n'\)"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "text"}))
    broken = _write(tmp_path / "broken.parquet", b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="broken.parquet: not a valid Parquet file"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(broken), "column": "prompt"}))


def test_unknown_table_suffix(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "p.xlsx", "x")
    with pytest.raises(UserError, match=r"p.xlsx: unknown table format '.xlsx'"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "table", "path": str(f), "column": "prompt"}))


# --------------------------------------------------------------------------- COCO

def _coco(n: int) -> dict:
    return {"info": {}, "images": [{"id": i} for i in range(n)],
            "annotations": [{"image_id": i // 2, "id": 100 + i, "caption": f"A photo number {i}. "}
                            for i in range(n)]}


def test_coco_keeps_file_order_and_ids_and_takes_the_first_n(tmp_path, tokenizer_dir):
    f = _write(tmp_path / "captions_val2014.json", json.dumps(_coco(10)))
    _, _, evals = _run(tmp_path, _cfg(tokenizer_dir, {"source": "world", "limit": 5},
                                      {"source": "coco", "path": str(f), "limit": 6, "dedupe": False}))
    assert [r["prompt"] for r in evals] == [f"A photo number {i}." for i in range(6)]
    assert [(r["image_id"], r["id"]) for r in evals] == [(i // 2, 100 + i) for i in range(6)]


@pytest.mark.parametrize("content, words", [
    ('{"annotations": [', "not valid COCO captions JSON"),
    ('{"images": []}', "not COCO captions JSON: expected an object with an 'annotations' list"),
    ('[{"caption": "x"}]', "not COCO captions JSON: expected an object with an 'annotations' list"),
])
def test_malformed_coco(tmp_path, tokenizer_dir, content, words):
    f = _write(tmp_path / "caps.json", content)
    with pytest.raises(UserError, match=f"caps.json: {words}"):
        _run(tmp_path, _cfg(tokenizer_dir, {"source": "coco", "path": str(f)}))


def test_file_eval_overlap_with_train_is_reported(tmp_path, tokenizer_dir):
    tr = _write(tmp_path / "train.txt", "alpha\nbeta\ngamma\n")
    ev = _write(tmp_path / "eval.txt", "Beta\ndelta\n")
    stats, _, evals = _run(tmp_path, _cfg(tokenizer_dir, {"source": "text", "path": str(tr)},
                                          {"source": "text", "path": str(ev)}))
    assert stats["eval"].overlap_with_train == 1 and len(evals) == 2


# --------------------------------------------------------------------------- outputs

def test_a_failing_split_leaves_previous_outputs_untouched(tmp_path, tokenizer_dir):
    good = _cfg(tokenizer_dir, {"source": "world", "limit": 20})
    _run(tmp_path, good)
    before = {p.name: p.read_bytes() for p in (tmp_path / "prompts").iterdir()}
    bad = _cfg(tokenizer_dir, {"source": "text", "path": str(tmp_path / "missing.txt")},
               {"source": "world", "limit": 7})
    with pytest.raises(UserError, match="missing.txt: file not found"):
        _run(tmp_path, bad)
    after = {p.name: p.read_bytes() for p in (tmp_path / "prompts").iterdir()}
    assert after == before  # no new eval.jsonl, no temporary files left behind


def test_missing_tokenizer_is_named(tmp_path):
    cfg = PrepareConfig(tokenizer=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match=r"prepare.tokenizer: folder .*nothing not found"):
        prepare(cfg, WORLD, 0, tmp_path / "out")


def test_tokenizer_may_be_given_as_a_pipeline_folder(tmp_path, tokenizer_dir):
    import shutil

    pipe = tmp_path / "pipe"
    shutil.copytree(tokenizer_dir, pipe / "tokenizer")
    cfg = PrepareConfig(tokenizer=str(pipe), train=SourceConfig(limit=3), eval=SourceConfig(limit=2))
    stats = prepare(cfg, WORLD, 0, tmp_path / "out")
    assert stats["train"].kept == 3


def test_normalize():
    assert normalize("  a\u2003b\r\n c\u00a0 ") == "a b c"
    assert normalize("ﬁne") == "fine"  # NFKC ligature


def test_control_characters_are_removed_and_counted():
    # NUL, BEL, ESC (of an ANSI colour code), DEL and the C1 CSI are removed; the whitespace controls
    # (tab, the separators U+001C-U+001F, NEL U+0085) still separate words.
    assert normalize_counted("a\x00 red\x07 ci\x1b[31mrcle\x7f\x9b") == ("a red ci[31mrcle", 5)
    assert normalize_counted("a\tred\x1fcircle\x85top") == ("a red circle top", 0)
    assert normalize_counted("\x00\x01") == ("", 2)


def test_cli_error_is_one_line(tmp_path, repo):
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare:\n  train: {{source: text, path: {tmp_path / 'nope.txt'}}}\n")
    run = subprocess.run([sys.executable, "-m", "src.prepare", "--params", str(params),
                          "--out-dir", str(tmp_path / "o"), "--stats", str(tmp_path / "s.json")],
                         cwd=repo, capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].endswith("nope.txt: file not found")
    assert "Traceback" not in run.stderr and not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_wider_eval_extends_the_eval_set_and_stays_held_out(tmp_path, tokenizer_dir):
    from src.core.prompts import read_prepared
    from src.prepare import _dedupe_key, wider_eval

    cfg = PrepareConfig(tokenizer=str(tokenizer_dir), train=SourceConfig(limit=50), eval=SourceConfig(limit=20))
    prepare(cfg, WorldConfig(), 0, tmp_path)
    wider_eval(cfg, WorldConfig(), 0, 400, tmp_path / "first.jsonl", tmp_path / "train.jsonl")
    # training prompts that the wider eval stream meets later on
    later = read_prepared(tmp_path / "first.jsonl")[100:111]
    with open(tmp_path / "train.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in later)
    stats = wider_eval(cfg, WorldConfig(), 0, 400, tmp_path / "wide.jsonl", tmp_path / "train.jsonl")
    wide = read_prepared(tmp_path / "wide.jsonl")
    assert len(wide) == 400 and stats.kept == 400
    assert wide[:20] == read_prepared(tmp_path / "eval.jsonl")          # record for record: ids, seeds, scenes
    train = {_dedupe_key(r["prompt"]) for r in read_prepared(tmp_path / "train.jsonl")}
    assert stats.excluded == 11 and not any(_dedupe_key(r["prompt"]) in train for r in wide)
    assert [r["id"] for r in wide] == list(range(400))
    with pytest.raises(UserError, match="at least prepare.eval.limit"):
        wider_eval(cfg, WorldConfig(), 0, 10, tmp_path / "small.jsonl", tmp_path / "train.jsonl")
