"""The package layering (docs/architecture.md): every import points down, none is hidden in a
function to dodge a cycle, and there is no import cycle."""

import ast
from pathlib import Path

import pytest

import torchslim

ROOT = Path(torchslim.__file__).parent
CORE = ("spaces", "ops", "capture", "graph")
GRAPH = {"spaces", "ops", "capture", "pruning", "graph", "_moved"}
ANALYSES = GRAPH | {"importance", "verify", "persistence", "utils"}
PRUNER = ANALYSES | {"pruner", "strategy", "function"}
#: What each package (or root module) may import, besides itself.
ALLOWED = {
    "_moved": set(),
    "spaces": set(),
    "pruning": set(),
    "function": {"pruning"},
    "strategy": set(),
    "zoo": set(),
    "ops": {"spaces"},
    "capture": {"spaces", "ops"},
    "graph": GRAPH,
    "importance": GRAPH,
    "verify": GRAPH,
    "persistence": GRAPH,
    "utils": {"spaces", "ops", "capture", "pruning"},
    "pruner": ANALYSES | {"function"},
    "hf": PRUNER,
    "sparsity": PRUNER,
    "search": PRUNER,
    "cli": None,
    "data": {"cli", "_moved"},
    "__main__": {"cli"},
    "torchslim": None,
}


def modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join(("torchslim", *parts)), path))
    return found


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported torchslim module, inside a function)`` for every import the file runs
    (those under ``if TYPE_CHECKING:`` are for annotations only and never run)."""
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
    }
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for node in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if _is_module(n) else node.module for n in names]
        else:
            continue
        if id(node) in typing_only:
            continue
        found += [(n, id(node) in nested) for n in names if n.split(".")[0] == "torchslim"]
    return found


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (ROOT / relative).with_suffix(".py").exists() or (ROOT / relative).is_dir()


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "torchslim"


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_point_down_the_layering(module, path):
    """Down the layering only, and never from inside a function (where imports hide cycles)."""
    own = package(module)
    allowed = ALLOWED.get(own, "unlisted")
    assert allowed != "unlisted", f"{module}: add its package to ALLOWED and the architecture"
    for imported, in_function in imports(path):
        target = package(imported)
        assert not in_function, f"{module} imports {imported} inside a function"
        if allowed is None or target == own:
            continue
        assert target in allowed, f"{module} ({own}) may not import {imported} ({target})"


@pytest.mark.parametrize("core", CORE)
def test_the_core_imports_nothing_inside_functions(core):
    for path in sorted((ROOT / core).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                hidden = [
                    n.lineno for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
                ]
                assert not hidden, f"{path.relative_to(ROOT)}:{hidden[0]} imports inside {fn.name}"


def test_no_import_cycle():
    graph = {
        module: {name for name, in_function in imports(path) if not in_function}
        for module, path in modules()
    }
    done, active = set(), []

    def visit(module):
        if module in active:
            cycle = active[active.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module in done or module not in graph:
            return
        active.append(module)
        for imported in graph[module]:
            visit(imported)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_the_package_is_typed():
    assert (ROOT / "py.typed").exists()
