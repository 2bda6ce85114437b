"""What makes `Catalog.sql` read the catalog and nothing else.

Two independent layers:
1. `check_read_only` parses the query before it runs: only SELECT (and EXPLAIN [ANALYZE] of a SELECT), and
   only table functions from an allowlist. DuckLake's maintenance functions are plain table functions, and
   some act even through a READ_ONLY attach (`ducklake_cleanup_old_files` deletes data files), so a SELECT
   is not harmless by its statement type alone.
2. `sandbox` locks the DuckDB instance: no file access outside the catalog's data folder and metadata
   files, no setting change (`lock_configuration`); the caller attaches the lake READ_ONLY. A lake on
   PostgreSQL is attached before the sandbox (the postgres extension refuses to attach without external
   access); its `postgres_scan`/`postgres_query` functions do not check external access, so for them the
   allowlist of layer 1 is the only guard (its metadata database is attached read-only all the same).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import duckdb

from storage.errors import CatalogError

# DuckLake functions that only read metadata; callable as `ducklake_<name>(...)` or `lake.<name>(...)`
_LAKE_READERS = {"snapshots", "table_changes", "table_insertions", "table_deletions", "table_info", "list_files",
                 "current_snapshot", "last_committed_snapshot", "options", "settings"}
_READERS = {
    "range", "generate_series", "unnest", "repeat", "repeat_row", "json_each", "json_tree",
    "read_parquet", "parquet_scan", "parquet_metadata", "parquet_schema", "parquet_file_metadata",
    "parquet_kv_metadata", "pragma_table_info", "pragma_show", "pragma_version", "duckdb_columns",
    "duckdb_constraints", "duckdb_databases", "duckdb_functions", "duckdb_indexes", "duckdb_keywords",
    "duckdb_schemas", "duckdb_settings", "duckdb_tables", "duckdb_types", "duckdb_views", "summary",
}
ALLOWED_TABLE_FUNCTIONS = frozenset(_READERS | _LAKE_READERS | {f"ducklake_{name}" for name in _LAKE_READERS})
_EXPLAIN = re.compile(r"^\s*(?:(?:--[^\n]*(?:\n|$)|/\*.*?\*/)\s*)*EXPLAIN\s+(?:ANALYZE\s+)?(?P<rest>.*)$",
                      re.IGNORECASE | re.DOTALL)
_READ_ONLY = "`prefmill sql` is read-only and reads only the catalog"


def check_read_only(query: str) -> None:
    """Raise `CatalogError` unless every statement of `query` is a SELECT (or EXPLAIN [ANALYZE] of one)
    whose table functions are all on the allowlist."""
    for statement in _statements(query):
        select = _explained(statement) if statement.type.name == "EXPLAIN" else statement
        if select.type.name != "SELECT":
            raise CatalogError(f"refused: {select.type.name} statements change the catalog or the session; "
                               f"{_READ_ONLY} (publish data through the pipeline instead)")
        _check_table_functions(select.query)


def sandbox(con: duckdb.DuckDBPyConnection, data_path: Path, meta_files: list[Path]) -> None:
    """Lock a DuckDB instance for good: files only under `data_path` plus the lake's metadata files (so the
    lake can be attached read-only again for each query), no other external access, settings frozen."""
    con.execute(f"SET allowed_directories = ['{_quote(data_path)}/']")
    paths = ", ".join(f"'{_quote(path)}'" for path in meta_files)
    con.execute(f"SET allowed_paths = [{paths}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def _statements(query: str) -> list[Any]:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError(f"cannot parse SQL: {exc}") from exc


def _explained(statement: Any) -> Any:
    """The statement under `EXPLAIN [ANALYZE]`; other EXPLAIN forms are refused."""
    match = _EXPLAIN.match(statement.query)
    try:
        inner = duckdb.extract_statements(match["rest"]) if match else []
    except duckdb.Error:
        inner = []
    if len(inner) != 1:
        raise CatalogError(f"refused: only `EXPLAIN [ANALYZE] SELECT …` is supported; {_READ_ONLY}")
    return inner[0]


def _check_table_functions(select: str) -> None:
    with duckdb.connect() as con:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [select]).fetchone()[0])
    if tree.get("error"):
        raise CatalogError(f"refused: cannot check this query ({tree.get('error_message')}); {_READ_ONLY}")
    for name in _table_functions(tree):
        if name.lower() not in ALLOWED_TABLE_FUNCTIONS:
            raise CatalogError(f"refused: table function {name}() may write, run other SQL or read outside the "
                               f"catalog; {_READ_ONLY}")


def _table_functions(node: Any) -> Iterator[str]:
    """Every table function called anywhere in a serialized query (subqueries, CTEs and joins included)."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            yield node["function"]["function_name"]
        for value in node.values():
            yield from _table_functions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _table_functions(value)


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")
