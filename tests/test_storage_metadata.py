"""The catalog's metadata strategies (storage.metadata): which one a target names, `exists()` on a local catalog
(PostgreSQL's is in test_storage_postgres.py), and flows that never look at a catalog's paths."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from prefmill.storage.catalog import Catalog, CatalogError
from prefmill.storage.metadata import LocalMetadata, PostgresMetadata, metadata_for
from tests.test_storage import pairs

REPO = Path(__file__).resolve().parents[1]
PRIVATE = {"root", "data_path", "meta_path", "metadata"}  # where a catalog keeps things: the strategy's business


def catalog_paths_touched(source: str) -> list[str]:
    """Each `x.root`, `x.data_path`, `x.meta_path`, `x.metadata` or `x._private` in `source` where `x` is a
    Catalog: a parameter annotated `Catalog`, a name assigned `Catalog(...)`, or `Catalog(...)` itself."""
    tree = ast.parse(source)
    names = {node.arg for node in ast.walk(tree)
             if isinstance(node, ast.arg) and node.annotation and "Catalog" in ast.unparse(node.annotation)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_catalog_call(node.value):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and (node.attr in PRIVATE or node.attr.startswith("_"))
            and ((isinstance(node.value, ast.Name) and node.value.id in names) or _is_catalog_call(node.value))]


def _is_catalog_call(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func) == "Catalog"


def test_flows_never_touch_the_paths_of_a_catalog():
    """Flows ask `catalog.exists()`; where and how the metadata is kept is storage's (a PostgreSQL catalog has
    no metadata file to look at). The check itself catches what flows used to do."""
    assert catalog_paths_touched("def f(catalog: Catalog):\n    return catalog.meta_path.exists()") == [
        "catalog.meta_path"]
    assert catalog_paths_touched("cat = Catalog(x)\nCatalog(y).data_path\ncat.root") == [
        "Catalog(y).data_path", "cat.root"]
    touched = {str(path.relative_to(REPO)): found for path in sorted((REPO / "flows").rglob("*.py"))
               if (found := catalog_paths_touched(path.read_text()))}
    assert touched == {}
    imports = [path.name for path in (REPO / "flows").rglob("*.py") if "storage.metadata" in path.read_text()]
    assert imports == [], "flows reach past the Catalog to its metadata strategy"


def test_a_local_catalog_exists_after_its_first_publish_and_asking_creates_nothing(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    assert not catalog.exists() and not catalog.exists()
    assert list((tmp_path / "catalog").iterdir()) == []
    with pytest.raises(CatalogError, match="no catalog yet at"):
        catalog.sql("SELECT 1")
    with pytest.raises(CatalogError, match="no catalog yet at"), catalog.connect(sandboxed=True):
        pass  # a sandbox never creates the lake, on either backend
    assert not catalog.exists() and not catalog.metadata.path.exists()
    catalog.publish(pairs(1), "pairs")
    assert catalog.exists() and Catalog(tmp_path / "catalog").exists()


def test_the_target_names_the_strategy(tmp_path):
    local = metadata_for(tmp_path / "c")
    assert isinstance(local, LocalMetadata) and str(local) == str(tmp_path / "c")
    assert (local.root, local.data_path) == (tmp_path / "c", tmp_path / "c" / "data")
    remote = metadata_for("postgres:dbname=lake host=127.0.0.1 password=hunter2", tmp_path / "files")
    assert isinstance(remote, PostgresMetadata) and remote.root == remote.data_path == tmp_path / "files"
    assert str(remote) == "postgres:dbname=lake host=127.0.0.1 password=***"
    assert Catalog("postgres:dbname=lake", data_path=tmp_path / "files").location == "postgres:dbname=lake"
    with pytest.raises(CatalogError, match="data_path is for a PostgreSQL catalog"):
        metadata_for(tmp_path / "c", tmp_path / "files")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CatalogError, match="is a file, not a folder"):
        metadata_for(tmp_path / "file")


def test_a_creation_that_dies_midway_leaves_no_metadata_file_without_a_lake(tmp_path, monkeypatch):
    """A publisher killed while DuckLake fills a new `meta.ducklake` used to leave a file that every read-only
    attach refused ("Existing DuckLake ... does not exist"): the lake is made in a scratch file and moved."""
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("prefmill.storage.metadata.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        Catalog(tmp_path / "catalog").publish(pairs(1), "pairs")
    monkeypatch.undo()
    catalog = Catalog(tmp_path / "catalog")
    assert not catalog.exists()
    assert catalog.publish(pairs(2), "pairs").row_count == 2 and catalog.exists()
    assert sorted(p.name for p in (tmp_path / "catalog").iterdir() if p.name.startswith(".meta")) == []
