from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefmill.operators.seeds import BUILTIN_SEEDS, SeedFileError, load_seeds


def test_builtin_seeds_are_complete_and_unique():
    loaded = load_seeds()
    rows = loaded.seeds.to_pylist()
    assert len(rows) >= 50 and loaded.quarantine.num_rows == 0
    assert len({r["seed_id"] for r in rows}) == len(rows)
    assert all(r["documents"] and r["persona"] and r["domain"] and r["reference_answer"] for r in rows)
    assert len({r["domain"] for r in rows}) >= 8
    assert rows[0]["source"] == f"{BUILTIN_SEEDS}:1"


def test_seed_ids_are_stable_across_loads():
    assert load_seeds().seeds.column("seed_id") == load_seeds().seeds.column("seed_id")


def test_bad_jsonl_rows_are_quarantined_with_line_and_reason(tmp_path):
    path = tmp_path / "seeds.jsonl"
    lines = [
        json.dumps({"question": "What is DNA?", "documents": ["DNA stores genes."]}).encode(),
        b'{"question": "broken',
        json.dumps({"persona": "no question here"}).encode(),
        json.dumps({"question": 42}).encode(),
        json.dumps({"question": "   "}).encode(),
        json.dumps({"question": "x" * 30}).encode(),
        b'{"question": "caf\xe9?"}',
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"question": "ok", "documents": [1, 2]}).encode(),
        b"",
        json.dumps({"topic": "Photosynthesis", "persona": "a gardener"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines))
    loaded = load_seeds(path, max_text_chars=20)
    assert loaded.seeds.column("question").to_pylist() == ["What is DNA?", "Photosynthesis"]
    assert loaded.seeds.column("source").to_pylist() == [f"{path}:1", f"{path}:11"]
    bad = {row["source"]: row["reason"] for row in loaded.quarantine.to_pylist()}
    assert bad == {
        f"{path}:2": "bad JSON at column 14: Unterminated string starting at",
        f"{path}:3": "missing field 'question' (or 'topic')",
        f"{path}:4": "wrong type for field 'question': expected text, got int",
        f"{path}:5": "empty field 'question'",
        f"{path}:6": "field 'question' is too long (30 > 20 characters)",
        f"{path}:7": "bad encoding: not UTF-8 (invalid continuation byte at byte 17)",
        f"{path}:8": "wrong type: a seed row must be an object, got list",
        f"{path}:9": "wrong type for field 'documents': expected a list of texts",
    }
    assert all(row["stage"] == "seeds" and row["row"] for row in loaded.quarantine.to_pylist())


def test_csv_seeds_with_documents_and_a_bad_row(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text('question,persona,documents\nWhat is rain?,a child,"[""Rain is water falling.""]"\n'
                    ',nobody,\nWhy is grass green?,,Chlorophyll reflects green light.\n')
    loaded = load_seeds(path)
    rows = loaded.seeds.to_pylist()
    assert [r["documents"] for r in rows] == [["Rain is water falling."], ["Chlorophyll reflects green light."]]
    assert rows[1]["persona"] is None
    assert loaded.quarantine.to_pylist()[0]["source"] == f"{path}:3"


def test_parquet_seeds(tmp_path):
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"question": ["What is a star?", None], "documents": [["Stars fuse hydrogen."], None]}),
                   path)
    loaded = load_seeds(path)
    assert loaded.seeds.num_rows == 1 and loaded.quarantine.column("source").to_pylist() == [f"{path}:2"]


def test_a_file_with_no_usable_row_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"persona": "x"}\nnot json\n')
    with pytest.raises(SeedFileError, match=r"empty.jsonl: no usable seed row \(2 bad: .*empty.jsonl:1: missing"):
        load_seeds(path)
    with pytest.raises(SeedFileError, match="unknown seed format"):
        load_seeds(tmp_path / "x.txt") if (tmp_path / "x.txt").write_text("q") else None
    with pytest.raises(SeedFileError, match="no such seed file"):
        load_seeds(tmp_path / "missing.jsonl")


def test_every_csv_row_with_undecodable_bytes_is_quarantined_with_its_line(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_bytes(b"question,persona\nWhat is rain?,a child\nWhy caf\xe9?,x\nWhat is snow?,\n"
                     b"Is it \xff\xfe here?,y\nWhat is hail?,a farmer\n")
    loaded = load_seeds(path)
    assert loaded.seeds.column("question").to_pylist() == ["What is rain?", "What is snow?", "What is hail?"]
    bad = {row["source"]: row["reason"] for row in loaded.quarantine.to_pylist()}
    assert bad == {f"{path}:3": "bad encoding: not UTF-8 (invalid continuation byte at byte 7)",
                   f"{path}:5": "bad encoding: not UTF-8 (invalid start byte at byte 6)"}
    assert [row["row"] for row in loaded.quarantine.to_pylist()] == ["Why caf\\xe9?,x\n", "Is it \\xff\\xfe here?,y\n"]


def test_a_replacement_character_in_valid_utf8_is_text_not_a_decode_error(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("question\nWhat does \ufffd mean?\n", encoding="utf-8")
    loaded = load_seeds(path)
    assert loaded.seeds.column("question").to_pylist() == ["What does \ufffd mean?"]
    assert loaded.quarantine.num_rows == 0


def test_every_malformed_csv_row_ends_in_the_quarantine(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text('question,persona,documents\nWhat is rain?,a child,Rain falls.\n'
                    'What is a short row?\n'
                    'What, with an unquoted comma?,a reader,Docs.,extra\n'
                    '\n'
                    '"quoted"tail,x,y\n'
                    ',,\n'
                    '"What is a\n'
                    'multi-line ""question""?",,\n'
                    'Why is this one open?,x,"never closed\nWhat is lost?,y,z\n')
    loaded = load_seeds(path)
    assert loaded.seeds.column("question").to_pylist() == ["What is rain?", 'What is a\nmulti-line "question"?']
    assert loaded.seeds.column("source").to_pylist() == [f"{path}:2", f"{path}:8"]
    bad = {row["source"]: row["reason"] for row in loaded.quarantine.to_pylist()}
    assert bad == {
        f"{path}:3": "wrong number of cells: 1, the header has 3",
        f"{path}:4": "wrong number of cells: 5, the header has 3",
        f"{path}:6": "bad CSV: ',' expected after '\"'",
        f"{path}:7": "missing field 'question' (or 'topic')",
        f"{path}:10": "bad CSV: unexpected end of data",
    }
    rows = {row["source"]: row["row"] for row in loaded.quarantine.to_pylist()}
    assert rows[f"{path}:10"] == 'Why is this one open?,x,"never closed\nWhat is lost?,y,z\n'


def test_csv_headers_that_cannot_key_rows_are_a_clear_error(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("question,persona,question\nWhat is rain?,x,Why?\n")
    with pytest.raises(SeedFileError, match=r"seeds.csv:1: duplicate column 'question'"):
        load_seeds(path)
    path.write_bytes(b"question,pers\xffona\nWhat is rain?,x\n")
    with pytest.raises(SeedFileError, match=r"seeds.csv:1: unreadable header: bad encoding"):
        load_seeds(path)


def test_empty_and_null_json_rows_are_quarantined(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"question": "What is rain?"}\n{}\nnull\n""\n')
    loaded = load_seeds(path)
    assert loaded.seeds.num_rows == 1
    bad = {row["source"]: row["reason"] for row in loaded.quarantine.to_pylist()}
    assert bad == {f"{path}:2": "missing field 'question' (or 'topic')",
                   f"{path}:3": "wrong type: a seed row must be an object, got NoneType",
                   f"{path}:4": "wrong type: a seed row must be an object, got str"}
