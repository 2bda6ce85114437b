"""The DuckLake catalog on real files: publish, versions, time travel, SQL, export, safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from prefmill.schemas.tables import PAIRS, SCHEMA_VERSION, SchemaMismatch
from prefmill.storage.catalog import Catalog, CatalogError, validate_name


def pairs(n: int, offset: int = 0) -> pa.Table:
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    rows = [dict(pair_id=f"p{offset + i}", prompt=prompt, chosen=[{"role": "assistant", "content": "4"}],
                 rejected=[{"role": "assistant", "content": "5"}], score_chosen=1.0, score_rejected=0.5,
                 margin=0.5, chosen_candidate_id=f"c{i}", rejected_candidate_id=f"r{i}", context_id="ctx",
                 seed_id=f"s{i % 3}", score_source="flr") for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PAIRS)


@pytest.fixture
def catalog(tmp_path):
    return Catalog(tmp_path / "catalog")


def test_publish_read_versions_and_time_travel(catalog):
    v1 = catalog.publish(pairs(3), "pairs", {"run_id": "r1", "config": {"n": 8}, "models": ["smollm2-135m"]},
                         schema=PAIRS)
    v2 = catalog.publish(pairs(2, offset=10), "pairs", {"run_id": "r2", "parents": {"candidates": 4}},
                         schema=PAIRS)
    assert v2.version > v1.version
    assert [(v.rows_added, v.row_count) for v in catalog.versions("pairs")] == [(3, 3), (2, 5)]
    assert catalog.read("pairs").num_rows == 5
    assert catalog.read("pairs", v1.version).column("pair_id").to_pylist() == ["p0", "p1", "p2"]
    assert catalog.read("pairs").schema.field("prompt").type == PAIRS.field("prompt").type
    lineage = catalog.versions("pairs")[0].lineage
    assert lineage["run_id"] == "r1" and lineage["models"] == ["smollm2-135m"]
    assert lineage["schema"] == f"pairs@{SCHEMA_VERSION}"
    assert len(lineage["config_hash"]) == 16 and lineage["created_at"]
    assert catalog.versions("pairs")[1].lineage["parents"] == {"candidates": 4}


def test_changes_between_versions(catalog):
    v1 = catalog.publish(pairs(2), "pairs")
    v2 = catalog.publish(pairs(3, offset=5), "pairs")
    changes = catalog.changes("pairs", v1.version, v2.version)
    assert sorted(changes.column("pair_id").to_pylist()) == ["p5", "p6", "p7"]
    assert set(changes.column("change_type").to_pylist()) == {"insert"}


def test_lineage_is_queryable_with_sql(catalog):
    catalog.publish(pairs(4), "pairs", {"run_id": "run-42"})
    rows = catalog.sql("SELECT dataset, rows_added, json_extract_string(lineage, '$.run_id') AS run "
                       "FROM prefmill_lineage").to_pylist()
    assert rows == [{"dataset": "pairs", "rows_added": 4, "run": "run-42"}]
    snaps = catalog.sql("SELECT commit_message FROM lake.snapshots() WHERE commit_message IS NOT NULL")
    assert snaps.column(0).to_pylist() == ["publish pairs"]


def test_small_publishes_land_as_parquet_files(catalog):
    catalog.publish(pairs(1), "pairs")
    assert list(catalog.data_path.rglob("*.parquet"))


def test_wrong_schema_is_refused_naming_the_column(catalog):
    bad = pairs(1).drop_columns(["margin"])
    with pytest.raises(SchemaMismatch, match="missing column 'margin'"):
        catalog.publish(bad, "pairs", schema=PAIRS)
    assert not catalog.exists() or "pairs" not in [d.dataset for d in catalog.datasets()]


@pytest.mark.parametrize("name", ["../etc", "a/b", "pairs; DROP TABLE x", "Pairs", "", "1abc", "prefmill_lineage",
                                  "x" * 64, 'a"b'])
def test_bad_dataset_names_are_refused(catalog, name):
    with pytest.raises(CatalogError, match="invalid dataset name"):
        catalog.publish(pairs(1), name)


def test_validate_name_accepts_plain_identifiers():
    assert validate_name("pairs_v2") == "pairs_v2"


@pytest.mark.parametrize("statement", [
    "DELETE FROM pairs", "INSERT INTO pairs SELECT * FROM pairs", "DROP TABLE pairs", "CREATE TABLE t (a INT)",
    "ATTACH 'x.db' AS x", "COPY pairs TO '/tmp/x.csv'", "SET threads = 1", "INSTALL httpfs",
    "SELECT 1; UPDATE pairs SET margin = 0", "CALL lake.set_commit_message('a', 'b')",
])
def test_sql_refuses_statements_that_write(catalog, statement):
    catalog.publish(pairs(1), "pairs")
    with pytest.raises(CatalogError, match="read-only"):
        catalog.sql(statement)
    assert catalog.read("pairs").num_rows == 1


def test_sql_reads_latest_and_any_version(catalog):
    v1 = catalog.publish(pairs(2), "pairs")
    catalog.publish(pairs(3, offset=2), "pairs")
    assert catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 5}]
    assert catalog.sql(f"SELECT count(*) AS n FROM pairs AT (VERSION => {v1.version})").to_pylist() == [{"n": 2}]
    assert catalog.sql("SELECT chosen[1].content AS c FROM pairs LIMIT 1").to_pylist() == [{"c": "4"}]


def test_unknown_dataset_and_version_are_clear_errors(catalog):
    catalog.publish(pairs(1), "other")
    v = catalog.publish(pairs(1), "pairs")
    with pytest.raises(CatalogError, match="no dataset named 'missing'"):
        catalog.read("missing")
    with pytest.raises(CatalogError, match="has no version 1"):
        catalog.read("pairs", v.version - 1)


def test_export_loads_with_hugging_face_datasets(catalog, tmp_path):
    from datasets import load_dataset

    v1 = catalog.publish(pairs(2), "pairs")
    catalog.publish(pairs(3, offset=2), "pairs")
    parquet = catalog.export("pairs", tmp_path / "out" / "pairs.parquet", "parquet", version=v1.version)
    jsonl = catalog.export("pairs", tmp_path / "out" / "pairs.jsonl", "jsonl")
    cache = str(tmp_path / "hf-cache")
    from_parquet = load_dataset("parquet", data_files=str(parquet), split="train", cache_dir=cache)
    from_json = load_dataset("json", data_files=str(jsonl), split="train", cache_dir=cache)
    assert from_parquet.num_rows == 2 and from_json.num_rows == 5
    assert from_json[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    assert set(PAIRS.names) <= set(from_parquet.column_names)


def test_export_replaces_an_existing_file_only_with_force(catalog, tmp_path):
    catalog.publish(pairs(2), "pairs")
    out = tmp_path / "existing.txt"
    out.write_text("keep me")
    with pytest.raises(CatalogError, match=f"{out} exists: choose another name, or add --force"):
        catalog.export("pairs", out, "jsonl")
    assert out.read_text() == "keep me"
    assert catalog.export("pairs", out, "jsonl", force=True) == out
    assert len(out.read_text().splitlines()) == 2 and not list(tmp_path.glob(".*.tmp"))


def test_export_never_writes_inside_the_catalog(catalog, tmp_path):
    catalog.publish(pairs(2), "pairs")
    (data_file,) = catalog.data_path.rglob("*.parquet")
    link = tmp_path / "innocent.parquet"
    link.symlink_to(data_file)
    before = {p: p.read_bytes() for p in catalog.root.rglob("*") if p.is_file()}
    for target in (catalog.metadata.path, data_file, catalog.root / ".lock", catalog.data_path / "new.parquet",
                   link, tmp_path / "elsewhere" / ".." / catalog.root.name / "meta.ducklake", catalog.root):
        with pytest.raises(CatalogError, match="is inside the catalog .*--force does not change this"):
            catalog.export("pairs", target, "parquet", force=True)
    assert {p: p.read_bytes() for p in catalog.root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name, message", [
    ("", "no output path given"), ("folder", "is a folder: give a file name"),
    ("folder/..", "is a folder: give a file name"), ("/proc/x", "cannot write /proc/x"),
])
def test_export_to_a_bad_path_is_a_clear_error_that_leaves_nothing(catalog, tmp_path, monkeypatch, name, message):
    catalog.publish(pairs(2), "pairs")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(CatalogError, match=message):
        catalog.export("pairs", name, "parquet")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_tmp(tmp_path):
    from prefmill.storage.outputs import replacing

    out = tmp_path / "out.jsonl"
    out.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with replacing(out) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert out.read_text() == "old" and list(tmp_path.iterdir()) == [out]


def test_export_cli_refuses_overwrites_and_the_catalog_for_every_format(catalog, tmp_path):
    from typer.testing import CliRunner

    from prefmill.flows.cli import app

    catalog.publish(pairs(2), "pairs")
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    before = {p: p.read_bytes() for p in catalog.root.rglob("*") if p.is_file()}
    for args, message in [(["-o", str(existing)], "exists: choose another name, or add --force"),
                          (["-o", str(catalog.metadata.path), "--force"], "is inside the catalog"),
                          (["-o", str(catalog.root), "--format", "trl"], "is inside the catalog"),
                          (["-o", str(tmp_path)], "is a folder")]:
        result = CliRunner().invoke(app, ["export", "pairs", *args, "--catalog", str(catalog.root)])
        assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert existing.read_text() == "keep me"
    assert {p: p.read_bytes() for p in catalog.root.rglob("*") if p.is_file()} == before


PUBLISHER = """
import sys, time
sys.path.insert(0, {tests!r})
from test_storage import pairs
from prefmill.storage.catalog import Catalog
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
for k in range(3):
    v = Catalog(sys.argv[1]).publish(pairs(1000, offset=int(sys.argv[3]) * 10000 + k * 1000), "pairs",
                                     {{"run_id": sys.argv[3]}})
    assert v.lineage["run_id"] == sys.argv[3], "publish returned another process's version"
"""


@pytest.mark.slow
def test_two_processes_publishing_at_once_both_land(catalog, tmp_path):
    script = tmp_path / "publisher.py"
    script.write_text(PUBLISHER.format(tests=os.path.dirname(__file__)))
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, str(script), str(catalog.root), start, str(k)],
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    versions = catalog.versions("pairs")
    assert len(versions) == 6 and sorted(v.lineage["run_id"] for v in versions) == ["0"] * 3 + ["1"] * 3
    ids = catalog.read("pairs").column("pair_id").to_pylist()
    assert len(ids) == 6000 and len(set(ids)) == 6000


KILLED = """
import sys
sys.path.insert(0, {tests!r})
from test_storage import pairs
from prefmill.storage.catalog import Catalog
table = pairs(200_000)
print("ready", flush=True)
while True:
    Catalog(sys.argv[1]).publish(table, "pairs")
"""


@pytest.mark.slow
def test_a_crash_mid_publish_never_exposes_a_partial_version(catalog, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=os.path.dirname(__file__)))
    rng = random.Random(7)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, str(script), str(catalog.root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.2, 2.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not catalog.exists():
            continue
        try:
            versions = catalog.versions("pairs")
        except CatalogError:
            continue  # killed before the first commit: nothing is visible, which is correct
        counts = catalog.sql("SELECT count(*) AS n FROM pairs").to_pylist()[0]["n"]
        assert counts == versions[-1].row_count == 200_000 * len(versions)
        for v in versions:
            assert catalog.read("pairs", v.version).num_rows == v.row_count
    assert catalog.versions("pairs"), "no publish ever landed: the kills came too early to test anything"
    assert json.dumps(catalog.sql("SELECT 1 AS ok").to_pylist()) == '[{"ok": 1}]'
