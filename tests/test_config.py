"""params.yaml validation: every bad key, type or range gives one error naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from src.core.config import Config, apply_overrides, config_from_dict, load_config
from src.core.errors import UserError


def test_repository_params_validate(repo):
    cfg = load_config(repo / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.lr > 0  # top level, for `dvc exp run -S lr=...`


def _error(raw: dict) -> str:
    with pytest.raises(UserError) as err:
        config_from_dict(raw)
    return str(err.value)


def test_unknown_top_level_key_is_named_with_a_suggestion():
    msg = _error({"lrr": 1e-6})
    assert "lrr: unknown key" in msg and "did you mean 'lr'" in msg


def test_unknown_nested_key_is_named_with_its_path():
    msg = _error({"prepare": {"trian": {"source": "world", "limit": 5}}})
    assert "prepare.trian: unknown key" in msg and "did you mean 'train'" in msg
    msg = _error({"prepare": {"train": {"source": "world", "limit": 5, "limt": 3}}})
    assert "prepare.train.limt" in msg and "did you mean 'limit'" in msg


@pytest.mark.parametrize("raw, key, words", [
    ({"lr": "fast"}, "lr", "valid number"),
    ({"lr": -1.0}, "lr", "greater than 0"),
    ({"world": {"resolution": 30}}, "world.resolution", "multiple of 8"),
    ({"world": {"resolution": 8}}, "world.resolution", "greater than or equal to 16"),
    ({"prepare": {"max_tokens": "many"}}, "prepare.max_tokens", "valid integer"),
    ({"prepare": {"train": {"source": "jsonl", "path": "x"}}}, "prepare.train.source", "'world', 'text'"),
    ({"prepare": {"eval": {"source": "world", "limit": 0}}}, "prepare.eval.limit", "greater than or equal to 1"),
    ({"distill": {"loss": "dmd"}}, "distill.loss", "'vsd' or 'sid'"),
    ({"distill": {"t_max_end": 990}}, "distill", "t_max_end (990) must lie in [t_min, t_max] = [20, 980]"),
    ({"distill": {"loss": "sid", "gradient_checkpointing": True}}, "distill", "loss: sid"),
])
def test_bad_values_name_the_key_and_the_allowed_range(raw, key, words):
    msg = _error(raw)
    assert f"{key}:" in msg and words in msg, msg


@pytest.mark.parametrize("source, words", [
    ({"source": "world"}, "needs 'limit'"),
    ({"source": "world", "limit": 3, "path": "a.txt"}, "not used by source 'world'"),
    ({"source": "text"}, "needs 'path'"),
    ({"source": "table", "path": "a.csv"}, "needs 'column'"),
    ({"source": "coco", "path": "c.json", "column": "caption"}, "only used by source 'table'"),
])
def test_source_fields_are_checked_together(source, words):
    msg = _error({"prepare": {"train": source}})
    assert "prepare.train" in msg and words in msg


def test_overrides_use_dvc_syntax_and_dvc_written_floats(tmp_path):
    # DVC (ruamel, YAML 1.2) writes `lr: 1e-06`, which PyYAML reads as a string: still a float here.
    p = tmp_path / "params.yaml"
    p.write_text("lr: 1e-06\nprepare:\n  train: {source: world, limit: 10}\n")
    assert load_config(p).lr == pytest.approx(1e-6)
    cfg = load_config(p, ["lr=2e-6", "prepare.train.limit=7"])
    assert cfg.lr == pytest.approx(2e-6) and cfg.prepare.train.limit == 7
    raw = apply_overrides({"a": {"b": 1}}, ["a.c=x"])
    assert raw == {"a": {"b": 1, "c": "x"}}


def test_params_rewritten_by_dvc_exp_run_load_unchanged(tmp_path, repo):
    """`dvc exp run -S` rewrites params.yaml with ruamel (YAML 1.2): `mixed_precision: "no"` comes
    back as a bare `no`, which a YAML 1.1 reader would take for False."""
    from dvc.utils.serialize import modify_yaml

    p = tmp_path / "params.yaml"
    p.write_text((repo / "params.yaml").read_text())
    with modify_yaml(p) as data:                  # what `dvc exp run -S distill.steps=1400` does
        data["distill"]["steps"] = 1400
    assert "mixed_precision: no " in p.read_text()
    before, after = load_config(repo / "params.yaml"), load_config(p)
    assert after.distill.steps == 1400 and after.distill.mixed_precision == "no"
    assert after.model_copy(update={"distill": before.distill.model_copy(update={"steps": 1400})}) == after
    assert load_config(p, ["distill.mixed_precision=no"]).distill.mixed_precision == "no"


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_config(top)


def test_cli_reports_one_clear_line_and_exit_status_2(tmp_path, repo):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"prepare": {"max_tokens": -3}}))
    run = subprocess.run([sys.executable, "-m", "src.prepare", "--params", str(p), "--dry-run"],
                         cwd=repo, capture_output=True, text=True)
    assert run.returncode == 2
    assert "prepare.max_tokens" in run.stderr and "Traceback" not in run.stderr


def test_dry_run_prints_the_resolved_section(repo):
    run = subprocess.run([sys.executable, "-m", "src.prepare", "--dry-run", "--set", "prepare.eval.limit=9"],
                         cwd=repo, capture_output=True, text=True, check=True)
    printed = yaml.safe_load(run.stdout)
    assert printed["eval"]["limit"] == 9 and printed["max_tokens"] == 77


def test_sd21_recipe_validates_against_the_schema(repo):
    cfg = load_config(repo / "recipes" / "sd21-base.yaml")
    assert cfg.lr == pytest.approx(1e-6)
    d = cfg.distill
    assert (d.batch_size, d.lora_lr, d.lora_rank, d.lora_alpha, d.guidance_scale) == (16, 1e-3, 64, 108, 4.5)
    assert (d.t_min, d.t_max, d.p_uncond, d.mixed_precision, d.gradient_checkpointing) == (20, 980, 0.1, "bf16", True)
    assert cfg.prepare.eval.source == "coco" and cfg.prepare.eval.limit == 30000


def test_the_clip_loss_may_not_train_on_the_evaluator():
    with pytest.raises(UserError, match="distill.clip_model.*evaluate scores with"):
        config_from_dict({"distill": {"clip_model": "models/evaluator"}, "evaluate": {"evaluator": "models/evaluator"}})
    assert config_from_dict({"distill": {"clip_model": "models/guide"}}).distill.clip_model == "models/guide"


@pytest.mark.parametrize("module, package, extra", [("src.serve", "fastapi", "serve"), ("src.flows", "prefect", "flows")])
def test_a_missing_extra_is_named_with_its_install_command(module, package, extra):
    """`pip install -e .` leaves the service's and the flows' packages out: their commands say what to install."""
    import subprocess
    import sys

    code = (f"import sys, runpy; sys.modules[{package!r}] = None; "
            f"runpy.run_module({module!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"pip install -e '.[{extra}]'" in out.stderr and "Traceback" not in out.stderr


def test_a_tiny_decoder_setting_needs_the_tiny_decoder_folder():
    for raw in ({"export": {"decoder": "tiny"}}, {"distill": {"clip_decoder": "tiny"}}):
        with pytest.raises(UserError, match="tiny needs the top-level tiny_decoder"):
            config_from_dict(dict(raw, tiny_decoder=None))
        assert config_from_dict(dict(raw, tiny_decoder="models/tiny_decoder")).tiny_decoder == "models/tiny_decoder"
