"""Arrow types as DuckLake column types, and the check that an incoming table fits a dataset's columns."""

from __future__ import annotations

import pyarrow as pa

from prefmill.storage.errors import CatalogError

_SQL_TYPES = {"string": "VARCHAR", "large_string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT",
              "float": "FLOAT", "double": "DOUBLE", "bool": "BOOLEAN"}


def sql_type(t: pa.DataType) -> str:
    """The DuckLake column type for an Arrow type. Lists are variable-length `T[]` (an embedding is
    `FLOAT[]`): DuckLake refuses fixed-size arrays such as `FLOAT[384]`."""
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"{sql_type(t.value_type)}[]"
    if pa.types.is_struct(t):
        inner = ", ".join(f'"{t.field(i).name}" {sql_type(t.field(i).type)}' for i in range(t.num_fields))
        return f"STRUCT({inner})"
    if str(t) not in _SQL_TYPES:
        raise CatalogError(f"no DuckLake column type for Arrow type {t}")
    return _SQL_TYPES[str(t)]


def column_definitions(schema: pa.Schema) -> str:
    """`"name" TYPE, …` for a CREATE TABLE."""
    return ", ".join(f'"{f.name}" {sql_type(f.type)}' for f in schema)


def evolve_columns(dataset: str, table: pa.Table, existing: pa.Schema) -> tuple[pa.Table, list[pa.Field]]:
    """`table` (conformed to a newer version of the dataset's schema) fitted to the dataset as it will be:
    the columns it brings are added to the dataset (returned, for `ALTER TABLE … ADD COLUMN`), and the
    dataset's columns it no longer has are null. Types must still match."""
    added = [field for field in table.schema if field.name not in existing.names]
    for field in existing:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    return match_columns(dataset, table, pa.schema(list(existing) + added)), added


def match_columns(dataset: str, table: pa.Table, existing: pa.Schema) -> pa.Table:
    """`table`'s columns in the dataset's order, or a `CatalogError` naming every column that is missing,
    unexpected, or of another type. Columns are matched by name, never by position."""
    problems = [f"missing column '{name}' ({sql_type(existing.field(name).type)})"
                for name in existing.names if name not in table.column_names]
    problems += [f"unexpected column '{name}'" for name in table.column_names if name not in existing.names]
    for field in table.schema:
        if field.name in existing.names:
            ours, theirs = sql_type(field.type), sql_type(existing.field(field.name).type)
            if ours != theirs:
                problems.append(f"column '{field.name}' has type {ours}, the dataset has {theirs}")
    if problems:
        raise CatalogError(f"table does not match dataset {dataset!r}: " + "; ".join(problems))
    return table.select(existing.names)
