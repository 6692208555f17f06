"""The builder's modules import only those below them in docs/architecture.md's table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
BUILDER = ROOT / "hydra_trio" / "builder"


def documented_order() -> list[str]:
    """The module names of the Builder section's table, top to bottom."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Builder", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)\.py` \|", section, re.M)


def builder_imports(module: str) -> set[str]:
    tree = ast.parse((BUILDER / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "hydra_trio.builder":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("hydra_trio.builder."):
                found.add(node.module.rsplit(".", 1)[1])
    return found


def test_the_table_lists_every_builder_module_once() -> None:
    """Every module of hydra_trio/builder is in the table, once."""
    order = documented_order()
    modules = {path.stem for path in BUILDER.glob("*.py") if path.stem != "__init__"}
    assert sorted(order) == sorted(modules)


def test_each_module_imports_only_modules_below_it() -> None:
    """No builder module imports one above it in the table (so there is no import cycle)."""
    order = documented_order()
    upward = {
        (module, imported)
        for position, module in enumerate(order)
        for imported in builder_imports(module)
        if imported not in order[position + 1 :]
    }
    assert upward == set()
