"""Print the resolved configuration, or the reference page of every params.yaml key.

    python -m src.config                 # print the resolved configuration
    python -m src.config --set lr=2e-6   # ... with overrides (same syntax as `dvc exp run -S`)

The typed configuration itself (one section per stage) lives in src/core/config.py.
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Literal

from pydantic import BaseModel

from .core.config import Config, add_config_args, dump, load_config
from .core.errors import run_cli


def _type_name(annotation) -> str:
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " \\| ".join(inner) + (" \\| `null`" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "multiple of", "min_length": "length >="}
    return ", ".join(f"{marks[k]} {getattr(m, k)}" for m in field.metadata for k in marks if hasattr(m, k))


def _cell(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "`" + text.replace("|", "\\|") + "`"


def reference(shipped: Config | None = None) -> str:
    """Markdown tables of every key: type, range, code default, the shipped params.yaml value and its
    description. Raises when a key has no description, so the docs cannot leave one out."""
    shipped = shipped or Config()
    out, missing = [], []

    def section(model: type[BaseModel], values: BaseModel, prefix: str) -> None:
        rows, subsections = [], []
        for name, field in model.model_fields.items():
            ann = field.annotation
            key = prefix + name
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                subsections.append((ann, getattr(values, name), key + "."))
                continue
            if not field.description:
                missing.append(key)
            default = field.get_default(call_default_factory=True)
            rows.append(f"| `{key}` | {_type_name(ann)} | {_bounds(field)} | {_cell(default)} | "
                        f"{_cell(getattr(values, name))} | {field.description or ''} |")
        if rows:
            doc = inspect.cleandoc(model.__doc__ or "")
            out.extend([f"### `{prefix.rstrip('.') or 'top level'}`", "", doc, "",
                        "| key | type | allowed | default | params.yaml | what it does |",
                        "|---|---|---|---|---|---|", *rows, ""])
        for sub in subsections:
            section(*sub)

    section(type(shipped), shipped, "")
    if missing:
        raise ValueError("undocumented configuration keys (give each a Field description in src/core/config.py): "
                         + ", ".join(missing))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Validate params.yaml and print the resolved configuration.")
    add_config_args(parser)
    parser.add_argument("--reference", action="store_true",
                        help="print the configuration reference (markdown) instead: every key, its type, range, "
                             "default, params.yaml value and meaning")
    args = parser.parse_args(argv)
    config = load_config(args.params, args.overrides)
    print(reference(config) if args.reference else dump(config), end="")


if __name__ == "__main__":
    run_cli(main)
