"""The layer rules of DESIGN.md, checked by parsing every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINES = {"ray", "vllm", "duckdb", "prefect"}
# which engine imports each layer may make, and which of our layers it may import
ALLOWED = {
    "schemas": (set(), set()),
    "storage": ({"duckdb"}, {"schemas", "storage"}),
    "serving": ({"ray", "vllm"}, {"schemas", "serving"}),
    "operators": (set(), {"schemas", "operators", "serving.protocols"}),
    "flows": (ENGINES, {"schemas", "storage", "serving", "operators", "flows"}),
}
OURS = set(ALLOWED)


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_downward(layer):
    engines, ours = ALLOWED[layer]
    files = sorted((REPO / layer).rglob("*.py"))
    assert files, f"layer {layer} has no code"
    broken = []
    for path in files:
        for imported in _imports(path):
            name = imported.removeprefix("prefmill.")  # our layers by their folder names
            top = name.split(".")[0]
            if top in ENGINES and top not in engines:
                broken.append(f"{path.relative_to(REPO)} imports {name}")
            if top in OURS and top != layer and not any(name == o or name.startswith(o + ".") for o in ours):
                broken.append(f"{path.relative_to(REPO)} imports {name}")
            if top in OURS and name == imported:
                broken.append(f"{path.relative_to(REPO)} imports {name} outside the prefmill namespace")
    assert not broken, "layer rules broken:\n" + "\n".join(broken)
