"""The stage contract: one step of the pipeline over one shard, next to the models it needs.

A stage is a small frozen dataclass holding its operators' configuration, with
- `name` (and a `label` for progress bars), and the tables it `consumes` and `produces` (by name: a shard
  is a dict of named tables, and a later stage may refine a table an earlier one produced, e.g. candidates
  plus their critique revisions);
- `roles()`: the models it needs, role → `ModelRole` (spec and kind), so placement can be planned before
  anything loads;
- `from_config(cfg)`: the stage built from its own config section, or None when the config turns it off;
- `seed_fields`: the seed fields it needs (a run where no seed has them fails before any model loads; a seed
  without them is quarantined for this stage, which skips it), and `pair_tables`: the names of the pairs and
  reject tables it produces (a pair source's output joins the one pairs dataset, with its `source`);
- `__call__(tables, models)`: the work, where `models` gives `chat_model(spec, url=None)` and `scorer(spec)`.
Its `fingerprint()` hashes its configuration and the source of every repository module its code imports,
transitively, plus the serving code behind its model roles, so a changed algorithm is never served from a
stored result.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import pyarrow as pa

from prefmill.schemas.config import PipelineConfig

PACKAGE = "prefmill"
# the code behind each kind of model role: it shapes the outputs too (sampling parameters, scoring)
ROLE_MODULES = {"chat": ("prefmill.serving.engine", "prefmill.serving.http_client"),
                "scorer": ("prefmill.serving.prefix_scorer",)}


@dataclass(frozen=True)
class ModelRole:
    """A model a stage needs: its spec, how it is used (`chat`: a vLLM engine; `scorer`: FLR scoring) and,
    for a chat model served elsewhere, the server's `url`."""

    spec: str
    kind: Literal["chat", "scorer"] = "chat"
    url: str | None = None  # a chat model served by this OpenAI-compatible server, not placed on our devices


class Models(Protocol):
    """What a stage sees of the models of its process (a `serving.hosts.HostSession`)."""

    def chat_model(self, spec: str, url: str | None = None) -> Any: ...

    def scorer(self, spec: str) -> Any: ...


class Stage:
    """Base of every stage (mixed into a frozen dataclass)."""

    name: ClassVar[str]
    label: ClassVar[str] = ""  # what a progress bar calls it (default: its name)
    consumes: ClassVar[tuple[str, ...]]
    produces: ClassVar[tuple[str, ...]]
    seed_fields: ClassVar[tuple[str, ...]] = ()  # seed fields it needs; a seed without one is quarantined for it
    pair_tables: ClassVar[tuple[str, str] | None] = None  # (pairs, rejects) it produces for the pairs dataset

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> Stage | None:
        raise NotImplementedError

    def roles(self) -> dict[str, ModelRole]:
        raise NotImplementedError

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        raise NotImplementedError

    def takes(self, seed: dict) -> bool:
        """Whether `seed` has every field this stage needs (the others are quarantined before the run)."""
        return all(seed.get(name) for name in self.seed_fields)

    def fed_seeds(self, tables: dict[str, pa.Table]) -> list[dict]:
        """The shard's seeds this stage takes (`takes`), as rows."""
        return [seed for seed in tables["seeds"].to_pylist() if self.takes(seed)]

    def fingerprint(self) -> str:
        """A hash of the stage's configuration (its fields, model specs included) and of the source of every
        repository module its own module imports, transitively."""
        roots = {type(self).__module__, *(m for role in self.roles().values() for m in ROLE_MODULES[role.kind])}
        sources = [module_source(name) for name in sorted(set().union(*map(imported_modules, roots)))]
        return hashlib.sha256(json.dumps([repr(self), sources]).encode()).hexdigest()[:16]


def imported_modules(root: str) -> set[str]:
    """`root` and every repository module it imports, directly or through others (function-level imports
    included), read from the source without importing anything."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or module_path(name) is None:
            continue
        seen.add(name)
        todo += [m for m in _imports(name) if m.split(".")[0] == PACKAGE]
    return seen


def _imports(name: str) -> list[str]:
    """Modules named by `name`'s import statements; `from package import module` names both."""
    tree = ast.parse(module_source(name))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def module_path(name: str) -> Path | None:
    """The source file of repository module `name`, found without importing it (importing `serving.engine`
    would load vLLM just to hash a file): from the folder of its layer (`prefmill.<layer>`)."""
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != PACKAGE:
        return None
    spec = importlib.util.find_spec(".".join(parts[:2]))
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(spec.submodule_search_locations[0]).joinpath(*parts[2:])
    return next((p for p in (base.with_name(base.name + ".py"), base / "__init__.py") if p.is_file()), None)


def module_source(name: str) -> str:
    return module_path(name).read_text()
