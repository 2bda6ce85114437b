"""Arrow schemas of every table prefmill writes, each tagged with its name and version.

Stages pass `pyarrow.Table`s between each other; `conform` is the one gate a table goes through
before it is published, so a wrong column fails loudly with its name and expected type.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "5"

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

ASPECT_SCORE = pa.struct(
    [("aspect", pa.string()), ("positive", pa.float64()), ("negative", pa.float64()), ("score", pa.float64())]
)
CLAIM = pa.struct(
    [
        ("claim", pa.string()),
        ("verdict", pa.string()),
        ("critique", pa.string()),
        ("evidence", pa.string()),
        ("action", pa.string()),
        ("raw_output", pa.string()),
        ("error", pa.string()),
    ]
)
GATE_EVENT = pa.struct(
    [("turn", pa.int32()), ("gate", pa.string()), ("action", pa.string()), ("text", pa.string())]
)
CRITIQUE_ROUND = pa.struct(
    [
        ("round", pa.int32()),
        ("response", pa.string()),
        ("claims", pa.list_(CLAIM)),
        ("score", pa.float64()),
        ("raw_output", pa.string()),
        ("error", pa.string()),
    ]
)


def _schema(name: str, fields: list[tuple[str, pa.DataType]]) -> pa.Schema:
    meta = {"prefmill.schema": name, "prefmill.schema_version": SCHEMA_VERSION}
    return pa.schema(fields, metadata=meta)


SEEDS = _schema(
    "seeds",
    [
        ("seed_id", pa.string()),
        ("question", pa.string()),
        ("persona", pa.string()),
        ("documents", pa.list_(pa.string())),
        ("reference_answer", pa.string()),
        ("domain", pa.string()),
        ("final_answer", pa.string()),
        ("answer_type", pa.string()),
        ("gold_solution", pa.string()),
        ("source", pa.string()),
    ],
)

CONVERSATIONS = _schema(
    "conversations",
    [
        ("conversation_id", pa.string()),
        ("seed_id", pa.string()),
        ("messages", MESSAGES),
        ("num_turns", pa.int32()),
        ("ended_by", pa.string()),
        ("num_tokens", pa.int64()),
        ("simulator_model", pa.string()),
        ("assistant_model", pa.string()),
        ("gates", pa.list_(GATE_EVENT)),
    ],
)

BRANCHES = _schema(
    "branches",
    [
        ("branch_id", pa.string()),
        ("conversation_id", pa.string()),
        ("seed_id", pa.string()),
        ("branch_turn", pa.int32()),
        ("prefix_length", pa.int32()),
        ("messages", MESSAGES),
        ("num_turns", pa.int32()),
        ("ended_by", pa.string()),
        ("num_tokens", pa.int64()),
        ("seed_offset", pa.int64()),
        ("simulator_model", pa.string()),
        ("assistant_model", pa.string()),
        ("gates", pa.list_(GATE_EVENT)),
        ("turn_rewards", pa.list_(pa.float64())),
        ("future_reward", pa.float64()),
        ("original_turn_rewards", pa.list_(pa.float64())),
        ("original_future_reward", pa.float64()),
        ("scorer_model", pa.string()),
    ],
)

CANDIDATES = _schema(
    "candidates",
    [
        ("candidate_id", pa.string()),
        ("context_id", pa.string()),
        ("conversation_id", pa.string()),
        ("seed_id", pa.string()),
        ("context", MESSAGES),
        ("reply", pa.string()),
        ("sample_index", pa.int32()),
        ("sampling_seed", pa.int64()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("is_duplicate", pa.bool_()),
        ("model", pa.string()),
        ("is_teacher", pa.bool_()),
    ],
)

REWARDS = _schema(
    "rewards",
    [
        ("candidate_id", pa.string()),
        ("context_id", pa.string()),
        ("reward", pa.float64()),
        ("aspects", pa.list_(ASPECT_SCORE)),
        ("aggregation", pa.string()),
        ("truncated_tokens", pa.int32()),
        ("scorer_model", pa.string()),
    ],
)

CRITIQUES = _schema(
    "critiques",
    [
        ("candidate_id", pa.string()),
        ("context_id", pa.string()),
        ("rounds", pa.list_(CRITIQUE_ROUND)),
        ("final_response", pa.string()),
        ("initial_score", pa.float64()),
        ("final_score", pa.float64()),
        ("num_parse_failures", pa.int32()),
        ("num_calls", pa.int32()),
        ("critic_model", pa.string()),
    ],
)

JUDGEMENTS = _schema(
    "judgements",
    [
        ("candidate_id", pa.string()),
        ("context_id", pa.string()),
        ("aspect", pa.string()),
        ("score", pa.int32()),
        ("feedback", pa.string()),
        ("used_reference", pa.bool_()),
        ("raw_output", pa.string()),
        ("error", pa.string()),
        ("judge_model", pa.string()),
    ],
)

SOLUTIONS = _schema(
    "solutions",
    [
        ("solution_id", pa.string()),
        ("seed_id", pa.string()),
        ("prompt", MESSAGES),
        ("solution", pa.string()),
        ("sample_index", pa.int32()),
        ("sampling_seed", pa.int64()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("answer", pa.string()),
        ("is_correct", pa.bool_()),
        ("verify_reason", pa.string()),
        ("final_answer", pa.string()),
        ("answer_type", pa.string()),
        ("model", pa.string()),
    ],
)

PAIRS = _schema(
    "pairs",
    [
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("chosen_candidate_id", pa.string()),
        ("rejected_candidate_id", pa.string()),
        ("chosen_revised_from", pa.string()),
        ("rejected_revised_from", pa.string()),
        ("score_chosen", pa.float64()),
        ("score_rejected", pa.float64()),
        ("chosen_reward", pa.float64()),
        ("rejected_reward", pa.float64()),
        ("chosen_factuality", pa.float64()),
        ("rejected_factuality", pa.float64()),
        ("margin", pa.float64()),
        ("chosen_win_prob", pa.float64()),
        ("chosen_mean_win_prob", pa.float64()),
        ("rejected_mean_win_prob", pa.float64()),
        ("num_candidates", pa.int32()),
        ("strategy", pa.string()),
        ("conversation_id", pa.string()),
        ("seed_id", pa.string()),
        ("policy_model", pa.string()),
        ("scorer_model", pa.string()),
        ("critic_model", pa.string()),
        ("run_id", pa.string()),
        ("source", pa.string()),
        ("iteration", pa.int32()),
        ("policy_id", pa.string()),
        ("pass_rate", pa.float64()),
        ("chosen_is_correct", pa.bool_()),
        ("rejected_is_correct", pa.bool_()),
        ("chosen_answer", pa.string()),
        ("rejected_answer", pa.string()),
        ("gold_answer", pa.string()),
        ("step_index", pa.int32()),
        ("step_success_rates", pa.list_(pa.float64())),
        ("step_locator", pa.string()),
        ("chosen_solution", pa.string()),
        ("rejected_solution", pa.string()),
        ("chosen_judge", pa.float64()),
        ("rejected_judge", pa.float64()),
        ("chosen_is_teacher", pa.bool_()),
        ("rejected_is_teacher", pa.bool_()),
        ("branch_turn", pa.int32()),
        ("chosen_turn_rewards", pa.list_(pa.float64())),
        ("rejected_turn_rewards", pa.list_(pa.float64())),
        ("future_reward_diff", pa.float64()),
    ],
)

PAIR_EMBEDDINGS = _schema(
    "pair_embeddings",
    [
        ("pair_id", pa.string()),
        ("prompt_id", pa.string()),
        ("dedup_key", pa.string()),
        ("embedder", pa.string()),
        ("prompt_vector", pa.list_(pa.float32())),
        ("reply_vector", pa.list_(pa.float32())),
        ("run_id", pa.string()),
    ],
)

PAIR_REJECTS = _schema(
    "pair_rejects",
    [
        ("prompt_id", pa.string()),
        ("candidate_id", pa.string()),
        ("seed_id", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("num_candidates", pa.int32()),
        ("best_margin", pa.float64()),
        ("run_id", pa.string()),
        ("source", pa.string()),
        ("pass_rate", pa.float64()),
    ],
)

DEDUP_REMOVED = _schema(
    "dedup_removed",
    [
        ("removed_pair_id", pa.string()),
        ("duplicate_of", pa.string()),
        ("duplicate_of_version", pa.int64()),
        ("similarity", pa.float64()),
        ("prompt_similarity", pa.float64()),
        ("reply_similarity", pa.float64()),
        ("rule", pa.string()),
        ("dedup_on", pa.string()),
        ("threshold", pa.float64()),
        ("reply_threshold", pa.float64()),
        ("embedder", pa.string()),
        ("run_id", pa.string()),
    ],
)

QUARANTINE = _schema(
    "quarantine",
    [
        ("stage", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
        ("row", pa.string()),
    ],
)

SCHEMAS: dict[str, pa.Schema] = {
    s.metadata[b"prefmill.schema"].decode(): s
    for s in (SEEDS, CONVERSATIONS, BRANCHES, CANDIDATES, REWARDS, CRITIQUES, JUDGEMENTS, SOLUTIONS, PAIRS,
              PAIR_EMBEDDINGS, PAIR_REJECTS, DEDUP_REMOVED, QUARANTINE)
}


class SchemaMismatch(ValueError):
    """A table does not have the columns and types its schema asks for."""


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return `table` with exactly `schema`'s columns in order, or raise naming the bad column.

    Columns are cast only when the cast is lossless (e.g. large_string → string, an all-null column
    to any type); anything else is an error that names the column, the expected and the actual type.
    """
    name = (schema.metadata or {}).get(b"prefmill.schema", b"table").decode()
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        raise SchemaMismatch(f"{name}: unexpected column(s) {extra}; expected columns {schema.names}")
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaMismatch(f"{name}: missing column '{field.name}' (expected type {field.type})")
        columns.append(_cast_column(name, field, table.column(field.name)))
    return pa.Table.from_arrays(columns, schema=schema)


def _cast_column(table_name: str, field: pa.Field, column: pa.ChunkedArray) -> pa.ChunkedArray:
    if column.type == field.type:
        return column
    problem = f"{table_name}: column '{field.name}' has type {column.type}, expected {field.type}"
    if pa.types.is_null(column.type):
        return pa.chunked_array([pa.nulls(len(column), field.type)], field.type)
    if _kind(column.type) != _kind(field.type):
        raise SchemaMismatch(problem)
    try:
        return column.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise SchemaMismatch(problem) from exc


def _kind(t: pa.DataType) -> object:
    """The shape of a type with widths erased: string≈large_string, int32≈int64, list≈large_list."""
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _kind(t.value_type))
    if pa.types.is_struct(t):
        return ("struct", tuple((t.field(i).name, _kind(t.field(i).type)) for i in range(t.num_fields)))
    return str(t)
