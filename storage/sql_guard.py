"""What makes `Catalog.sql` read the catalog and nothing else, within bounds.

Two independent layers:
1. `checked_select` parses the query before it runs (DuckDB's own parser; no text is re-parsed here): exactly
   one statement, of type SELECT, calling only table functions from an allowlist. DuckLake's maintenance
   functions are plain table functions, and some act even through a READ_ONLY attach
   (`ducklake_cleanup_old_files` deletes data files), so a SELECT is not harmless by its statement type alone.
   EXPLAIN is not accepted in the query: `explained` wraps the checked statement's own parsed text.
2. `sandbox` locks a fresh DuckDB instance (one per query, so nothing a query leaves behind reaches the next):
   no spilling to a temp folder, files only under the catalog's data folder, no setting change
   (`lock_configuration`), bounded memory and threads; the caller attaches the lake READ_ONLY before it.
   The postgres extension's `postgres_scan`/`postgres_query` functions do not check external access, so for
   a lake on PostgreSQL the allowlist of layer 1 is the only guard against them.
`run_bounded` stops a query at its time limit or at Ctrl-C (`DuckDBPyConnection.interrupt()`).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import duckdb
import pyarrow as pa

from prefmill.storage.errors import CatalogError

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
_READ_ONLY = "`prefmill sql` is read-only and reads only the catalog"
Explain = Literal["plan", "analyze"]


def _default_memory() -> str:
    """Half the machine's RAM: a query may not starve the pipeline (or the desktop) it runs beside."""
    return f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2 // 2**20}MiB"


@dataclass(frozen=True)
class SqlLimits:
    """Bounds of one `Catalog.sql` query: wall time, DuckDB memory (no spilling to disk) and threads."""

    timeout_s: float = 300.0
    memory: str = field(default_factory=_default_memory)
    threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))


def checked_select(query: str) -> Any:
    """The one SELECT statement of `query` (DuckDB's parsed statement) after checking its table functions;
    anything else raises `CatalogError`."""
    statements = _statements(query)
    _refuse_other_than_one_select(statements)
    _check_table_functions(statements[0].query)
    return statements[0]


def checked_condition(condition: str) -> str:
    """A `WHERE` condition as DuckDB's parser prints it back: one expression, nothing after it (comments gone).
    One that does not parse is checked as `SELECT * FROM t WHERE (condition)` first, so that a statement
    smuggled after it is named."""
    try:
        return str(duckdb.SQLExpression(condition))
    except duckdb.Error as exc:
        checked_select(f"SELECT * FROM t WHERE ({condition})")
        raise CatalogError(f"refused: the condition must be one SQL expression ({_first_line(exc)})") from None


def explained(statement: Any, explain: Explain) -> Any:
    """`EXPLAIN [ANALYZE]` of a checked SELECT, built from the parser's text of that statement (never the user's
    whole string) and parsed again: it must be exactly one EXPLAIN statement."""
    keywords = {"plan": "EXPLAIN", "analyze": "EXPLAIN ANALYZE"}
    if explain not in keywords:
        raise CatalogError(f"unknown explain mode {explain!r}: use 'plan' or 'analyze'")
    wrapped = _statements(f"{keywords[explain]} {statement.query}")
    if [s.type.name for s in wrapped] != ["EXPLAIN"]:
        raise CatalogError(f"refused: this query cannot be explained; {_READ_ONLY}")
    return wrapped[0]


def sandbox(con: duckdb.DuckDBPyConnection, data_path: Path, limits: SqlLimits) -> None:
    """Lock a DuckDB instance for good: no temp folder (DuckDB would let queries read and write it), files
    only under `data_path` (plus the attached metadata files, which DuckDB itself allows), no other external
    access, bounded memory and threads, settings frozen."""
    con.execute("SET temp_directory = ''")
    con.execute(f"SET memory_limit = '{_quote(limits.memory)}'")
    con.execute(f"SET threads = {int(limits.threads)}")
    con.execute(f"SET allowed_directories = ['{_quote(data_path)}/']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_bounded(con: duckdb.DuckDBPyConnection, statement: Any, limits: SqlLimits) -> pa.Table:
    """Run `statement` in a worker thread, so this thread stays free to stop it: at the time limit, or at
    Ctrl-C (a KeyboardInterrupt here), DuckDB is interrupted and the worker waited for."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: con.execute(statement).arrow().read_all())
        try:
            return future.result(timeout=limits.timeout_s)
        except concurrent.futures.TimeoutError:
            _interrupt(con, future)
            raise CatalogError(f"query stopped at the time limit ({limits.timeout_s:g} s): raise it with "
                               "--timeout SECONDS (Python: Catalog(..., sql_limits=SqlLimits(timeout_s=…)))") from None
        except BaseException:
            _interrupt(con, future)
            raise


def duckdb_error(exc: duckdb.Error, limits: SqlLimits) -> CatalogError:
    """A DuckDB error as a `CatalogError`: which limit was hit and how to raise it, or DuckDB's message without
    the C++ stack trace an internal error carries."""
    if isinstance(exc, duckdb.OutOfMemoryException):
        return CatalogError(f"query needs more memory than its limit ({limits.memory}): raise it with "
                            "--memory-limit (e.g. 8GiB), or select fewer rows/columns")
    if isinstance(exc, duckdb.PermissionException):
        return CatalogError(f"refused: `prefmill sql` reads only the catalog's own files ({_first_line(exc)})")
    if isinstance(exc, duckdb.InternalException):
        return CatalogError(f"DuckDB could not run this query (an internal error: {_first_line(exc)}); "
                            "check its arguments, e.g. a NULL in AT (VERSION => …)")
    return CatalogError(f"{type(exc).__name__}: {_without_stack_trace(exc)}")


def _interrupt(con: duckdb.DuckDBPyConnection, future: concurrent.futures.Future) -> None:
    """Interrupt until the worker is done: an interrupt that lands before DuckDB starts the query is lost."""
    while not future.done():
        con.interrupt()
        concurrent.futures.wait([future], timeout=0.05)


def _statements(query: str) -> list[Any]:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as exc:
        raise CatalogError(f"cannot parse SQL: {exc}") from None


def _refuse_other_than_one_select(statements: list[Any]) -> None:
    """Name what is refused truthfully: an empty query, EXPLAIN (an option), a writing statement type, a
    PIVOT that would first create a type, or a second statement."""
    types = [s.type.name for s in statements]
    if not types:
        raise CatalogError("empty query: write one SELECT (comments alone are no query)")
    if types == ["EXPLAIN"]:
        raise CatalogError("refused: EXPLAIN is an option, not part of the query: `prefmill sql --explain "
                           "[--analyze] \"SELECT …\"` (Python: Catalog.sql(query, explain='plan' or 'analyze'))")
    if types[0] == "CREATE" and types[1:] == ["SELECT"] and not statements[0].query:
        raise CatalogError("refused: this PIVOT first creates an ENUM type of the values it finds; list them "
                           "instead, e.g. PIVOT t ON b IN ('x', 'y') USING sum(a)")
    other = next((t for t in types if t != "SELECT"), None)
    if other:
        raise CatalogError(f"refused: {other} statements change the catalog or the session; {_READ_ONLY} "
                           "(publish data through the pipeline instead)")
    if len(types) > 1:
        raise CatalogError(f"refused: {len(types)} statements; `prefmill sql` runs one SELECT at a time")


def _check_table_functions(select: str) -> None:
    for name in _table_functions(_serialized(select)):
        if name.lower() not in ALLOWED_TABLE_FUNCTIONS:
            raise CatalogError(f"refused: table function {name}() may write, run other SQL or read outside the "
                               f"catalog; {_READ_ONLY}")


def _serialized(select: str) -> Any:
    """DuckDB's parse tree of one SELECT as JSON; a tree too deep for Python's JSON reader is refused."""
    with duckdb.connect() as con:
        text = con.execute("SELECT json_serialize_sql(?)", [select]).fetchone()[0]
    try:
        tree = json.loads(text)
    except RecursionError:
        raise CatalogError("refused: the query nests too deeply to be checked (e.g. hundreds of nested "
                           "subqueries); flatten it with CTEs") from None
    if tree.get("error"):
        raise CatalogError(f"refused: cannot check this query ({tree.get('error_message')}); {_READ_ONLY}")
    return tree


def _table_functions(root: Any) -> Iterator[str]:
    """Every table function called anywhere in a serialized query (subqueries, CTEs, joins, AT clauses),
    walked without recursion: a deep tree must not exhaust Python's stack."""
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                yield node["function"]["function_name"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _without_stack_trace(exc: BaseException) -> str:
    return str(exc).split("\n\nStack Trace")[0].strip()


def _first_line(exc: BaseException) -> str:
    return _without_stack_trace(exc).splitlines()[0]


def _quote(path: Path | str) -> str:
    return str(path).replace("'", "''")
