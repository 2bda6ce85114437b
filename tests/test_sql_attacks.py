"""`prefmill sql` stays closed: the attack corpus in sql_attacks.tsv (every known bypass, every family the sandbox
stops, and the read-only queries that must keep working) and a property test that hides writing statements in
random comments, whitespace and casing. After each case no file of the catalog, nor any planted beside it, changed."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefmill.storage.catalog import Catalog, CatalogError
from tests.test_storage import pairs

CORPUS = Path(__file__).with_name("sql_attacks.tsv")
SECRET = "s3cr3t-planted"


@dataclass(frozen=True)
class Case:
    line: int
    expect: str
    query: str


def corpus() -> list[Case]:
    """The corpus cases: `refuse|run<TAB>query`, with \\n, \\t and \\uXXXX escapes decoded."""
    cases = []
    for number, line in enumerate(CORPUS.read_text().splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        expect, query = line.split("\t", 1)
        assert expect in ("refuse", "run"), f"sql_attacks.tsv:{number}: {expect!r}"
        cases.append(Case(number, expect, _unescape(query)))
    return cases


def _unescape(text: str) -> str:
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
    return text.replace("\\n", "\n").replace("\\t", "\t")


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict:
    """A catalog with two versions of `pairs`, secrets planted beside it, a working directory with a `.tmp`."""
    root = tmp_path_factory.mktemp("attacks")
    catalog = Catalog(root / "catalog")
    v1, v2 = catalog.publish(pairs(2), "pairs"), catalog.publish(pairs(3, offset=2), "pairs")
    outside, work = root / "outside", root / "work"
    for folder in (outside, work / ".tmp"):
        folder.mkdir(parents=True)
    secret = pa.table({"content": [SECRET]})
    for path in (outside / "secret.parquet", work / ".tmp" / "s.parquet"):
        pq.write_table(secret, path)
    (outside / "secret.csv").write_text(f"content\n{SECRET}\n")
    (outside / "link-to-secret.parquet").symlink_to(outside / "secret.parquet")
    names = {"meta": catalog.metadata.path, "data": catalog.data_path, "outside": outside, "v1": v1.version,
             "v2": v2.version, "data_file": sorted(catalog.data_path.rglob("*.parquet"))[0]}
    return {"catalog": catalog, "root": root, "work": work, "names": names, "before": _checksums(root)}


def _checksums(root: Path) -> dict[str, str]:
    """Every file under `root` (catalog, planted files, working directory) and a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _attempt(lab: dict, query: str) -> pa.Table | CatalogError:
    """What `Catalog.sql` did with `query`, its placeholders filled: the rows, or the refusal."""
    for name, value in lab["names"].items():
        query = query.replace(f"{{{name}}}", str(value))
    try:
        return lab["catalog"].sql(query)
    except CatalogError as exc:
        return exc


def test_the_corpus_is_large_and_covers_both_outcomes():
    cases = corpus()
    assert len(cases) >= 80 and {c.expect for c in cases} == {"refuse", "run"}


@pytest.mark.parametrize("case", corpus(), ids=lambda c: f"line{c.line}")
def test_corpus_case(lab, monkeypatch, case):
    monkeypatch.chdir(lab["work"])
    outcome = _attempt(lab, case.query)
    if case.expect == "refuse":
        assert isinstance(outcome, CatalogError), f"ran: {case.query!r}"
        assert SECRET not in str(outcome)
    else:
        assert isinstance(outcome, pa.Table), f"refused {case.query!r}: {outcome}"
    assert _checksums(lab["root"]) == lab["before"], f"a file changed after {case.query!r}"


WRITERS = [
    "DROP TABLE pairs", "DELETE FROM pairs", "INSERT INTO pairs SELECT * FROM pairs", "UPDATE pairs SET margin = 0",
    "COPY (SELECT 1 AS x) TO '{meta}' (FORMAT csv, USE_TMP_FILE false)", "COPY pairs TO '{data_file}'",
    "COPY pairs TO '.tmp/x.csv'", "CREATE TEMP TABLE x AS SELECT 1", "CREATE TABLE memory.main.x AS SELECT 1",
    "ATTACH '{outside}/x.db' AS x", "SET threads = 1", "CALL ducklake_cleanup_old_files('lake', cleanup_all => true)",
    "SELECT * FROM ducklake_delete_orphaned_files('lake', cleanup_all => true)",
    "SELECT * FROM read_parquet('.tmp/s.parquet')", "EXPLAIN ANALYZE COPY pairs TO '{outside}/x.csv'",
]
DECOYS = ["", "x", "EXPLAIN SELECT 1", "SELECT 1;", "--", "'", '"', "$$", ";", "\n", "\u0405ELECT", "-- */"]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", " \n\t "]
PREFIXES = ["", "EXPLAIN ", "EXPLAIN ANALYZE ", "/* /* */ EXPLAIN SELECT 1 -- */ EXPLAIN ANALYZE "]


def _block_comment(depth: int) -> st.SearchStrategy[str]:
    """A DuckDB block comment, comments nested inside to `depth`, holding decoy SQL."""
    inner = st.sampled_from(DECOYS) if depth == 0 else st.one_of(st.sampled_from(DECOYS), _block_comment(depth - 1))
    return st.lists(inner, max_size=4).map(lambda parts: "/*" + " ".join(parts).replace("*/", "* /") + "*/")


COMMENT = st.one_of(_block_comment(3), st.sampled_from(DECOYS).map(lambda d: f"--{d.replace(chr(10), ' ')}\n"))
NOISE = st.lists(st.one_of(COMMENT, st.sampled_from(WHITESPACE)), max_size=5).map("".join)


def _disguise(statement: str, rng: random.Random) -> str:
    """Random casing and whitespace outside quoted strings (paths and literals stay as they are)."""
    parts = re.split(r"('[^']*')", statement)
    for i in range(0, len(parts), 2):
        flipped = "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in parts[i])
        parts[i] = re.sub(" ", lambda _: rng.choice(WHITESPACE), flipped)
    return "".join(parts)


@settings(max_examples=60, deadline=None, database=None)
@given(writer=st.sampled_from(WRITERS), before=NOISE, after=NOISE, seed=st.integers(0, 2**32),
       explain=st.sampled_from(PREFIXES),
       end=st.sampled_from(["", ";", " ; ", "; SELECT 1"]))
def test_writing_statements_stay_refused_however_disguised(lab, writer, before, after, seed, explain, end):
    query = before + explain + _disguise(writer, random.Random(seed)) + after + end
    outcome = _attempt(lab, query)
    assert isinstance(outcome, CatalogError), f"ran: {query!r}"
    assert _checksums(lab["root"]) == lab["before"], f"a file changed after {query!r}"
