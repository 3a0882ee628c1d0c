"""The documentation: the site builds strictly, the configuration reference is generated and complete,
and the README's links lead somewhere."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from src.config import reference
from src.core.config import Config, Section

REPO = Path(__file__).resolve().parents[1]


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += leaf_keys(ann, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


def test_the_configuration_reference_lists_every_key_with_its_description():
    text = reference()
    keys = leaf_keys(Config)
    assert len(keys) > 60
    for key in keys:
        assert f"| `{key}` |" in text, key
    assert "| `distill.student_timestep` | int \\| `null` | >= 1, <= 999 | `null` |" in text


def test_an_undocumented_key_fails_the_reference(monkeypatch):
    class Extra(Section):
        documented: int = Field(1, description="has one")
        bare: int = 2

    class WithExtra(Config):
        extra: Extra = Extra()

    with pytest.raises(ValueError, match="extra.bare"):
        reference(WithExtra())


def test_the_site_builds_strictly(tmp_path):
    """Broken links, missing pages or an undocumented key fail `mkdocs build --strict` (not with -q: quiet
    mode drops the warnings that strict mode counts)."""
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={"PATH": str(Path(sys.executable).parent), "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    page = (tmp_path / "site" / "configuration" / "index.html").read_text()
    assert "distill.student_timestep" in page and "serve.max_batch" in page


def test_the_readme_is_a_short_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#]+)[^)]*\)", text) + re.findall(r'<img src="([^"]+)"', text)
    assert targets
    for target in targets:
        if "://" not in target:
            assert (REPO / target).exists(), target
    ci = (REPO / ".ci" / "run").read_text()
    assert "pytest -q" in text and ci.rstrip().endswith("pytest -q")        # the README's test command is CI's


def test_no_file_cites_a_document_the_repository_does_not_hold():
    """Every fact the code and docs rely on lives in the repository (docs/design.md), never in a brief
    kept beside it."""
    cited = ("DESIGN" + ".md", ".." + "/shared")           # spelt apart, so that this file does not cite them
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    texts = {f: (REPO / f).read_text(errors="ignore") for f in files
             if (REPO / f).is_file() and (REPO / f).suffix in {".py", ".md", ".yaml", ".toml", ".txt", ".sh"}}
    assert [f for f, text in texts.items() if any(c in text for c in cited)] == []
