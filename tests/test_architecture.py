"""The module structure docs/architecture.md describes: no import circles at module level, pure math free of
configs and models."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "air_ft"


def _module_imports() -> dict[str, set[str]]:
    """``module -> air_ft modules it imports at module level`` (imports inside functions are deferred on purpose)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("air_ft"):
                base = node.module
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}".replace(".", "/") + ".py" in _files() else base
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("air_ft")}
        out[name] = found - {name}
    return out


def _files() -> set[str]:
    return {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")}


def test_no_module_level_import_circles():
    graph = _module_imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, " -> ".join((*trail, node))
        state[node] = 1
        for nxt in graph.get(node, ()):
            visit(nxt, (*trail, node))
        state[node] = 2

    for module in graph:
        visit(module, ())


def test_the_pure_math_knows_nothing_of_configs_models_or_data():
    graph = _module_imports()
    allowed = {"air_ft.errors", "air_ft.linalg", "air_ft.native", "air_ft.gpu_als"}
    for module in ("air_ft.linalg", "air_ft.curvature"):
        assert graph[module] <= allowed, (module, graph[module] - allowed)
