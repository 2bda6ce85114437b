"""A local catalog opens wherever its folder is now: copied (a restored backup), moved (`~/.prefmill` moved, an NFS
share mounted elsewhere) or reached through a symlink. Its data is always its own `data/`."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest

from prefmill.storage.catalog import Catalog, CatalogError
from tests import pg
from tests.test_storage import pairs


@pytest.fixture
def original(tmp_path) -> Catalog:
    catalog = Catalog(tmp_path / "first" / "catalog")
    catalog.publish(pairs(2), "pairs")
    catalog.publish(pairs(3, offset=2), "pairs")
    return catalog


def _relocate(original: Catalog, how: str, tmp_path) -> Catalog:
    place = tmp_path / "elsewhere" / "catalog"
    place.parent.mkdir()
    if how == "copy":
        shutil.copytree(original.root, place)
    elif how == "move":
        shutil.move(original.root, place)
    else:
        place.symlink_to(original.root)
    return Catalog(place)


@pytest.mark.parametrize("how", ["copy", "move", "symlink"])
def test_a_relocated_catalog_reads_queries_and_publishes(original, tmp_path, how):
    first = original.versions("pairs")[0].version
    moved = _relocate(original, how, tmp_path)
    assert [v.row_count for v in moved.versions("pairs")] == [2, 5]
    assert moved.read("pairs", first).column("pair_id").to_pylist() == ["p0", "p1"]
    assert moved.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 5}]
    moved.publish(pairs(1, offset=9), "pairs")
    assert moved.read("pairs").num_rows == 6
    assert Catalog(moved.root).sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 6}]
    files = moved.sql("SELECT data_file FROM ducklake_list_files('lake', 'pairs')").column(0).to_pylist()
    assert len(files) == 3 and all(f.startswith(f"{moved.data_path}/") for f in files)


def test_a_copy_is_independent_of_the_original(original, tmp_path):
    copy = _relocate(original, "copy", tmp_path)
    copy.publish(pairs(1, offset=9), "pairs")
    assert original.read("pairs").num_rows == 5 and copy.read("pairs").num_rows == 6
    assert original.sql("SELECT count(*) AS n FROM pairs").to_pylist() == [{"n": 5}]


@pytest.mark.skipif(pg.missing() is not None, reason=pg.missing() or "")
def test_a_postgres_catalog_given_another_data_folder_says_which_one_it_keeps(tmp_path):
    """On PostgreSQL the data folder is the user's to name, so a changed one is an error that names the right one."""
    with pg.server() as server:
        server.createdb("moved")
        target = server.target("moved")
        Catalog(target, data_path=tmp_path / "a").publish(pa.table({"a": [1]}), "nums")
        with pytest.raises(CatalogError) as error:
            Catalog(target, data_path=tmp_path / "b").read("nums")
        assert f"keeps its data in another folder than {tmp_path / 'b'}: in {tmp_path / 'a'}." in str(error.value)
        assert f"Point at it with data_path={tmp_path / 'a'} in --catalog" in str(error.value)
        pointed = Catalog(f"{target} data_path={tmp_path / 'a'}")
        assert pointed.read("nums").to_pylist() == [{"a": 1}]
