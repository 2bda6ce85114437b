"""The bad-input catalogue (issue #12 B.3): every kind of bad input a user can give, and what they see.

Each case is a clear error (what, where, how to fix) or a quarantined row with its reason and `file:line`.
docs/troubleshooting.md has one line per case. No engine starts here: every check fails before.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.operators.flr import FollowUpFileError, load_followups
from prefmill.operators.seeds import SeedFileError, load_seeds
from prefmill.schemas.config import ConfigError, load_pipeline_config
from prefmill.serving.models import ModelSpecError, resolve_model
from prefmill.storage.catalog import Catalog, CatalogError
from tests.test_storage import pairs

GOOD = json.dumps({"question": "What is DNA?"})


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def quarantined(path: Path, **kwargs) -> dict[str, str]:
    """{file:line: reason} of the quarantined rows of a seed file that also has good rows."""
    loaded = load_seeds(path, **kwargs)
    assert loaded.seeds.num_rows >= 1
    return {row["source"]: row["reason"] for row in loaded.quarantine.to_pylist()}


def cli(*args: str) -> str:
    """Run `prefmill ARGS`, expect exit 2 with a message and no traceback; return the output."""
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert result.output.startswith("error:") or "error:" in result.output
    return " ".join(result.output.split())


# ---- seed files: quarantined rows -------------------------------------------------------------------------

@pytest.mark.parametrize("line, reason", [
    ('{"question": "broken', "bad JSON at column 14: Unterminated string"),                  # malformed JSON
    (json.dumps({"persona": "a chemist"}), "missing field 'question' (or 'topic')"),         # missing field
    (json.dumps({"question": 42}), "wrong type for field 'question': expected text, got int"),  # wrong type
    (json.dumps({"question": "x" * 50}), "field 'question' is too long (50 > 40 characters)"),  # oversize
    (json.dumps({"question": "ok?", "documents": "x" * 50}), "field 'documents' has a document that is too long"),
    ('{"question": "caf\udce9?"}', "bad encoding: not UTF-8"),                              # invalid UTF-8
    (json.dumps(["a", "list"]), "wrong type: a seed row must be an object, got list"),       # not an object
    (json.dumps({"question": "   "}), "empty field 'question'"),                              # blank question
])
def test_bad_jsonl_seed_rows_are_quarantined_with_file_line_and_reason(tmp_path, line, reason):
    raw = line.encode("utf-8", errors="surrogateescape")
    path = write(tmp_path / "seeds.jsonl", GOOD.encode() + b"\n" + raw + b"\n")
    bad = quarantined(path, max_text_chars=40)
    assert list(bad) == [f"{path}:2"] and bad[f"{path}:2"].startswith(reason)


def test_malformed_csv_rows_are_quarantined(tmp_path):
    data = b'question,persona\nWhat is DNA?,a child\ntoo,many,cells\nBad \xff byte?,x\n"Why" not,x\nOk?,x\n'
    bad = quarantined(write(tmp_path / "seeds.csv", data))
    path = tmp_path / "seeds.csv"
    assert bad == {f"{path}:3": "wrong number of cells: 3, the header has 2",
                   f"{path}:4": "bad encoding: not UTF-8 (invalid start byte at byte 4)",
                   f"{path}:5": "bad CSV: ',' expected after '\"'"}


def test_duplicate_seeds_quarantine_the_later_one_naming_the_first(tmp_path):
    path = write(tmp_path / "seeds.jsonl", f"{GOOD}\n{json.dumps({'question': 'Why?'})}\n{GOOD}\n")
    loaded = load_seeds(path)
    assert loaded.seeds.num_rows == 2
    assert quarantined(path) == {f"{path}:3": f"duplicate seed: same question, persona and documents as {path}:1"}


# ---- seed files: errors -----------------------------------------------------------------------------------

def _parquet(path: Path, table: pa.Table) -> Path:
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: write(d / "seeds.jsonl", ""), r"seeds.jsonl: no usable seed row \(0 bad: the file has no rows; "
                                             r"give one seed per line"),
    (lambda d: write(d / "seeds.parquet", b"PAR1 not parquet"), r"seeds.parquet: not a readable Parquet file .*"
                                                                 r"write it with pyarrow"),
    (lambda d: _parquet(d / "seeds.parquet", pa.table({"question": ["Q?"], "persona": [7]})),
     r"seeds.parquet: no usable seed row \(1 bad: .*seeds.parquet:1: wrong type for field 'persona': "
     r"expected text, got int"),
    (lambda d: write(d / "seeds.csv", "prompt,persona\nWhat is DNA?,a child\n"),
     r"seeds.csv: no usable seed row \(1 bad: .*seeds.csv:2: missing field 'question' \(or 'topic'\)"),
    (lambda d: write(d / "seeds.csv", "question,question\nA?,B?\n"), r"seeds.csv:1: duplicate column 'question'"),
    (lambda d: write(d / "seeds.txt", "What is DNA?\n"), r"unknown seed format '.txt'; use .jsonl, .csv or .parquet"),
    (lambda d: d, r"is a directory, not a seed file; give a .jsonl, .csv or .parquet file"),
    (lambda d: d / "missing.jsonl", r"missing.jsonl: no such seed file; give a .jsonl, .csv or .parquet"),
], ids=["empty", "corrupt-parquet", "parquet-wrong-types", "csv-no-question-column", "csv-duplicate-header",
        "unknown-extension", "directory", "missing-file"])
def test_unusable_seed_files_are_clear_errors(tmp_path, make, message):
    with pytest.raises(SeedFileError, match=message):
        load_seeds(make(tmp_path))


# ---- pipeline config: `prefmill run CONFIG --set k=v` fails before anything starts --------------------------

@pytest.mark.parametrize("override, expected", [
    ("candidates.nn=3", "candidates.nn: unknown key (value 3); did you mean candidates.n?"),
    ("candidate.n=3", "candidate: unknown key (value {'n': 3}); did you mean candidates?"),
    ("candidates.n=0", "candidates.n = 0: Input should be greater than or equal to 2"),
    ("shard_size=0", "shard_size = 0: Input should be greater than or equal to 1"),
    ("dedup.threshold=1.5", "dedup.threshold = 1.5: Input should be less than or equal to 1"),
    ("backend=gpu", "backend = 'gpu': Input should be 'engine', 'ray' or 'http'"),
    ("backend=http", "backend 'http' needs url (an OpenAI-compatible server): set url = 'http://127.0.0.1:8000/v1'"),
    ("pairs.strategy=best", "pairs.strategy = 'best': Input should be 'best_worst', 'best_vs_random_lower' or "
                            "'all_above_margin'"),
    ("selfchat.max_turns=two", "selfchat.max_turns = 'two': Input should be a valid integer"),
    ("dataset=My-Pairs", "dataset = 'My-Pairs': String should match pattern '^[a-z][a-z0-9_]{0,40}$'; use lowercase "
                         "letters, digits and '_', starting with a letter"),
    ("selfchat.max_turns", "--set expects key=value (e.g. selfchat.max_turns=2), got 'selfchat.max_turns'"),
])
def test_invalid_config_values_fail_before_any_engine_starts(tmp_path, override, expected):
    assert expected in cli("run", "--set", override, "--catalog", str(tmp_path / "catalog"))
    assert not (tmp_path / "catalog").exists()


def test_a_config_toml_with_a_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "run.toml", "[seeds]\nlimit = 3\n[candidates\nn = 2\n")
    out = cli("run", str(path))
    assert f"cannot read config {path}" in out and "line 3" in out


def test_a_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read config .*nope.toml: .*No such file"):
        load_pipeline_config(tmp_path / "nope.toml")


# ---- models and Ray ---------------------------------------------------------------------------------------

def test_unknown_model_spec_lists_what_a_spec_can_be():
    with pytest.raises(ModelSpecError, match=r"model spec 'gpt 5' is neither an embedded model \(smollm2-135m\), "
                                             r"an existing model folder, nor a hub id like"):
        resolve_model("gpt 5")


def test_a_model_folder_without_config_json_says_what_it_needs(tmp_path):
    with pytest.raises(ModelSpecError, match=r"has no config.json, so it is no HF model; give a folder written by "
                                             r"save_pretrained"):
        resolve_model(str(tmp_path))


def test_unknown_chat_backend_lists_the_backends():
    assert "unknown backend 'gpu': use one of engine, ray, http" in cli("chat", "hi", "--backend", "gpu")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_fails_fast_with_a_hint():
    address = f"127.0.0.1:{_closed_port()}"
    out = cli("chat", "hi", "--backend", "ray", "--address", address)
    assert f"no Ray cluster answers at '{address}'" in out and "ray start --head" in out


def test_a_ray_address_without_a_port_is_refused():
    out = cli("chat", "hi", "--backend", "ray", "--address", "headnode")
    assert "Ray address 'headnode' is not host:port" in out


# ---- follow-up sets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("", r"followups.json:1: bad JSON at column 1: Expecting value; expected \{\"aspect\""),
    ('{"tone": {"positive": ["Thanks!"],\n "negative": ["No."],}}', r"followups.json:2: bad JSON at column"),
    ('["Thanks!"]', r"followups.json: expected a JSON object .*, got list"),
    ('{"tone": {"positive": [1], "negative": ["No."]}}', r"aspect 'tone' has an empty or non-text positive "
                                                         r"follow-up \(1\)"),
    ('{"tone": {"positive": "Thanks!", "negative": ["No."]}}', r"aspect 'tone' positive must be a list of texts, "
                                                               r"got str"),
    ('{"tone": {"positive": ["Thanks!"]}}', r"needs at least one positive and one negative follow-up"),
], ids=["empty", "malformed-json", "not-an-object", "non-text-entry", "text-not-list", "no-negative"])
def test_bad_followup_files_are_clear_errors(tmp_path, text, message):
    with pytest.raises(FollowUpFileError, match=message):
        load_followups(write(tmp_path / "followups.json", text))


def test_a_missing_followup_file_says_how_to_fix(tmp_path):
    with pytest.raises(FollowUpFileError, match=r"nope.json: cannot read the follow-up file .*set flr.followups"):
        load_followups(tmp_path / "nope.json")


# ---- catalog, SQL and exports ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-input") / "catalog"
    Catalog(root).publish(pairs(2), "pairs", {"run_id": "bad-input"})
    return root


@pytest.mark.parametrize("args, expected", [
    (["sql", "SELEC * FROM pairs"], 'cannot parse SQL: Parser Error: syntax error at or near "SELEC"'),
    (["sql", "DELETE FROM pairs"], "refused: DELETE statements change the catalog or the session; `prefmill sql` is "
                                   "read-only"),
    (["sql", "SELECT * FROM read_text('/etc/hostname')"], "refused: table function read_text() may write, run other "
                                                          "SQL or read outside the catalog"),
    (["sql", "SELECT * FROM read_csv('/etc/passwd')"], "refused: table function read_csv()"),
    (["sql", "SELECT * FROM nosuch"], "Table with name nosuch does not exist"),
    (["show", "pairs", "--where", "1=1); DROP TABLE pairs; --"], "refused: DROP statements change the catalog"),
    (["show", "pairs", "--where", "nocol > 1"], 'Referenced column "nocol" not found'),
    (["export", "pairs", "--version", "999", "-o", "x.parquet"], "dataset 'pairs' has no version 999; versions: [1]"),
    (["export", "pairs", "--format", "xml", "-o", "x.xml"], "unknown export format 'xml': use parquet, jsonl or trl"),
    (["export", "Bad-Name", "-o", "x.parquet"], "invalid dataset name 'Bad-Name': use lowercase letters, digits and"),
    (["export", "nosuch", "-o", "x.parquet"], "no dataset named 'nosuch' in"),
], ids=["malformed-sql", "writing-sql", "file-reading-sql", "read-csv-sql", "unknown-table", "where-writes",
        "where-unknown-column", "unknown-version", "unknown-export-format", "bad-dataset-name", "unknown-dataset"])
def test_catalog_commands_refuse_bad_input_clearly(catalog, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    assert expected in cli(*args, "--catalog", str(catalog))


def test_a_missing_catalog_is_reported_not_created_with_data(tmp_path):
    result = CliRunner().invoke(app, ["datasets", "--catalog", str(tmp_path / "none")])
    assert result.exit_code == 0 and f"no catalog yet at {tmp_path / 'none'}" in " ".join(result.output.split())
    assert f"no dataset named 'pairs' in {tmp_path / 'none2'}" in cli(
        "export", "pairs", "-o", str(tmp_path / "x.parquet"), "--catalog", str(tmp_path / "none2"))


def test_a_schema_mismatched_publish_names_the_column(catalog):
    table = pairs(1, offset=9)
    renamed = table.rename_columns(["x_pair_id" if n == "pair_id" else n for n in table.column_names])
    with pytest.raises(CatalogError, match=r"table does not match dataset 'pairs': missing column 'pair_id' "
                                           r"\(VARCHAR\); unexpected column 'x_pair_id'"):
        Catalog(catalog).publish(renamed, "pairs")
    retyped = table.set_column(table.schema.get_field_index("prompt_id"), "prompt_id", pa.array([5]))
    with pytest.raises(CatalogError, match=r"column 'prompt_id' has type BIGINT, the dataset has VARCHAR"):
        Catalog(catalog).publish(retyped, "pairs")
    assert [v.version for v in Catalog(catalog).versions("pairs")] == [1]


def test_a_publish_to_a_reserved_name_is_refused(catalog):
    with pytest.raises(CatalogError, match=r"invalid dataset name 'prefmill_lineage': .*not starting with "
                                           r"'prefmill_'"):
        Catalog(catalog).publish(pairs(1), "prefmill_lineage")


@pytest.mark.parametrize("command", [["datasets"], ["sql", "SELECT 1"], ["export", "pairs", "-o", "x.parquet"]])
def test_a_catalog_folder_that_is_a_file_is_named(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "catalog", "not a folder")
    assert f"catalog {path} is a file, not a folder; give --catalog a folder" in cli(*command, "--catalog", str(path))


@pytest.mark.parametrize("command", [["datasets"], ["sql", "SELECT 1"], ["export", "pairs", "-o", "x.parquet"]])
def test_a_corrupt_catalog_metadata_file_is_named_with_a_fix(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "catalog").mkdir()
    meta = write(tmp_path / "catalog" / "meta.ducklake", bytes(range(256)) * 16)
    out = cli(*command, "--catalog", str(tmp_path / "catalog"))
    assert f"cannot open the catalog metadata {meta}" in out and "restore it from a backup" in out


def test_sql_on_a_missing_catalog_says_there_is_none_yet(tmp_path):
    out = cli("sql", "SELECT * FROM pairs", "--catalog", str(tmp_path / "none"))
    assert f"no catalog yet at {tmp_path / 'none'}: publish a dataset first" in out


@pytest.mark.parametrize("key, name, text, expected", [
    ("seeds.path", "seeds.jsonl", "", "seeds.jsonl: no usable seed row (0 bad: the file has no rows"),
    ("flr.followups", "followups.json", "", "followups.json:1: bad JSON at column 1: Expecting value"),
])
def test_prefmill_run_checks_its_input_files_before_the_flow_starts(tmp_path, key, name, text, expected):
    path = write(tmp_path / name, text)
    assert expected in cli("run", "--set", f"{key}={json.dumps(str(path))}", "--catalog", str(tmp_path / "catalog"))
