"""Imports run one way: schemas ← workers ← streams ← producer_tools | bench.

Every import counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Package → layer; a module may import its own layer's package and those of lower layers only.
LAYERS = {"schemas": 0, "workers": 1, "streams": 2, "producer_tools": 3, "bench": 3}


def imported_packages(source: str, module: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in ``source``, relative ones resolved against ``module``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside the module's own package
                found.append((node.lineno, module.split(".")[0]))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return found


def layering_violations(source: str, module: str) -> list[str]:
    own = module.split(".")[0]
    violations = []
    for line, package in imported_packages(source, module):
        if package == own or package not in LAYERS:
            continue
        if LAYERS[package] >= LAYERS[own]:
            violations.append(f"{module}:{line} imports {package} (layer {LAYERS[package]} >= {LAYERS[own]})")
    return violations


def project_modules() -> list[tuple[str, Path]]:
    modules = []
    for package in LAYERS:
        for path in sorted((REPO / package).rglob("*.py")):
            relative = path.relative_to(REPO).with_suffix("")
            modules.append((".".join(relative.parts), path))
    return modules


def test_no_module_imports_a_package_above_its_own() -> None:
    modules = project_modules()
    assert len(modules) > 40  # the walk found the packages
    violations = [v for module, path in modules for v in layering_violations(path.read_text(), module)]
    assert violations == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("workers.engine", "from streams.runtime import WorkerRuntime\n"),
        ("streams.web", "def handler():\n    from producer_tools.cli import register\n"),
        ("schemas.events", "import workers.core_step\n"),
        ("producer_tools.demo", "class A:\n    def f(self):\n        import bench.stack\n"),
        ("bench.chaos", "from producer_tools import replay\n"),
    ],
)
def test_checker_reports_an_upward_or_sideways_import(module: str, source: str) -> None:
    assert len(layering_violations(source, module)) == 1


def test_checker_allows_downward_and_own_package_imports() -> None:
    source = "from schemas.settings import Settings\nimport workers.cache\nfrom . import telemetry\nimport json\n"
    assert layering_violations(source, "streams.runtime") == []
