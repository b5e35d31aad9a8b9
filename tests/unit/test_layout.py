"""The package's shape (DESIGN §11): a small core at the root, wings beside it, and
imports that run one way only. Read from the source with ``ast``, so an import inside
a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "arroyo"
WINGS = ("runtime", "control", "io")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, including those under ``if TYPE_CHECKING``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph(top: str) -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in (ROOT / top).rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else "core"


def test_root_holds_the_core_and_at_least_three_wings() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) <= 14, modules
    assert set(WINGS) <= set(subpackages), subpackages
    assert not [m for m in modules if "bench" in m], modules


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[name] = 2
        return None

    for name in graph:
        if name not in state and (found := visit(name, [name])):
            return found
    return None


@pytest.mark.parametrize("top", ["arroyo", "arroyo_bench", "stages"])
def test_no_import_circle(top: str) -> None:
    circle = _circle(_graph(top))
    assert circle is None, "import circle: " + " -> ".join(circle or [])


@pytest.mark.parametrize(
    ("wing", "may_import"),
    [
        ("core", {"core"}),
        ("runtime", {"core", "runtime"}),
        ("io", {"core", "io"}),
    ],
)
def test_arrows_run_one_way(wing: str, may_import: set[str]) -> None:
    """The core imports no wing; the runtime never drives supervisor; connectors are
    plain stage code on the core API."""
    wrong = [
        f"{module} imports {dep}"
        for module, deps in _graph("arroyo").items()
        if _wing(module) == wing
        for dep in deps
        if dep.startswith("arroyo.") and _wing(dep) not in may_import
    ]
    assert not wrong, wrong


def test_stock_stages_import_only_the_core() -> None:
    wrong = [
        f"{path.name} imports {dep}"
        for path in (ROOT / "stages").glob("*.py")
        for dep in _imports(path)
        if dep.startswith("arroyo.") and _wing(dep) != "core"
    ]
    assert not wrong, wrong
