"""A DuckLake catalog of versioned Parquet datasets: publish, read, time travel, SQL.

A publish writes each table as one Parquet file with pyarrow, then registers the files, the lineage rows and
the snapshot's lineage JSON in one DuckDB transaction (`ducklake_add_data_files`), so one DuckLake snapshot:
nothing is visible until the metadata commit, and several datasets land in the same snapshot or none.
A file written but never committed (a crash in between) is an orphan no snapshot references.

Where the metadata lives (a local `meta.ducklake` file or PostgreSQL for many concurrent writers), how publishes
exclude each other and when orphans are swept is the business of the catalog's metadata strategy
(`storage.metadata`); a commit that loses a race with another writer is retried here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from prefmill.schemas.config import config_hash
from prefmill.schemas.tables import conform
from prefmill.storage.columns import column_definitions, evolve_columns, match_columns
from prefmill.storage.errors import CatalogError
from prefmill.storage.metadata import COMMIT_ATTEMPTS, COMMIT_BACKOFF_S, LAKE, is_conflict, metadata_for, quote
from prefmill.storage.outputs import checked_output, outside, replacing
from prefmill.storage.postgres import redact
from prefmill.storage.sql_guard import Explain, SqlLimits, checked_select, duckdb_error, explained, run_bounded, sandbox

__all__ = ["Catalog", "CatalogError", "SqlLimits", "Version", "validate_name"]

LINEAGE_TABLE = "prefmill_lineage"
AUTHOR = "prefmill"
ROW_GROUP_ROWS = 122_880
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Version:
    dataset: str
    version: int
    rows_added: int
    row_count: int
    created_at: datetime
    lineage: dict[str, Any]


def validate_name(name: str) -> str:
    """Dataset names are plain identifiers: no paths, no quotes, no SQL."""
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("prefmill_"):
        raise CatalogError(
            f"invalid dataset name {name!r}: use lowercase letters, digits and '_', starting with a letter "
            "(at most 63 characters, not starting with 'prefmill_')"
        )
    return name


class Catalog:
    """A DuckLake catalog: Parquet files in `data_path`, metadata where `root` says (see `storage.metadata`): a
    catalog folder, or PostgreSQL (`root` = 'postgres:…' or a 'postgresql://' URL, see `storage.postgres`) with
    the data in `data_path` (default: under the prefmill home). `sql_limits` bounds each `sql()` query."""

    def __init__(self, root: Path | str | None = None, data_path: Path | str | None = None,
                 sql_limits: SqlLimits | None = None):
        self.metadata = metadata_for(root, data_path)
        self.root, self.data_path = self.metadata.root, self.metadata.data_path
        self.sql_limits = sql_limits or SqlLimits()
        self._kept: tuple[int, duckdb.DuckDBPyConnection] | None = None
        self._db_lock = threading.Lock()

    @property
    def location(self) -> str:
        """The catalog as error messages name it: its folder, or its PostgreSQL target (password hidden)."""
        return str(self.metadata)

    def exists(self) -> bool:
        """Whether the lake is there yet (its first publish creates it), wherever its metadata lives: callers ask
        this before reading a catalog that may be new, instead of looking at its files."""
        return self.metadata.exists(self._cursor)

    @contextlib.contextmanager
    def connect(self, write: bool = False, sandboxed: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A DuckDB connection with the lake attached as `lake` (read-only unless `write`); `sandboxed` gives a
        fresh DuckDB instance locked to reading the catalog's own files (see `storage.sql_guard.sandbox`). Held
        under the metadata's lock (`Metadata.lock`)."""
        with self.metadata.lock(write), self._sandboxed() if sandboxed else self._attached(write) as con:
            yield con

    @contextlib.contextmanager
    def _attached(self, write: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of this process's kept DuckDB instance, with the lake attached for this call only."""
        with self._cursor() as con:
            self.metadata.attach(con, write)
            con.execute(f"USE {LAKE}")
            try:
                yield con
            finally:
                with contextlib.suppress(duckdb.TransactionException):
                    con.execute("ROLLBACK")  # a caller's unfinished transaction would block the DETACH
                con.execute("USE memory")
                con.execute(f"DETACH {LAKE}")

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of this process's kept DuckDB instance, one thread at a time."""
        with self._db_lock, contextlib.closing(self._database().cursor()) as con:
            yield con

    @contextlib.contextmanager
    def _sandboxed(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A new DuckDB instance: the lake attached read-only, then the instance locked; closed at the end, so
        nothing a query created (temp tables, macros) outlives it. ~0.3 s, mostly loading the extension."""
        with contextlib.closing(self.metadata.new_database()) as con:
            self.metadata.attach(con, write=False, create=False)
            sandbox(con, self.data_path, self.sql_limits)
            con.execute(f"USE {LAKE}")
            yield con

    def publish(self, table: pa.Table, dataset: str, lineage: dict[str, Any] | None = None,
                schema: pa.Schema | None = None) -> Version:
        """Append `table` as a new version of `dataset` (one atomic snapshot) and return it."""
        return self.publish_many({dataset: table}, lineage, {dataset: schema} if schema else None)[dataset]

    def publish_many(self, tables: dict[str, pa.Table], lineage: dict[str, Any] | None = None,
                     schemas: dict[str, pa.Schema] | None = None) -> dict[str, Version]:
        """Append every table to its dataset in ONE snapshot (all visible together or none) and return each
        dataset's new version. `schemas` conforms the tables named in it first (`schemas.tables.conform`)."""
        if not tables:
            raise CatalogError("publish_many needs at least one table")
        tables = {validate_name(name): conform(t, schemas[name]) if schemas and schemas.get(name) else t
                  for name, t in tables.items()}
        info = snapshot_info(tables, lineage or {})
        with self.connect(write=True) as con, self.metadata.publishing(con):
            tables, added = self._fitted(con, tables, set(schemas or {}))
            files = {name: self._new_data_file(name) for name, t in tables.items() if t.num_rows}
            try:
                for name, path in files.items():
                    write_parquet(tables[name], path)
                self._commit_retrying(con, tables, files, info, added)
            except BaseException:
                for path in files.values():
                    path.unlink(missing_ok=True)
                raise
            # the snapshot this connection committed: with concurrent writers the newest may be another's
            (snapshot,) = con.execute(f"SELECT id FROM {LAKE}.last_committed_snapshot()").fetchone()
            mine = {v.dataset: v for versions in self._all_versions(con).values() for v in versions
                    if v.version == snapshot}
            return {name: mine[name] for name in tables}

    def versions(self, dataset: str) -> list[Version]:
        """Every version of `dataset`, oldest first."""
        validate_name(dataset)
        with self.connect() as con:
            return self._versions(con, dataset)

    def datasets(self) -> list[Version]:
        """The latest version of every dataset, by name."""
        with self.connect() as con:
            return [versions[-1] for _, versions in sorted(self._all_versions(con).items())]

    def find_run(self, run_id: str) -> dict[str, Version]:
        """The latest version each dataset got from the run `run_id` (lineage `run_id`); {} if none, so a
        flow can skip a publish its run already made."""
        with self.connect() as con:
            found = {name: [v for v in versions if v.lineage.get("run_id") == run_id]
                     for name, versions in self._all_versions(con).items()}
        return {name: versions[-1] for name, versions in sorted(found.items()) if versions}

    def read(self, dataset: str, version: int | None = None, columns: list[str] | None = None,
             with_version: bool = False) -> pa.Table:
        """The rows of `dataset` as of `version` (default: latest), only `columns` if given; `with_version`
        adds an int64 `_version` column: the version in which each row was published."""
        validate_name(dataset)
        with self.connect() as con:
            self._require(con, dataset, version)
            select = self._projection(con, dataset, columns)
            if with_version:
                select += ", snapshot_id AS _version"
            return con.execute(f'SELECT {select} FROM "{dataset}"{_at(version)}').arrow().read_all()

    def changes(self, dataset: str, from_version: int, to_version: int) -> pa.Table:
        """Rows inserted or deleted after `from_version` up to `to_version`, with DuckLake's `change_type`."""
        validate_name(dataset)
        with self.connect() as con:
            self._require(con, dataset, from_version)
            self._require(con, dataset, to_version)
            return con.execute(
                f"SELECT * FROM {LAKE}.table_changes(?, ?, ?) WHERE snapshot_id > ?",
                [dataset, from_version, to_version, from_version],
            ).arrow().read_all()

    def sql(self, query: str, explain: Explain | None = None) -> pa.Table:
        """Run one read-only SELECT over the lake in a fresh sandboxed DuckDB instance, within `sql_limits`;
        `explain` ('plan' or 'analyze') returns its EXPLAIN [ANALYZE] instead. A statement that writes,
        reconfigures or reads files outside the catalog is refused, and any DuckDB error raised, as `CatalogError`."""
        statement = checked_select(query)
        if explain:
            statement = explained(statement, explain)
        if not self.exists():
            raise CatalogError(f"no catalog yet at {self.location}: publish a dataset first (prefmill run), "
                               "or give --catalog the folder that holds meta.ducklake (or the PostgreSQL "
                               "database that holds the lake's metadata)")
        try:
            with self.connect(sandboxed=True) as con:
                return run_bounded(con, statement, self.sql_limits)
        except duckdb.Error as exc:  # the query's, or a limit DuckDB does not accept (--memory-limit lots)
            raise duckdb_error(exc, self.sql_limits) from None

    def export(self, dataset: str, path: Path | str, fmt: str, version: int | None = None,
               force: bool = False) -> Path:
        """Write one version as a Parquet file or JSON Lines that `datasets.load_dataset` reads. An existing file
        is replaced only with `force`, a path inside the catalog never; a failed export leaves no file behind."""
        formats = {"parquet": "(FORMAT parquet)", "jsonl": "(FORMAT json)"}
        if fmt not in formats:
            raise CatalogError(f"unknown export format {fmt!r}: use one of {sorted(formats)}")
        validate_name(dataset)
        target = self.checked_output(path, force)
        with self.connect() as con:
            self._require(con, dataset, version)
            with replacing(target) as tmp:
                select = f'SELECT * FROM "{dataset}"{_at(version)}'
                try:
                    con.execute(f"COPY ({select}) TO '{quote(tmp)}' {formats[fmt]}")
                except duckdb.Error as exc:
                    raise CatalogError(f"cannot write {target}: {str(exc).splitlines()[0]}") from None
        return target

    def checked_output(self, path: Path | str, force: bool = False) -> Path:
        """Where an output file may go, symlinks resolved: outside this catalog, not a folder, not an existing
        file unless `force` (see `storage.outputs`)."""
        return checked_output(path, force, self.root)

    def outside(self, path: Path | str) -> Path:
        """`path` resolved; refused when it lies inside this catalog (its metadata, data or lock files)."""
        return outside(path, self.root)

    def cleanup(self) -> list[Path]:
        """Delete the data files no snapshot references (left by a publish that died before its commit); on
        PostgreSQL only those older than `storage.metadata.ORPHAN_AGE`, since other machines may be mid-publish."""
        with self.connect(write=True) as con:
            return self.metadata.sweep_orphans(con)

    def _commit_retrying(self, con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table],
                         files: dict[str, Path], info: dict[str, Any], added: dict[str, list[pa.Field]]) -> None:
        """`_commit`, again after a pause when another writer's commit conflicted with it (DuckLake's own
        retries exhausted, or a table both created at once): bounded, with exponential backoff and jitter."""
        for attempt in range(COMMIT_ATTEMPTS):
            try:
                return self._commit(con, tables, files, info, added)
            except duckdb.TransactionException as exc:
                if not is_conflict(exc) or attempt == COMMIT_ATTEMPTS - 1:
                    raise CatalogError(f"publish to {self.location} failed after {attempt + 1} commit attempt(s) "
                                       f"({redact(str(exc)).splitlines()[0]})") from exc
            time.sleep(COMMIT_BACKOFF_S * 2 ** attempt * random.uniform(0.5, 1.5))

    def _database(self) -> duckdb.DuckDBPyConnection:
        """This process's DuckDB instance with ducklake loaded, kept between calls: loading the extension
        (signature check of a 36 MB binary) costs ~0.3 s, attaching the lake ~0.05 s. The lake is attached per
        call, under the metadata's lock. `sql()` never uses it: each query gets its own (`_sandboxed`)."""
        if self._kept is None or self._kept[0] != os.getpid():
            self._kept = (os.getpid(), self.metadata.new_database())
        return self._kept[1]

    def _fitted(self, con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], declared: set[str]
                ) -> tuple[dict[str, pa.Table], dict[str, list[pa.Field]]]:
        """Each table in its dataset's column order, checked by name and type against the existing columns.
        A table conformed to a declared schema (`declared`) may evolve its dataset: it adds the columns a
        newer schema version brings and leaves null the ones it retired. The columns to add, by dataset."""
        fitted, added = {}, {}
        for name, table in tables.items():
            existing = con.execute(f'SELECT * FROM "{name}" LIMIT 0').arrow().schema if self._exists(con, name) \
                else None
            if existing is None:
                fitted[name] = table
            elif name in declared:
                fitted[name], added[name] = evolve_columns(name, table, existing)
            else:
                fitted[name] = match_columns(name, table, existing)
        return fitted, added

    def _new_data_file(self, dataset: str) -> Path:
        """A fresh file name in the dataset's data folder; what is written there stays invisible until
        `_commit` registers it."""
        path = self.data_path / "main" / dataset / f"prefmill-{uuid.uuid4().hex}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _commit(self, con: duckdb.DuckDBPyConnection, tables: dict[str, pa.Table], files: dict[str, Path],
                info: dict[str, Any], added: dict[str, list[pa.Field]]) -> None:
        """One transaction, so one snapshot: create missing tables and columns, register the files, add the
        lineage."""
        con.execute("BEGIN")
        try:
            con.execute(f"CREATE TABLE IF NOT EXISTS {LINEAGE_TABLE} "
                        "(dataset VARCHAR, rows_added BIGINT, created_at VARCHAR, lineage VARCHAR)")
            for name, table in tables.items():
                con.execute(f'CREATE TABLE IF NOT EXISTS "{name}" ({column_definitions(table.schema)})')
            for name, fields in added.items():
                for column in (column_definitions(pa.schema([field])) for field in fields):
                    con.execute(f'ALTER TABLE "{name}" ADD COLUMN IF NOT EXISTS {column}')
            for name, path in files.items():
                con.execute("CALL ducklake_add_data_files(?, ?, ?)", [LAKE, name, str(path)])
            con.executemany(f"INSERT INTO {LINEAGE_TABLE} VALUES (?, ?, ?, ?)", _lineage_rows(info))
            con.execute(f"CALL {LAKE}.set_commit_message(?, ?, extra_info => ?)",
                        [AUTHOR, f"publish {', '.join(tables)}", json.dumps(info, default=str)])
            con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise

    def _all_versions(self, con: duckdb.DuckDBPyConnection) -> dict[str, list[Version]]:
        """Every dataset's versions, from the lineage JSON of the snapshots prefmill committed."""
        rows = con.execute(f"SELECT snapshot_id, commit_extra_info FROM {LAKE}.snapshots() "
                           "WHERE author = ? ORDER BY snapshot_id", [AUTHOR]).fetchall()
        versions: dict[str, list[Version]] = defaultdict(list)
        for snapshot_id, extra_info in rows:
            info = _parse_info(extra_info)
            for name, part in info["datasets"].items():
                total = (versions[name][-1].row_count if versions[name] else 0) + part["rows_added"]
                versions[name].append(Version(name, snapshot_id, part["rows_added"], total,
                                              datetime.fromisoformat(info["lineage"]["created_at"]),
                                              {**info["lineage"], "dataset": name, **part}))
        return dict(versions)

    def _versions(self, con: duckdb.DuckDBPyConnection, dataset: str) -> list[Version]:
        versions = self._all_versions(con).get(dataset)
        if not versions:
            raise CatalogError(f"no dataset named {dataset!r} in {self.location}")
        return versions

    def _require(self, con: duckdb.DuckDBPyConnection, dataset: str, version: int | None) -> None:
        known = [v.version for v in self._versions(con, dataset)]
        if version is not None and version not in known:
            raise CatalogError(f"dataset {dataset!r} has no version {version}; versions: {known}")

    def _exists(self, con: duckdb.DuckDBPyConnection, dataset: str) -> bool:
        return bool(con.execute("SELECT 1 FROM information_schema.tables WHERE table_catalog = ? AND "
                                "table_name = ?", [LAKE, dataset]).fetchall())

    def _projection(self, con: duckdb.DuckDBPyConnection, dataset: str, columns: list[str] | None) -> str:
        if columns is None:
            return "*"
        names = con.execute(f'SELECT * FROM "{dataset}" LIMIT 0').arrow().schema.names
        unknown = [c for c in columns if c not in names]
        if unknown:
            raise CatalogError(f"dataset {dataset!r} has no column {unknown[0]!r}; columns: {names}")
        return ", ".join(f'"{c}"' for c in columns)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a data file: row groups of DuckDB's own size (its scans parallelise by row group; pyarrow's
    default is one group per 1Mi rows), and min/max statistics only on scalar columns: a vector's floats
    or a message's text prune nothing, and computing them costs ~0.3 s CPU per 200k × 384-d vectors."""
    scalar = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
    pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS, write_statistics=scalar)
    durable(path)


def durable(path: Path) -> None:
    """Flush a written data file and its folder entry to disk before a commit references it: after a power
    loss (not only a killed process) a committed version never points at a file that is not all there."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def snapshot_info(tables: dict[str, pa.Table], lineage: dict[str, Any]) -> dict[str, Any]:
    """What one snapshot records: the caller's lineage (run_id, config, models, parents, …) plus the config
    hash and creation time, and per dataset the rows added and the schema tag."""
    common = {**lineage, "created_at": datetime.now(timezone.utc).isoformat()}
    if "config" in lineage and "config_hash" not in lineage:
        common["config_hash"] = config_hash(lineage["config"])
    datasets = {name: {"rows_added": t.num_rows, "schema": _schema_tag(t.schema)} for name, t in tables.items()}
    return {"lineage": common, "datasets": datasets}


def _parse_info(extra_info: str) -> dict[str, Any]:
    """A snapshot's info as `snapshot_info` writes it; snapshots from before `publish_many` hold one dataset's
    flat record ({dataset, rows_added, schema, …lineage}), so catalogs written then still read."""
    info = json.loads(extra_info)
    if "datasets" in info:
        return info
    dataset, part = info.pop("dataset"), {"rows_added": info.pop("rows_added"), "schema": info.pop("schema", None)}
    return {"lineage": info, "datasets": {dataset: part}}


def _lineage_rows(info: dict[str, Any]) -> list[list[Any]]:
    """One `prefmill_lineage` row per dataset of the snapshot."""
    created = info["lineage"]["created_at"]
    return [[name, part["rows_added"], created, json.dumps({**info["lineage"], "dataset": name, **part},
                                                           default=str)]
            for name, part in info["datasets"].items()]


def _at(version: int | None) -> str:
    return "" if version is None else f" AT (VERSION => {int(version)})"


def _schema_tag(schema: pa.Schema) -> str | None:
    meta = schema.metadata or {}
    name, version = meta.get(b"prefmill.schema"), meta.get(b"prefmill.schema_version")
    return f"{name.decode()}@{version.decode()}" if name and version else None
