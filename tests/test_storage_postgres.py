"""The catalog with its metadata on a real PostgreSQL server (a throw-away one, see tests/pg.py): the same
publish/read/time-travel contract, concurrent writers from separate processes, and clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from prefmill.schemas.tables import PAIRS
from prefmill.storage.catalog import Catalog, CatalogError
from tests import pg
from tests.test_storage import pairs

pytestmark = pytest.mark.skipif(pg.missing() is not None, reason=pg.missing() or "")


@pytest.fixture(scope="module")
def server():
    with pg.server() as running:
        yield running


@pytest.fixture
def target(server) -> str:
    """A fresh database per test on the module's server."""
    name = f"lake_{uuid.uuid4().hex[:8]}"
    server.createdb(name)
    return server.target(name)


def test_publish_read_versions_time_travel_and_sql(target, tmp_path):
    catalog = Catalog(target, data_path=tmp_path / "data")
    assert not catalog.exists()
    with pytest.raises(CatalogError, match="no catalog yet at postgres:dbname=lake_"):
        catalog.sql("SELECT 1")
    v1 = catalog.publish(pairs(3), "pairs", {"run_id": "r1"}, schema=PAIRS)
    v2 = catalog.publish(pairs(2, offset=10), "pairs", {"run_id": "r2"}, schema=PAIRS)
    assert catalog.exists() and v2.version > v1.version
    assert [(v.rows_added, v.row_count, v.lineage["run_id"]) for v in catalog.versions("pairs")] == [
        (3, 3, "r1"), (2, 5, "r2")]
    assert catalog.read("pairs", v1.version).column("pair_id").to_pylist() == ["p0", "p1", "p2"]
    assert catalog.read("pairs").num_rows == 5
    assert sorted(catalog.changes("pairs", v1.version, v2.version).column("pair_id").to_pylist()) == ["p10", "p11"]
    assert len(list((tmp_path / "data").rglob("*.parquet"))) == 2
    # read-only SQL in the sandbox: the lake was attached before external access was shut
    n = catalog.sql(f"SELECT count(*) AS n FROM pairs AT (VERSION => {v1.version})").to_pylist()
    assert n == [{"n": 3}]
    catalog.publish(pairs(1, offset=20), "pairs")
    assert catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 6}], "sql missed a new publish"
    for query in ("SELECT * FROM read_text('/etc/hostname')",  # the postgres extension's functions ignore
                  f"SELECT * FROM postgres_scan('{target[9:]}', 'public', 'ducklake_snapshot')",  # external access:
                  "SELECT * FROM postgres_query('__ducklake_metadata_lake', 'SELECT 1')"):  # the parse check stops them
        with pytest.raises(CatalogError, match="refused"):
            catalog.sql(query)
    with catalog.connect(sandboxed=True) as con:
        for query in ("SELECT * FROM read_text('/etc/hostname')", "INSERT INTO pairs SELECT * FROM pairs",
                      f"ATTACH 'postgres:{target.removeprefix('postgres:')}' AS other"):
            with pytest.raises(duckdb.Error):
                con.execute(query)
    # another process (here: another Catalog) finds the lake by its target alone, in the same data folder
    again = Catalog(f"{target} data_path={tmp_path / 'data'}")
    assert [v.version for v in again.versions("pairs")] == [v.version for v in catalog.versions("pairs")]


def test_exists_asks_the_server_each_time_and_creates_no_lake(target, tmp_path):
    """A fresh database holds no lake: asking (or a sandboxed connection) must not create one; once another
    process (here another Catalog) publishes, the same Catalog sees it at once."""
    catalog = Catalog(target, data_path=tmp_path / "data")
    assert not catalog.exists() and not catalog.exists()
    with pytest.raises(CatalogError, match="no catalog yet at postgres:dbname=lake_"), catalog.connect(sandboxed=True):
        pass
    assert not catalog.exists() and not (tmp_path / "data").exists()
    Catalog(target, data_path=tmp_path / "data").publish(pa.table({"a": [1]}), "nums")
    assert catalog.exists()


def test_a_url_target_even_after_path_collapsed_its_slashes(server, tmp_path):
    """The CLI's --catalog is a Path, which turns 'postgresql://' into 'postgresql:/'."""
    server.createdb("urldb")
    url = f"postgresql://postgres@127.0.0.1:{server.port}/urldb?data_path={tmp_path / 'files'}"
    v = Catalog(Path(url)).publish(pa.table({"a": [1, 2]}), "nums")
    assert Catalog(url).read("nums", v.version).to_pylist() == [{"a": 1}, {"a": 2}]
    assert list((tmp_path / "files").rglob("*.parquet"))


WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import pyarrow as pa
from prefmill.storage.catalog import Catalog
from tests.test_storage import pairs

attempts, conflicts = 0, []

class Counting(Catalog):
    def _commit(self, *args):
        global attempts
        attempts += 1
        try:
            return super()._commit(*args)
        except Exception as exc:
            conflicts.append(" ".join(str(exc).split())[:300])
            raise

target, folder, writer = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
catalog = Counting(target)
catalog.exists()  # extensions loaded and the server reached before the start line
(folder / f"ready-{{writer}}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
for round in range(3):
    ids = [f"w{{writer}}-r{{round}}-{{i}}" for i in range(400)]
    notes = pa.table({{"note_id": ids[:50], "writer": [writer] * 50, "round": [round] * 50}})
    table = pairs(400).set_column(0, "pair_id", pa.array(ids))
    out = catalog.publish_many({{"pairs": table, "pair_notes": notes}}, {{"run_id": f"w{{writer}}", "round": round}})
    assert out["pairs"].version == out["pair_notes"].version, out
    assert out["pairs"].lineage["run_id"] == f"w{{writer}}", "publish returned another writer's version"
print(conflicts, file=sys.stderr)
print("attempts", attempts, flush=True)
"""


@pytest.mark.slow
def test_two_processes_publishing_at_the_same_moment_both_land_whole(target, tmp_path):
    """Both writers start on a file barrier and publish three snapshots each, two datasets per snapshot, one
    of them new (so both create it at once and one commit conflicts); every snapshot holds exactly one
    writer's rows of one round, in both datasets."""
    catalog = Catalog(target, data_path=tmp_path / "data")
    base = catalog.publish(pairs(5), "pairs", {"run_id": "base"})
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(Path(__file__).resolve().parents[1])))
    full = f"{target} data_path={tmp_path / 'data'}"
    procs = [subprocess.Popen([sys.executable, str(script), full, str(tmp_path), str(k)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{k}").exists() for k in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    attempts = [int(out.split()[-1]) for out, _ in outs]
    print(f"commit attempts per writer (3 publishes each): {attempts}; conflicts: {[err for _, err in outs]}")

    versions = [v for v in catalog.versions("pairs") if v.version != base.version]
    assert len(versions) == 6 and sorted(v.lineage["run_id"] for v in versions) == ["w0"] * 3 + ["w1"] * 3
    notes = {v.version: v for v in catalog.versions("pair_notes")}
    assert sorted(notes) == [v.version for v in versions], "a publish_many split across snapshots"
    rows = catalog.read("pairs", with_version=True).to_pylist()
    note_rows = catalog.read("pair_notes", with_version=True).to_pylist()
    for v in versions:
        writer, round_ = int(v.lineage["run_id"][1:]), v.lineage["round"]
        expected = {f"w{writer}-r{round_}-{i}" for i in range(400)}
        got = [r["pair_id"] for r in rows if r["_version"] == v.version]
        assert len(got) == 400 and set(got) == expected, f"version {v.version} holds other rows"
        got_notes = {(r["note_id"], r["writer"], r["round"]) for r in note_rows if r["_version"] == v.version}
        assert got_notes == {(f"w{writer}-r{round_}-{i}", writer, round_) for i in range(50)}
    assert len(rows) == 5 + 6 * 400 and len({r["pair_id"] for r in rows}) == len(rows)
    assert [v.row_count for v in catalog.versions("pairs")] == [5 + 400 * k for k in range(7)]


def test_an_unreachable_server_is_a_clear_error_naming_the_target(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"postgres:dbname=prefmill host=127.0.0.1 port={port} user=prefmill password=hunter2"
    catalog = Catalog(target, data_path=tmp_path / "data")
    for call in (lambda: catalog.versions("pairs"), lambda: catalog.publish(pairs(1), "pairs"),
                 lambda: catalog.sql("SELECT 1"), catalog.exists):
        with pytest.raises(CatalogError) as error:
            call()
        message = str(error.value)
        assert f"cannot reach the PostgreSQL catalog postgres:dbname=prefmill host=127.0.0.1 port={port}" in message
        assert "Connection refused" in message and "Start the server" in message
        assert "hunter2" not in message and "password=***" in message


def test_a_data_folder_other_than_the_lakes_is_refused(target, tmp_path):
    Catalog(target, data_path=tmp_path / "a").publish(pa.table({"a": [1]}), "nums")
    with pytest.raises(CatalogError, match=f"keeps its data in another folder than {tmp_path / 'b'}"):
        Catalog(target, data_path=tmp_path / "b").read("nums")


def test_cleanup_spares_young_orphans_another_writer_may_be_committing(target, tmp_path):
    catalog = Catalog(target, data_path=tmp_path / "data")
    catalog.publish(pa.table({"a": [1]}), "nums")
    orphan = tmp_path / "data" / "main" / "nums" / "prefmill-dead.parquet"
    orphan.write_bytes(b"not committed")
    assert catalog.cleanup() == [] and orphan.exists()
    two_hours_ago = time.time() - 7200
    os.utime(orphan, (two_hours_ago, two_hours_ago))
    assert catalog.cleanup() == [orphan] and not orphan.exists()
    assert catalog.read("nums").to_pylist() == [{"a": 1}]
