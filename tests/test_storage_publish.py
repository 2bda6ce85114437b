"""Publishing into the catalog: columns by name, unknown versions, float32 vectors, per-row versions,
several datasets in one snapshot, and what a failed publish leaves behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefmill.schemas.tables import PAIR_EMBEDDINGS, PAIRS, SCHEMA_VERSION
from prefmill.storage.catalog import Catalog, CatalogError
from tests.test_storage import pairs


@pytest.fixture
def catalog(tmp_path):
    return Catalog(tmp_path / "catalog")


def embeddings(n: int, dim: int = 8, offset: int = 0, seed: int = 0) -> pa.Table:
    vectors = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), vectors.ravel())
    ids = [f"p{offset + i}" for i in range(n)]
    return pa.table({"pair_id": ids, "prompt_id": ids, "dedup_key": ids, "embedder": ["minilm"] * n,
                     "prompt_vector": column, "reply_vector": column, "run_id": ["r"] * n}, schema=PAIR_EMBEDDINGS)


def data_files(catalog: Catalog) -> list[str]:
    return sorted(str(p.relative_to(catalog.data_path)) for p in catalog.data_path.rglob("*") if p.is_file())


# columns are matched by name, and checked against the dataset's existing columns

def test_publish_matches_columns_by_name_not_position(catalog):
    catalog.publish(pa.table({"a": [1, 2], "b": [10, 20]}), "nums")
    catalog.publish(pa.table({"b": [30], "a": [3]}), "nums")
    assert catalog.read("nums").to_pylist() == [{"a": 1, "b": 10}, {"a": 2, "b": 20}, {"a": 3, "b": 30}]


@pytest.mark.parametrize("table, message", [
    (pa.table({"a": [3]}), "missing column 'b'"),
    (pa.table({"a": [3], "b": [30], "c": ["x"]}), "unexpected column 'c'"),
    (pa.table({"a": [3], "b": ["30"]}), "column 'b' has type VARCHAR, the dataset has BIGINT"),
    (pa.table({"a": [3], "b": pa.array([30], pa.int32())}), "column 'b' has type INTEGER, the dataset has BIGINT"),
])
def test_a_table_that_does_not_match_the_dataset_is_refused_naming_the_column(catalog, table, message):
    first = catalog.publish(pa.table({"a": [1], "b": [10]}), "nums")
    with pytest.raises(CatalogError, match=message):
        catalog.publish(table, "nums")
    assert catalog.versions("nums") == [first]
    assert catalog.read("nums").num_rows == 1


# unknown versions are clear errors

@pytest.mark.parametrize("call", ["read", "export", "changes_to", "changes_from"])
@pytest.mark.parametrize("which", ["above_latest", "below_first", "other_dataset"])
def test_an_unknown_version_is_a_catalog_error_listing_the_versions(catalog, tmp_path, call, which):
    first = catalog.publish(pairs(1), "pairs")
    other = catalog.publish(pairs(1), "other")
    second = catalog.publish(pairs(1, offset=1), "pairs")
    version = {"above_latest": 999, "below_first": first.version - 1, "other_dataset": other.version}[which]
    calls = {
        "read": lambda: catalog.read("pairs", version),
        "export": lambda: catalog.export("pairs", tmp_path / "x.parquet", "parquet", version),
        "changes_to": lambda: catalog.changes("pairs", first.version, version),
        "changes_from": lambda: catalog.changes("pairs", version, second.version),
    }
    with pytest.raises(CatalogError, match=rf"'pairs' has no version {version}; versions: "
                                           rf"\[{first.version}, {second.version}\]"):
        calls[call]()
    assert not (tmp_path / "x.parquet").exists()


# float32 vectors, column projection

def test_float32_vectors_publish_and_read_back_identical(catalog):
    table = embeddings(50, dim=384)
    catalog.publish(table, "pair_embeddings", schema=PAIR_EMBEDDINGS)
    back = catalog.read("pair_embeddings")
    assert back.schema.field("prompt_vector").type == pa.list_(pa.float32())
    assert back.equals(table.replace_schema_metadata(None))


def test_read_projects_columns(catalog):
    catalog.publish(embeddings(5), "pair_embeddings", schema=PAIR_EMBEDDINGS)
    back = catalog.read("pair_embeddings", columns=["reply_vector", "pair_id"])
    assert back.column_names == ["reply_vector", "pair_id"] and back.num_rows == 5
    with pytest.raises(CatalogError, match="no column 'nope'"):
        catalog.read("pair_embeddings", columns=["pair_id", "nope"])


# the version each row was published in

def test_read_with_version_gives_each_rows_publish_version(catalog):
    v1 = catalog.publish(pairs(2), "pairs")
    catalog.publish(pairs(1), "other")
    v2 = catalog.publish(pairs(3, offset=2), "pairs")
    rows = catalog.read("pairs", columns=["pair_id"], with_version=True).sort_by("pair_id")
    assert rows.schema.field("_version").type == pa.int64()
    assert rows.to_pylist() == [{"pair_id": f"p{i}", "_version": v1.version if i < 2 else v2.version}
                                for i in range(5)]
    old = catalog.read("pairs", v1.version, with_version=True)
    assert old.column("_version").to_pylist() == [v1.version] * 2 and "prompt" in old.column_names


# several datasets in one snapshot

def test_publish_many_lands_every_table_in_one_snapshot(catalog):
    catalog.publish(pairs(1), "pairs", {"run_id": "r0"})
    before = len(catalog.sql("SELECT * FROM lake.snapshots()"))
    published = catalog.publish_many({"pairs": pairs(2, offset=1), "pair_embeddings": embeddings(2, offset=1)},
                                     {"run_id": "r1"}, schemas={"pairs": PAIRS, "pair_embeddings": PAIR_EMBEDDINGS})
    assert len(catalog.sql("SELECT * FROM lake.snapshots()")) == before + 1
    assert published["pairs"].version == published["pair_embeddings"].version
    assert [(v.rows_added, v.row_count) for v in catalog.versions("pairs")] == [(1, 1), (2, 3)]
    assert [v.version for v in catalog.versions("pair_embeddings")] == [published["pairs"].version]
    assert published["pair_embeddings"].lineage["run_id"] == "r1"
    assert published["pair_embeddings"].lineage["schema"] == f"pair_embeddings@{SCHEMA_VERSION}"
    rows = catalog.sql("SELECT dataset, rows_added FROM prefmill_lineage ORDER BY dataset, rows_added").to_pylist()
    assert rows == [{"dataset": "pair_embeddings", "rows_added": 2}, {"dataset": "pairs", "rows_added": 1},
                    {"dataset": "pairs", "rows_added": 2}]


def test_publish_many_is_all_or_nothing(catalog):
    catalog.publish(pa.table({"a": [1]}), "nums")
    files = data_files(catalog)
    with pytest.raises(CatalogError, match="missing column 'a'"):
        catalog.publish_many({"pairs": pairs(2), "nums": pa.table({"b": [1]})})
    with pytest.raises(CatalogError, match="no dataset named 'pairs'"):
        catalog.versions("pairs")
    assert data_files(catalog) == files


def test_find_run_names_what_a_run_published(catalog):
    catalog.publish(pairs(1), "pairs", {"run_id": "r1"})
    many = catalog.publish_many({"pairs": pairs(1, offset=1), "pair_embeddings": embeddings(1)}, {"run_id": "r2"})
    catalog.publish(pairs(1, offset=2), "pairs", {"run_id": "r3"})
    assert catalog.find_run("r2") == many
    assert set(catalog.find_run("r1")) == {"pairs"} and catalog.find_run("nope") == {}


def test_a_catalog_from_before_publish_many_still_reads(catalog):
    """Its snapshots carry one dataset's flat lineage record and the message 'publish <dataset>'."""
    catalog.publish(pa.table({"a": [0]}), "other")
    legacy = {"run_id": "old", "dataset": "nums", "rows_added": 2, "created_at": "2026-01-01T00:00:00+00:00",
              "schema": None}
    with catalog.connect(write=True) as con:
        con.execute("BEGIN")
        con.execute("CREATE TABLE nums (a BIGINT)")
        con.execute("INSERT INTO nums VALUES (1), (2)")
        con.execute("CALL lake.set_commit_message('prefmill', 'publish nums', extra_info => ?)", [json.dumps(legacy)])
        con.execute("COMMIT")
    new = catalog.publish(pa.table({"a": [3]}), "nums", {"run_id": "new"})
    old, latest = catalog.versions("nums")
    assert (old.rows_added, old.row_count, old.lineage["run_id"], old.lineage["dataset"]) == (2, 2, "old", "nums")
    assert latest == new and (new.rows_added, new.row_count) == (1, 3)
    assert catalog.read("nums", old.version).column("a").to_pylist() == [1, 2]
    assert catalog.find_run("old") == {"nums": old}


def test_ducklake_maps_a_registered_files_columns_by_name(catalog):
    """What publish relies on when it registers files (it also puts columns in the dataset's order first)."""
    catalog.publish(pa.table({"a": [1], "b": [10]}), "nums")
    swapped = catalog.data_path / "main" / "nums" / "swapped.parquet"
    pq.write_table(pa.table({"b": [20], "a": [2]}), swapped)
    with catalog.connect(write=True) as con:
        con.execute("CALL ducklake_add_data_files('lake', 'nums', ?)", [str(swapped)])
    assert catalog.sql("SELECT a, b FROM nums ORDER BY a").to_pylist() == [{"a": 1, "b": 10}, {"a": 2, "b": 20}]


def test_an_empty_table_publishes_a_version_with_no_rows(catalog):
    version = catalog.publish(pairs(0), "pairs")
    assert (version.rows_added, version.row_count) == (0, 0)
    assert catalog.read("pairs").num_rows == 0 and catalog.read("pairs").schema.names == PAIRS.names


# publish writes Parquet with pyarrow and registers it; a failure in between leaves nothing behind

def test_published_files_keep_nested_columns_time_travel_and_changes(catalog):
    v1 = catalog.publish(pairs(2), "pairs", schema=PAIRS)
    v2 = catalog.publish(pairs(2, offset=2), "pairs", schema=PAIRS)
    assert catalog.read("pairs", v1.version).column("chosen").to_pylist() == [[{"role": "assistant",
                                                                                "content": "4"}]] * 2
    changes = catalog.changes("pairs", v1.version, v2.version)
    assert sorted(changes.column("pair_id").to_pylist()) == ["p2", "p3"]
    assert catalog.sql("SELECT count(*) AS n FROM pairs WHERE prompt[1].role = 'user'").to_pylist() == [{"n": 4}]


def test_a_failure_between_the_parquet_write_and_the_commit_leaves_nothing(catalog, monkeypatch):
    catalog.publish(pairs(1), "pairs")
    files = data_files(catalog)

    def fail(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(Catalog, "_commit", fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        catalog.publish_many({"pairs": pairs(3, offset=1), "pair_embeddings": embeddings(3)})
    monkeypatch.undo()
    assert data_files(catalog) == files
    assert catalog.read("pairs").num_rows == 1 and [d.dataset for d in catalog.datasets()] == ["pairs"]


def test_a_failure_inside_the_transaction_leaves_nothing(catalog, monkeypatch):
    """After add_data_files and the lineage INSERT, before the commit: the transaction rolls back."""
    catalog.publish(pairs(1), "pairs")
    files = data_files(catalog)
    dumps = json.dumps

    def fail_on_snapshot_info(obj, **kwargs):
        if "datasets" in obj:
            raise RuntimeError("no commit message for you")
        return dumps(obj, **kwargs)

    monkeypatch.setattr("prefmill.storage.catalog.json.dumps", fail_on_snapshot_info)
    with pytest.raises(RuntimeError, match="no commit message"):
        catalog.publish_many({"pairs": pairs(3, offset=1), "pair_embeddings": embeddings(3)})
    monkeypatch.undo()
    assert data_files(catalog) == files
    assert catalog.read("pairs").num_rows == 1 and [d.dataset for d in catalog.datasets()] == ["pairs"]
    assert catalog.sql("SELECT count(*) AS n FROM prefmill_lineage").to_pylist() == [{"n": 1}]


KILLED_BEFORE_COMMIT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from prefmill.storage.catalog import Catalog
from tests.test_storage import pairs
Catalog._commit = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
Catalog(sys.argv[1]).publish(pairs(100, offset=1), "pairs")
"""


def test_a_kill_before_the_commit_leaves_an_orphan_that_the_next_publish_removes(catalog, tmp_path):
    catalog.publish(pairs(1), "pairs")
    files = data_files(catalog)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BEFORE_COMMIT.format(repo=os.path.dirname(os.path.dirname(__file__))))
    proc = subprocess.run([sys.executable, str(script), str(catalog.root)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    orphans = sorted(set(data_files(catalog)) - set(files))
    assert len(orphans) == 1 and orphans[0].endswith(".parquet")
    assert catalog.read("pairs").num_rows == 1
    catalog.publish(pairs(1, offset=1), "pairs")
    after = set(data_files(catalog))
    assert orphans[0] not in after and set(files) <= after and catalog.read("pairs").num_rows == 2


def test_cleanup_deletes_files_no_snapshot_references(catalog):
    catalog.publish(pairs(1), "pairs")
    files = data_files(catalog)
    orphan = catalog.data_path / "main" / "pairs" / "prefmill-orphan.parquet"
    orphan.write_bytes(b"half a file")
    assert catalog.cleanup() == [orphan]
    assert data_files(catalog) == files and catalog.read("pairs").num_rows == 1


def test_every_data_file_is_flushed_to_disk_before_the_commit_that_references_it(catalog, monkeypatch):
    """A power loss must not leave a committed version pointing at a file that is not all on disk."""
    import prefmill.storage.catalog as module

    flushed: list[str] = []
    real_fsync, real_commit = os.fsync, module.Catalog._commit

    def fsync(fd):
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def commit(self, con, tables, files, *rest):
        assert {str(p) for p in files.values()} <= set(flushed), "a file was committed before it was flushed"
        assert {str(p.parent) for p in files.values()} <= set(flushed), "its folder entry was not flushed"
        return real_commit(self, con, tables, files, *rest)

    monkeypatch.setattr(module.os, "fsync", fsync)
    monkeypatch.setattr(module.Catalog, "_commit", commit)
    published = catalog.publish_many({"pairs": pairs(2), "pair_embeddings": embeddings(2)}, {"run_id": "r"},
                                     schemas={"pairs": PAIRS, "pair_embeddings": PAIR_EMBEDDINGS})
    assert published["pairs"].row_count == 2
    assert len([p for p in flushed if p.endswith(".parquet")]) == 2
