"""pyproject.toml lists every distribution the installed code imports (issue 24.1): a plain
`pip install "prefmill[cpu]"` must not miss one that only the development environment happens to have."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("prefmill", "flows", "operators", "schemas", "serving", "storage")


def imported_top_names() -> set[str]:
    names: set[str] = set()
    for layer in LAYERS:
        for path in (REPO / layer).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"prefmill", "__future__"}


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["cpu"]
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def test_every_imported_distribution_is_declared_in_pyproject():
    dists = packages_distributions()
    missing = {name: dists.get(name) for name in imported_top_names()
               if not {d.lower().replace("_", "-") for d in dists.get(name, [name])} & declared()}
    assert missing == {}, f"imported but not in pyproject dependencies / the cpu extra: {missing}"
