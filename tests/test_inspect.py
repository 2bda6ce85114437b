"""`prefmill show` (pairs in the terminal, with the critique behind a revision) and `prefmill card`."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from rich.console import Console

from prefmill.flows.card import PLOTS, write_card
from prefmill.flows.show import show_pairs
from prefmill.flows.training import export_trl
from prefmill.schemas.tables import PAIRS
from prefmill.storage.catalog import Catalog, CatalogError
from tests.pair_rows import CRITIQUE_TEXT, PROMPTS, pair_rows, publish_pairs

PREFMILL = str(Path(sys.executable).with_name("prefmill"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    catalog = Catalog(tmp_path / "catalog")
    publish_pairs(catalog)
    return catalog


def _shown(catalog: Catalog, **kwargs) -> tuple[int, str]:
    console = Console(record=True, width=160, file=open(os.devnull, "w"))
    count = show_pairs(catalog, "pairs", console=console, **kwargs)
    return count, console.export_text()


@pytest.mark.parametrize("name_parent", [True, False])
def test_show_renders_a_revised_pair_with_the_critique_that_drove_it(tmp_path, name_parent):
    catalog = Catalog(tmp_path / "catalog")
    publish_pairs(catalog, name_parent=name_parent)
    count, text = _shown(catalog, where="chosen_revised_from IS NOT NULL")
    assert count == 1
    assert "When was the Eiffel Tower finished?" in text and "Yes, when was it completed?" in text
    assert "completed in March 1889" in text and "1899 for the Olympic Games" in text  # chosen and rejected
    assert "critique that drove the chosen revision" in text
    assert "The Eiffel Tower was completed in 1899." in text and CRITIQUE_TEXT in text
    assert "contradicted · fix" in text
    assert "It was built for a world's fair." not in text, "a supported, kept claim is no reason for a revision"
    assert "margin 1.700" in text and "P(chosen ≻ rejected) 0.846" in text and "score 1.500" in text


def test_show_without_a_critiques_row_says_so(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    catalog.publish(pa.Table.from_pylist(pair_rows(1), schema=PAIRS), "pairs", {"run_id": "no-critiques"}, PAIRS)
    count, text = _shown(catalog, where="chosen_revised_from IS NOT NULL")
    assert count == 1 and "revised from cand-eiffel-original" in text
    assert "no critiques row for cand-eiffel-original" in text


def test_show_filters_limits_and_refuses_writes(catalog):
    count, text = _shown(catalog, limit=3)
    assert count == 3 and "pair-1-0" in text and "pair-1-1" not in text  # ordered by prompt, then pair
    count, text = _shown(catalog, where="prompt_id = 'prompt-4'")
    assert count == 2 and "items[::-1]" in text and "critique" not in text
    with pytest.raises(CatalogError):
        _shown(catalog, where="true; DROP TABLE pairs")
    assert catalog.read("pairs").num_rows == 2 * len(PROMPTS)


@pytest.mark.parametrize("where", [
    "1=1); /* /* */ EXPLAIN SELECT 1 -- */ EXPLAIN ANALYZE COPY (SELECT 1 AS x) TO '{meta}' (FORMAT csv)",
    "1=1) UNION ALL SELECT * FROM pairs WHERE (1=1",
    "1=1 ORDER BY pair_id LIMIT 1 --",
    "margin > 0, margin < 9",
])
def test_show_where_is_one_expression_and_can_only_filter(catalog, where):
    before = catalog.metadata.path.read_bytes()
    with pytest.raises(CatalogError, match="refused|cannot parse"):
        _shown(catalog, where=where.format(meta=catalog.metadata.path))
    assert catalog.metadata.path.read_bytes() == before and catalog.read("pairs").num_rows == 2 * len(PROMPTS)


def test_show_where_keeps_comments_and_subqueries_that_read(catalog):
    count, _ = _shown(catalog, where="prompt_id IN (SELECT 'prompt-4') -- the python one", limit=10)
    assert count == 2


def test_show_cli(catalog):
    out = _run("show", "pairs", "--where", "margin > 2.05", "--limit", "10", "--catalog", str(catalog.root))
    assert "1 pair(s) shown" in out and "pair-5-0" in out and "boiling point" in out
    bad = subprocess.run([PREFMILL, "show", "--where", "nope > 1", "--catalog", str(catalog.root)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stdout


def test_card_has_yaml_header_counts_lineage_config_and_real_pictures(catalog, tmp_path):
    out = tmp_path / "card"
    export_trl(catalog, "pairs", out, test_size=0.2)
    card = write_card(catalog, "pairs", out)
    text = card.read_text()
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["size_categories"] == ["n<1K"] and "dpo" in header["tags"]
    assert header["configs"][0]["data_files"] == [{"split": "test", "path": "data/test-*"},
                                                  {"split": "train", "path": "data/train-*"}]
    assert "| pairs | 12 |" in text and "| prompts | 6 |" in text
    assert "| chosen replies revised by the critic | 1 |" in text
    assert "run-test" in text and '"min_margin": 0.1' in text and '{"critiques": ' in text
    for plot in PLOTS:
        assert f"]({plot.name}.png)" in text
        assert _png_size(out / f"{plot.name}.png") == (640, 400)
        assert _distinct_colours(out / f"{plot.name}.png") > 20, f"{plot.name}.png looks blank"


def test_card_cli_for_an_older_version_without_split_files(catalog, tmp_path):
    first = catalog.versions("pairs")[-1].version
    publish_pairs(catalog, pairs_per_prompt=1)
    out = tmp_path / "card"
    assert "README.md" in _run("card", "pairs", "--version", str(first), "--output", str(out),
                               "--catalog", str(catalog.root))
    text = (out / "README.md").read_text()
    assert f"# pairs, version {first}" in text and "| pairs | 12 |" in text
    assert "configs" not in yaml.safe_load(text.split("---\n")[1])
    assert all(_png_size(out / f"{p.name}.png") == (640, 400) for p in PLOTS)


def _run(*args: str) -> str:
    result = subprocess.run([PREFMILL, *args], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is no PNG"
    return struct.unpack(">II", data[16:24])


def _distinct_colours(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
