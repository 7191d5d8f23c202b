"""The package's stages import one way: down the list, never up, never in a circle.

The stages, top to bottom (each package's ``__init__`` says what it owns):
``cli``, ``api``, ``worker``, ``dispatch``, ``runners``, ``observe``, ``db``, then
the shared ``config`` and ``errors``.  ``worker`` and ``dispatch`` meet only
through the database and a publish callable, so ``dispatch`` never imports the
worker.  Lazy imports inside functions count too: they are still arrows.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "scanqueue"
STAGES = (
    "cli",
    "api",
    "worker",
    "dispatch",
    "runners",
    "observe",
    "db",
    "config",
    "identity",
    "errors",
)
# Entry points that only re-export: the package root (the public Runner API) and
# the module where `celery -A scanqueue` looks for the app.
FACADES = {"scanqueue", "scanqueue.celery"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The scanqueue module an import names (a name imported from a package may be a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, modules: dict[str, Path], *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "scanqueue" or name.startswith("scanqueue."):
                target = _resolve(name, modules)
                if target is not None:
                    found.add(target)
    return found


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in STAGES:
        return None
    return STAGES.index(parts[1])


def test_no_module_imports_a_stage_above_its_own() -> None:
    modules = _modules()
    upward = []
    for name, path in modules.items():
        mine = _stage(name)
        if mine is None:
            continue
        for target in _imports(path, modules, top_level_only=False):
            theirs = _stage(target)
            if target in FACADES:
                upward.append(f"{name} imports the facade {target}")
            elif theirs is not None and theirs < mine:
                upward.append(f"{name} ({STAGES[mine]}) imports {target} ({STAGES[theirs]})")
    assert not upward, "imports that point up the stages:\n" + "\n".join(upward)


def test_no_import_cycles_at_import_time() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules, top_level_only=True) for name, path in modules.items()}
    # A package's __init__ runs before its modules: importing a.b imports a too.
    for name in list(graph):
        parent = name.rpartition(".")[0]
        if parent in graph and parent != name:
            graph[name] = graph[name] | {parent}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.startswith(node + "."):
                continue  # a package importing its own module is not a cycle
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if state.get(name) is None:
            visit(name)


def test_every_stage_says_what_it_owns() -> None:
    for stage in STAGES[:-3]:
        init = PACKAGE / stage / "__init__.py"
        assert init.exists(), f"scanqueue/{stage}/ is not a package"
        assert ast.get_docstring(ast.parse(init.read_text())), f"scanqueue/{stage} has no docstring"


def test_every_module_has_a_docstring() -> None:
    missing = [
        name
        for name, path in _modules().items()
        if "migrations.versions" not in name and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not missing, f"modules without a docstring: {missing}"
