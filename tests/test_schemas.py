from __future__ import annotations

import pyarrow as pa
import pytest

from prefmill.schemas.tables import PAIRS, QUARANTINE, SCHEMA_VERSION, SCHEMAS, SchemaMismatch, conform


def test_every_schema_carries_name_and_version():
    for name, schema in SCHEMAS.items():
        assert schema.metadata[b"prefmill.schema"].decode() == name
        assert schema.metadata[b"prefmill.schema_version"] == SCHEMA_VERSION.encode()


def test_conform_names_the_missing_column_and_its_type():
    table = pa.table({"stage": ["s"], "source": ["f"], "reason": ["r"]})
    with pytest.raises(SchemaMismatch, match=r"missing column 'row' \(expected type string\)"):
        conform(table, QUARANTINE)


def test_conform_names_the_wrong_type():
    table = pa.table({"stage": ["s"], "source": ["f"], "reason": ["r"], "row": [3]})
    with pytest.raises(SchemaMismatch, match=r"column 'row' has type int64, expected string"):
        conform(table, QUARANTINE)


def test_conform_rejects_extra_columns_and_casts_lossless_widths():
    with pytest.raises(SchemaMismatch, match="unexpected column"):
        conform(pa.table({"stage": ["s"], "source": ["f"], "reason": ["r"], "row": ["x"], "x": [1]}), QUARANTINE)
    table = pa.table({"row": pa.array(["x"], pa.large_string()), "reason": ["r"], "stage": ["s"], "source": [None]})
    out = conform(table, QUARANTINE)
    assert out.schema == QUARANTINE and out.column_names == ["stage", "source", "reason", "row"]


def test_conform_checks_nested_message_lists():
    row = {name: None for name in PAIRS.names}
    row["prompt"] = [{"role": "user", "text": "wrong field name"}]
    with pytest.raises(SchemaMismatch, match="column 'prompt'"):
        conform(pa.Table.from_pylist([row]), PAIRS)
