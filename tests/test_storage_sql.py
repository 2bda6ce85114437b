"""`Catalog.sql` reads the catalog and nothing else: no file outside it, no write, no setting change."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.storage.catalog import Catalog, CatalogError, SqlLimits
from prefmill.storage.sql_guard import checked_select, explained
from tests.test_storage import pairs


@pytest.fixture
def catalog(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    catalog.publish(pairs(2), "pairs")
    catalog.publish(pairs(3, offset=2), "pairs")
    return catalog


REPO = Path(__file__).resolve().parents[1]
NESTED = "/* /* */ EXPLAIN SELECT 1 -- */ EXPLAIN ANALYZE "  # the regex saw `EXPLAIN SELECT 1`; DuckDB ran the rest


@pytest.mark.parametrize("template", [
    "EXPLAIN ANALYZE COPY (SELECT * FROM pairs) TO '{out}'",
    "EXPLAIN COPY (SELECT * FROM pairs) TO '{out}'",
    "/* hi */ EXPLAIN ANALYZE COPY pairs TO '{out}' (FORMAT parquet)",
    "EXPLAIN (FORMAT json) COPY pairs TO '{out}'",
    NESTED + "COPY (SELECT 1 AS x) TO '{out}' (FORMAT csv, USE_TMP_FILE false)",
    NESTED + "COPY (SELECT 1 AS x) TO '{meta}' (FORMAT csv, USE_TMP_FILE false)",
    "EXPLAIN SELECT 1",
])
def test_user_written_explain_is_refused_pointing_to_the_option(catalog, tmp_path, template):
    out, meta = tmp_path / "leak.csv", catalog.metadata.path
    before = meta.read_bytes()
    with pytest.raises(CatalogError, match="EXPLAIN is an option, not part of the query: `prefmill sql --explain"):
        catalog.sql(template.format(out=out, meta=meta))
    assert not out.exists() and meta.read_bytes() == before
    assert catalog.read("pairs").num_rows == 5


@pytest.mark.parametrize("statement", [
    "SET threads = 1", "DELETE FROM pairs", "INSERT INTO pairs SELECT * FROM pairs",
    "CREATE TABLE t AS SELECT 1", "CREATE TEMP TABLE t AS SELECT 1", "CALL lake.set_commit_message('a', 'b')",
])
def test_only_a_select_runs_and_explain_cannot_wrap_anything_else(catalog, statement):
    for explain in (None, "plan", "analyze"):
        with pytest.raises(CatalogError, match="read-only"):
            catalog.sql(statement, explain=explain)
    assert catalog.read("pairs").num_rows == 5


def test_the_explain_option_explains_the_checked_select(catalog):
    plan = catalog.sql("SELECT count(*) FROM pairs", explain="plan").to_pylist()
    assert plan and "physical_plan" in plan[0]["explain_key"]
    analyzed = catalog.sql("-- note\n/* /* nested */ */ SELECT count(*) FROM pairs", explain="analyze")
    assert "analyzed_plan" in analyzed.to_pylist()[0]["explain_key"]
    with pytest.raises(CatalogError, match="unknown explain mode 'verbose'"):
        catalog.sql("SELECT 1", explain="verbose")


def test_explained_wraps_the_parsers_text_and_parses_it_again():
    statement = explained(checked_select("/* /* */ SELECT 1 -- */ SELECT 2"), "analyze")
    assert statement.type.name == "EXPLAIN" and statement.query.startswith("EXPLAIN ANALYZE /* /* */ SELECT 1")


@pytest.mark.parametrize("query, message", [
    ("", "empty query"), (";", "empty query"), ("/* x */", "empty query"), ("-- x", "empty query"),
    ("SELECT 1; SELECT 2", "refused: 2 statements; `prefmill sql` runs one SELECT at a time"),
    ("SELECT 1; DROP TABLE pairs", "refused: DROP statements change the catalog"),
    ("PIVOT pairs ON seed_id USING count(*)", "this PIVOT first creates an ENUM type .* list them instead"),
    ("SELECT " + "(SELECT " * 250 + "1" + ")" * 250, "nests too deeply to be checked"),
    ("SELECT * FROM pairs AT (VERSION => NULL)", r"DuckDB could not run this query \(an internal error: .*NULL"),
])
def test_odd_queries_get_one_clear_error(catalog, query, message):
    with pytest.raises(CatalogError, match=message) as error:
        catalog.sql(query)
    assert "Stack Trace" not in str(error.value) and len(str(error.value).splitlines()) == 1


def test_a_pivot_with_its_values_listed_runs(catalog):
    rows = catalog.sql("PIVOT (SELECT seed_id FROM pairs) ON seed_id IN ('s0', 's1') USING count(*)").to_pylist()
    assert rows == [{"s0": 2, "s1": 2}]


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_csv('/etc/passwd', delim=':', header=false)",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_blob('/etc/hostname')",
    "SELECT * FROM read_parquet('{outside}')",
    "SELECT * FROM query('SELECT * FROM read_text(''/etc/hostname'')')",
])
def test_sql_reads_no_file_outside_the_catalog(catalog, tmp_path, query):
    outside = tmp_path / "outside.parquet"
    catalog.export("pairs", outside, "parquet")
    secret = open("/etc/hostname").read().strip()
    with pytest.raises(CatalogError) as err:
        catalog.sql(query.format(outside=outside))
    assert secret not in str(err.value)


def test_a_file_path_as_a_table_is_not_read(catalog):
    """Replacement scans (`FROM 'file'`) are off in the sandbox: the path is just an unknown table."""
    with pytest.raises(CatalogError, match="CatalogException: .*does not exist"):
        catalog.sql("SELECT * FROM '/etc/passwd'")


@pytest.mark.parametrize("query", [
    "SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)",
    "SELECT * FROM lake.cleanup_old_files(cleanup_all => true)",
    "SELECT * FROM ducklake_delete_orphaned_files('lake', cleanup_all => true)",
    "SELECT * FROM ducklake_expire_snapshots('lake', versions => [1])",
    "SELECT * FROM (SELECT 1) t, LATERAL ducklake_merge_adjacent_files('lake')",
    "WITH x AS (SELECT * FROM ducklake_set_option('lake', 'data_inlining_row_limit', 10)) SELECT * FROM x",
    "SELECT * FROM json_execute_serialized_sql('{}')",
    "SELECT * FROM force_checkpoint()",
])
def test_sql_refuses_maintenance_functions(catalog, query):
    with pytest.raises(CatalogError, match="read-only"):
        catalog.sql(query)


def test_a_read_only_select_cannot_delete_data_files(catalog):
    """DuckLake's cleanup deletes scheduled files even through a READ_ONLY attach: the guard stops it."""
    with catalog.connect(write=True) as con:
        con.execute("DELETE FROM pairs")
        con.execute("CALL ducklake_expire_snapshots('lake', older_than => now())")
    files = sorted(catalog.data_path.rglob("*.parquet"))
    with pytest.raises(CatalogError):
        catalog.sql("SELECT * FROM ducklake_cleanup_old_files('lake', cleanup_all => true)")
    assert sorted(catalog.data_path.rglob("*.parquet")) == files


@pytest.mark.parametrize("query", [
    "SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM glob('/etc/*')", "SET threads = 1",
    "SET enable_external_access = true", "RESET lock_configuration", "COPY (SELECT 1) TO '{out}'",
    "ATTACH '{out}' AS other",
])
def test_the_sandboxed_connection_holds_without_the_statement_check(catalog, tmp_path, query):
    """Second line of defence: even a statement the parser check missed cannot leave the catalog."""
    out = tmp_path / "x.out"
    with catalog.connect(sandboxed=True) as con:
        with pytest.raises(duckdb.Error):
            con.execute(query.format(out=out))
    assert not out.exists()


def test_time_travel_snapshots_and_changes_still_work(catalog):
    first, second = catalog.versions("pairs")
    n = catalog.sql(f"SELECT count(*) AS n FROM pairs AT (VERSION => {first.version})").to_pylist()
    assert n == [{"n": 2}]
    snaps = catalog.sql("SELECT snapshot_id FROM lake.snapshots() WHERE commit_extra_info IS NOT NULL")
    assert snaps.column(0).to_pylist() == [first.version, second.version]
    changes = catalog.sql(f"SELECT pair_id FROM lake.table_changes('pairs', {second.version}, {second.version}) "
                          "ORDER BY pair_id")
    assert changes.column(0).to_pylist() == ["p2", "p3", "p4"]
    inserted = catalog.sql(f"SELECT count(*) AS n FROM ducklake_table_insertions('lake', 'main', 'pairs', "
                           f"{first.version}, {second.version})")
    assert inserted.to_pylist() == [{"n": 5}]
    assert catalog.sql("SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'pairs'").to_pylist() == [{"n": 1}]
    assert catalog.sql("DESCRIBE pairs").num_rows > 0 and catalog.sql("SHOW TABLES").num_rows > 0


def test_sql_can_read_the_catalogs_own_parquet_files(catalog):
    files = [str(p) for p in catalog.data_path.rglob("*.parquet") if "pairs" in p.parts]
    n = catalog.sql(f"SELECT count(*) AS n FROM read_parquet({files!r})").to_pylist()
    assert n == [{"n": 5}]


def test_sql_sees_each_new_publish(catalog):
    """Each query gets a new DuckDB instance with the lake attached afresh."""
    assert catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 5}]
    catalog.publish(pairs(1, offset=5), "pairs")
    assert catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 6}]
    with pytest.raises(CatalogError):
        catalog.sql("SELECT * FROM read_text('/etc/hostname')")
    assert catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 6}]


def test_each_call_starts_clean(catalog):
    """What one instance held (here made through the raw sandboxed connection) is gone for the next query."""
    with catalog.connect(sandboxed=True) as con:
        con.execute("CREATE TABLE memory.main.kept AS SELECT 1 AS a")
        con.execute("CREATE TEMP TABLE kept_temp AS SELECT 1 AS a")
        con.execute("CREATE TEMP MACRO kept_macro() AS 42")
    for query in ("SELECT * FROM memory.main.kept", "SELECT * FROM temp.kept_temp", "SELECT kept_macro()"):
        with pytest.raises(CatalogError, match="does not exist"):
            catalog.sql(query)


def test_the_temp_folder_of_the_working_directory_is_not_readable(catalog, tmp_path, monkeypatch):
    """DuckDB used to allow its temp folder (`.tmp` in the working directory) to every query."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    pq.write_table(pa.table({"secret": ["s3cr3t"]}), tmp_path / ".tmp" / "s.parquet")
    for path in (".tmp/s.parquet", str(tmp_path / ".tmp" / "s.parquet")):
        with pytest.raises(CatalogError, match="reads only the catalog's own files"):
            catalog.sql(f"SELECT * FROM read_parquet('{path}')")


def test_the_sandbox_settings_in_effect(catalog):
    limits = SqlLimits(timeout_s=5, memory="256MiB", threads=1)
    rows = Catalog(catalog.root, sql_limits=limits).sql(
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('allowed_directories', 'allowed_paths', "
        "'temp_directory', 'enable_external_access', 'lock_configuration', 'memory_limit', 'threads')")
    settings = {row["name"]: row["value"] for row in rows.to_pylist()}
    meta = str(catalog.metadata.path)
    assert settings.pop("allowed_directories") == f"[{catalog.data_path}/]"
    assert sorted(settings.pop("allowed_paths").strip("[]").split(", ")) == [
        meta, f"{meta}.wal", f"{meta}.wal.checkpoint", f"{meta}.wal.recovery"]  # DuckDB adds attached files
    assert settings == {"temp_directory": "", "enable_external_access": "false", "lock_configuration": "true",
                        "memory_limit": "256.0 MiB", "threads": "1"}


@pytest.mark.parametrize("query", [
    "SELECT count(*) FROM range(1000000000000)",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT max(n) FROM r",
    "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = -1",
])
def test_a_query_stops_at_its_time_limit(catalog, query):
    bounded = Catalog(catalog.root, sql_limits=SqlLimits(timeout_s=1, memory="512MiB"))
    started = time.monotonic()
    with pytest.raises(CatalogError, match=r"time limit \(1 s\): raise it with --timeout|more memory than its limit"):
        bounded.sql(query)
    assert time.monotonic() - started < 15


def test_a_query_stops_at_its_memory_limit(catalog):
    bounded = Catalog(catalog.root, sql_limits=SqlLimits(memory="64MiB"))
    with pytest.raises(CatalogError, match=r"more memory than its limit \(64MiB\): raise it with --memory-limit"):
        bounded.sql("SELECT list(range) FROM range(100000000)")


def test_ctrl_c_stops_a_running_query_at_once(catalog):
    proc = subprocess.Popen([sys.executable, "-m", "prefmill.flows.cli", "sql",
                             "SELECT count(*) FROM range(1000000000000)", "--catalog", str(catalog.root)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    time.sleep(4)  # imports, the extension and the attach take ~2 s
    assert proc.poll() is None, "the query ended by itself"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5 and proc.returncode == 130
    assert "interrupted: the query was stopped" in out and "Traceback" not in out


def test_cli_sql_explain_timeout_and_a_query_starting_with_a_dash(catalog):
    assert "physical_plan" in _cli("sql", "SELECT count(*) FROM pairs", "--explain", "--format", "json",
                                   "--catalog", str(catalog.root))
    assert "analyzed_plan" in _cli("sql", "-- how many\nSELECT count(*) FROM pairs", "--explain", "--analyze",
                                   "--format", "json", "--catalog", str(catalog.root))
    assert "empty query" in _cli("sql", "-- x", "--catalog", str(catalog.root), code=2)
    assert "--analyze goes with --explain" in _cli("sql", "SELECT 1", "--analyze", code=2)
    out = _cli("sql", "SELECT count(*) FROM range(1000000000000)", "--timeout", "1", "--catalog",
               str(catalog.root), code=2)
    assert "time limit (1 s): raise it with --timeout" in out
    assert "Memory must have a number" in _cli("sql", "SELECT 1", "--memory-limit", "lots", "--catalog",
                                               str(catalog.root), code=2)


def test_cli_sql_output_refuses_existing_catalog_and_folder_paths(catalog, tmp_path):
    out, root = tmp_path / "n.json", str(catalog.root)
    query = "SELECT count(*) AS n FROM pairs"
    _cli("sql", query, "--format", "json", "-o", str(out), "--catalog", root)
    assert json.loads(out.read_text()) == {"n": 5}
    assert f"{out} exists: choose another name, or add --force" in _cli(
        "sql", "SELECT 0 AS n", "--format", "json", "-o", str(out), "--catalog", root, code=2)
    assert json.loads(out.read_text()) == {"n": 5}
    _cli("sql", "SELECT 0 AS n", "--format", "json", "-o", str(out), "--force", "--catalog", root)
    assert json.loads(out.read_text()) == {"n": 0}
    meta = catalog.metadata.path.read_bytes()
    for target in (catalog.metadata.path, catalog.data_path / "x.csv", catalog.root / ".lock"):
        assert "is inside the catalog" in _cli("sql", query, "-o", str(target), "--force", "--catalog", root, code=2)
    assert catalog.metadata.path.read_bytes() == meta and not (catalog.data_path / "x.csv").exists()
    assert "is a folder: give a file name" in _cli("sql", query, "-o", str(tmp_path), "--catalog", root, code=2)
    assert not list(tmp_path.glob(".*.tmp"))


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())
