"""The import graph of src/: no cycles, and every import runs down the layers (docs/architecture.md).

Commands (src/*.py, src/bench/) sit on top; under them the libraries, each allowed to import
only the layers below it and its own package. Imports inside functions count as well."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Library packages and the packages each may import from (besides itself).
LAYERS = {
    "core": set(),
    "method": {"core"},
    "world": {"core", "method"},
    "scoring": {"core", "world"},
    "artifact": {"core", "method"},
    "serving": {"core", "method"},
}


def module_name(path: Path) -> str:
    parts = ["src", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def src_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The src modules `path` imports, anywhere in the file (a `from pkg import module` names the module)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{target}.{a.name}" in modules:
                    out.add(f"{target}.{a.name}")
                elif target in modules:
                    out.add(target)
    out.discard(module_name(path))
    return out


def unresolved(path: Path, modules: dict[str, Path]) -> list[str]:
    """The src modules `path` names in an import that do not exist (a relative import left behind by a move)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "src"):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target not in modules:
                bad.append(f"{module_name(path)}:{node.lineno} imports {target}")
    return bad


def graph() -> dict[str, set[str]]:
    modules = src_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def layer_of(module: str) -> str | None:
    """The library package a module belongs to, or None for a command (src/*.py, src/bench/)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in edges.items():
        layer = layer_of(module)
        if layer is None:
            continue
        for target in targets:
            other = layer_of(target)
            if target == "src" or other == layer:
                continue
            if other is None:
                bad.append(f"{module} imports the command {target}")
            elif other not in LAYERS[layer]:
                bad.append(f"{module} ({layer}) imports {target} ({other}), not a layer below it")
    return sorted(bad)


def test_the_graph_reads_relative_and_lazy_imports():
    edges = graph()
    assert "src.core.errors" in edges["src.distill"]                 # from .core.errors import ...
    assert "src.core.manifest" in edges["src.flows"]                 # from .core import manifest
    assert "src.evaluate" in edges["src.merge"]                      # inside a function
    assert "src.method.conditioning" in edges["src.method.onestep"]  # inside a function, one level down


def test_every_import_of_src_names_a_module_that_exists():
    modules = src_modules()
    assert [b for path in modules.values() for b in unresolved(path, modules)] == []


def test_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_libraries_import_only_the_layers_below():
    assert layer_violations(graph()) == []


def test_every_library_package_is_a_known_layer():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} - {"bench"}
    assert packages == set(LAYERS)


@pytest.mark.parametrize("edges, expected", [
    ({"src.a": {"src.b"}, "src.b": {"src.a"}}, ["src.a", "src.b", "src.a"]),
    ({"src.a": {"src.b"}, "src.b": set()}, None),
])
def test_find_cycle_finds_one_when_there_is_one(edges, expected):
    assert find_cycle(edges) == expected


def test_the_layer_rule_catches_an_arrow_back_up():
    edges = {"src.world.measure": {"src.prepare", "src.core.errors"}, "src.core.fileio": {"src.method.vsd"}}
    assert layer_violations(edges) == [
        "src.core.fileio (core) imports src.method.vsd (method), not a layer below it",
        "src.world.measure imports the command src.prepare",
    ]
