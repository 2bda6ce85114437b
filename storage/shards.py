"""The resume store: finished stage × shard results, content-addressed, so a re-run computes only the rest.

A key names what a result depends on (the stage's fingerprint and the digests of the tables it consumed),
never a run id, so the same work is found again by any later run, after a crash or not. A result is a folder
of Arrow IPC files (one per table) plus `meta.json` (its cost), written under a temporary name, flushed and
renamed into place: a killed writer leaves no half result that a reader could take. Arrow files, not pickles,
so a shared results folder cannot run code in the process that reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

META = "meta.json"


@dataclass(frozen=True)
class StoredShard:
    """What the store keeps of one stage × shard: its tables and what computing them cost."""

    tables: dict[str, pa.Table]
    meta: dict[str, Any]


class ShardStore:
    """Stage × shard results under `root`, by key."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def get(self, key: str) -> StoredShard | None:
        """The result stored under `key`, or None when there is none (yet)."""
        folder = self.root / key
        if not (folder / META).exists():
            return None
        meta = json.loads((folder / META).read_text())
        tables = {name: _read(folder / f"{index}.arrow") for index, name in enumerate(meta["tables"])}
        return StoredShard(tables, meta["meta"])

    def put(self, key: str, shard: StoredShard) -> None:
        """Store `shard` under `key` atomically; a result another writer stored first is kept."""
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        temporary.mkdir()
        try:
            for index, table in enumerate(shard.tables.values()):
                _write(table, temporary / f"{index}.arrow")
            _write_text(temporary / META, json.dumps({"tables": list(shard.tables), "meta": shard.meta}))
            _fsync(temporary)
            os.rename(temporary, self.root / key)
            _fsync(self.root)
        except OSError:
            if not (self.root / key / META).exists():
                raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


def _read(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _write(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    _fsync(path)


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
