"""The package's layering: each module imports only from its own layer or below, with no
circle anywhere, and no module or class past its size (see docs/design.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "polyak"

#: The layers, bottom up: a module's layer is that of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    # The base: checks and messages, the list primitives, state containers, hyperparameters.
    (
        "polyak._checks",
        "polyak._ops",
        "polyak._state",
        "polyak._hyper",
        "polyak._precision",
        "polyak._memo",
        "polyak._quant",
        "polyak.functional",
    ),
    # How an update rule runs: the strategies, the flat kernel among them.
    ("polyak.strategies",),
    # The machinery of a step and of checkpoints, which the Optimizer class delegates to.
    (
        "polyak._runner",
        "polyak._rehearsal",
        "polyak._hooks",
        "polyak._checkpoint",
        "polyak._driver",
        "polyak._compile",
        "polyak._groups",
        "polyak._explain",
    ),
    ("polyak.optimizer",),
    ("polyak.algorithms",),
    ("polyak", "polyak.bench", "polyak.demo", "polyak.cli", "polyak.__main__"),
]
#: What the algorithms may import: the base class and the primitives and checks, nothing else.
ALGORITHMS_TAKE = ("polyak.optimizer", "polyak._ops", "polyak._checks", "polyak.algorithms")
#: Modules allowed past the size limit, and why (docs/design.md says more).
LARGE = {
    # A table of independent primitives, read entry by entry.
    "polyak._ops": 1000,
}
MODULE_LINES, CLASS_LINES = 700, 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The polyak modules ``name`` imports, at module level or inside functions, type-checking
    blocks included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "polyak")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            if base.split(".")[0] != "polyak":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    out.discard(name)
    return out


def _layer(module: str) -> int:
    best, found = -1, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found >= 0, f"{module} is in no layer: add it to LAYERS"
    return found


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, deps in GRAPH.items()
        for dep in sorted(deps)
        if _layer(dep) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_algorithms_import_only_the_base_the_primitives_and_the_checks() -> None:
    wrong = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if name.startswith("polyak.algorithms")
        for dep in sorted(deps)
        if not any(dep == t or dep.startswith(t + ".") for t in ALGORITHMS_TAKE)
    ]
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_circle() -> None:
    # A package imports its own modules (its face re-exports them): an edge from a package
    # to a module inside it is not a way back up.
    def edges(name: str) -> list[str]:
        return [d for d in GRAPH[name] if d in GRAPH and not d.startswith(name + ".")]

    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in edges(name):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in GRAPH:
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_and_classes_stay_small(name: str) -> None:
    path = _modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= LARGE.get(name, MODULE_LINES), f"{name}: {lines} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= CLASS_LINES, f"{name}.{node.name}: {size} lines"
