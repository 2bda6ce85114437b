"""Seeds: questions (or topics) with an optional persona, source documents and reference answer, and for the
gold-anchored sources a short `final_answer` to verify (with its `answer_type`, `math` by default) and a worked
`gold_solution`.

`load_seeds` reads JSONL, CSV or Parquet. A bad row is quarantined with its file, line and reason and
the rest goes on; a file with no usable row is an error. Seed ids hash the content, so the same seed
gets the same id in every run (what resume and lineage key on).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from prefmill.operators.ids import stable_id
from prefmill.operators.verify import ANSWER_TYPES, gold_problem
from prefmill.schemas.tables import QUARANTINE, SEEDS

BUILTIN_SEEDS = Path(__file__).with_name("data") / "builtin_seeds.jsonl"
MAX_TEXT_CHARS = 20_000
TEXT_FIELDS = ("question", "persona", "reference_answer", "domain", "final_answer", "answer_type", "gold_solution")
DEFAULT_ANSWER_TYPE = ANSWER_TYPES[0]


class SeedFileError(ValueError):
    """A seed file that cannot be read or has no usable row."""


@dataclass(frozen=True)
class SeedLoad:
    seeds: pa.Table
    quarantine: pa.Table


def load_seeds(path: Path | str = BUILTIN_SEEDS, max_text_chars: int = MAX_TEXT_CHARS) -> SeedLoad:
    """Read seeds from `path` (.jsonl/.json, .csv, .parquet); bad rows go to the quarantine table."""
    path = _seed_file(Path(path))
    good, bad = [], []
    first_line: dict[str, str] = {}
    for line, raw, problem in _records(path):
        where = f"{path}:{line}"
        row, problem = (None, problem) if problem else _seed_row(raw, where, max_text_chars)
        if row and row["seed_id"] in first_line:
            row, problem = None, f"duplicate seed: same question, persona and documents as {first_line[row['seed_id']]}"
        if problem:
            bad.append({"stage": "seeds", "source": where, "reason": problem, "row": _as_text(raw)})
        else:
            first_line[row["seed_id"]] = where
            good.append(row)
    if not good:
        reasons = "; ".join(f"{b['source']}: {b['reason']}" for b in bad[:5])
        hint = reasons or "the file has no rows; give one seed per line, e.g. {\"question\": \"What is DNA?\"}"
        raise SeedFileError(f"{path}: no usable seed row ({len(bad)} bad: {hint})")
    return SeedLoad(pa.Table.from_pylist(good, schema=SEEDS), pa.Table.from_pylist(bad, schema=QUARANTINE))


def _seed_file(path: Path) -> Path:
    """`path` if it is a readable file, else a `SeedFileError` that says what to give instead."""
    if not path.exists():
        raise SeedFileError(f"{path}: no such seed file; give a .jsonl, .csv or .parquet file (seeds.path)")
    if not path.is_file():
        raise SeedFileError(f"{path}: is a directory, not a seed file; give a .jsonl, .csv or .parquet file")
    return path


def seed_id(question: str, persona: str | None, documents: list[str]) -> str:
    return stable_id("seed", question, persona, documents)


def _records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, raw record, problem) for each row; line numbers are 1-based file lines."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise SeedFileError(f"{path}: not a readable Parquet file ({exc}); write it with pyarrow or pandas "
                                "to_parquet, or use .jsonl/.csv") from None
        for k, row in enumerate(rows, 1):
            yield k, row, None
        return
    if suffix not in {".jsonl", ".json", ".csv"}:
        raise SeedFileError(f"{path}: unknown seed format {suffix!r}; use .jsonl, .csv or .parquet")
    data = path.read_bytes()
    if suffix == ".csv":
        yield from _csv_records(data, path)
    else:
        yield from _jsonl_records(data)


def _jsonl_records(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    for k, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        problem = _encoding_problem(raw)
        if problem:
            yield k, raw, problem
            continue
        text = raw.decode("utf-8")
        try:
            yield k, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield k, text, f"bad JSON at column {exc.colno}: {exc.msg}"


def _csv_records(data: bytes, path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Every CSV record keyed by the header, or its raw text and why it is not a row: bad bytes, bad
    quoting, a cell count that differs from the header's. Only blank lines are skipped."""
    records = _csv_cells(data.decode("utf-8-sig", errors="surrogateescape"))
    header = _csv_header(records, path)
    for line, raw, cells, problem in records:
        if not raw.strip():
            continue
        problem = problem or _encoding_problem(_undecoded(raw))
        if not problem and len(cells) != len(header):
            problem = f"wrong number of cells: {len(cells)}, the header has {len(header)}"
        yield (line, _undecoded(raw), problem) if problem else (line, dict(zip(header, cells)), None)


def _csv_cells(text: str) -> Iterator[tuple[int, str, list[str], str | None]]:
    """(first line, raw text, cells, CSV error) per record, blank lines included. Undecodable bytes stay
    in the text as lone surrogates (surrogateescape), so a U+FFFD the file really holds stays text."""
    consumed: list[str] = []

    def lines() -> Iterator[str]:
        for line in io.StringIO(text, newline=""):
            consumed.append(line)
            yield line

    reader = csv.reader(lines(), strict=True)
    while True:
        first = reader.line_num + 1
        try:
            cells, problem = next(reader), None
        except StopIteration:
            return
        except csv.Error as exc:
            cells, problem = [], f"bad CSV: {exc}"
        yield first, "".join(consumed), cells, problem
        consumed.clear()


def _csv_header(records: Iterator[tuple[int, str, list[str], str | None]], path: Path) -> list[str]:
    """The column names: the first non-blank record. A header that cannot key the rows (undecodable, badly
    quoted, a name twice) makes the file unreadable rather than every row quarantined or silently merged."""
    for line, raw, cells, problem in records:
        if not raw.strip():
            continue
        problem = problem or _encoding_problem(_undecoded(raw))
        if problem:
            raise SeedFileError(f"{path}:{line}: unreadable header: {problem}")
        duplicates = sorted({c for c in cells if cells.count(c) > 1})
        if duplicates:
            raise SeedFileError(f"{path}:{line}: duplicate column {duplicates[0]!r} in the header")
        return cells
    return []


def _undecoded(text: str) -> bytes:
    """The file's bytes behind `text` decoded with surrogateescape."""
    return text.encode("utf-8", errors="surrogateescape")


def _encoding_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"bad encoding: not UTF-8 ({exc.reason} at byte {exc.start})"
    return None


def _seed_row(raw: Any, where: str, max_chars: int) -> tuple[dict | None, str | None]:
    if not isinstance(raw, dict):
        return None, f"wrong type: a seed row must be an object, got {type(raw).__name__}"
    question = raw.get("question") or raw.get("topic")
    if question is None:
        return None, "missing field 'question' (or 'topic')"
    fields = {"question": question, **{f: raw.get(f) for f in TEXT_FIELDS[1:]}}
    if isinstance(fields["final_answer"], (int, float)) and not isinstance(fields["final_answer"], bool):
        fields["final_answer"] = str(fields["final_answer"])  # a JSON number is a fine gold answer
    for name, value in fields.items():
        problem = _text_problem(name, value, max_chars, required=name == "question")
        if problem:
            return None, problem
    documents, problem = _documents(raw.get("documents"), max_chars)
    if problem:
        return None, problem
    fields = {k: (v.strip() if isinstance(v, str) and v.strip() else None) for k, v in fields.items()}
    problem = _answer_problem(fields)
    if problem:
        return None, problem
    return {"seed_id": seed_id(fields["question"], fields["persona"], documents), **fields,
            "documents": documents, "source": where}, None


def _answer_problem(fields: dict) -> str | None:
    """Why the gold answer cannot be verified (its type defaults to math), else None."""
    if fields["final_answer"] is None:
        return None
    fields["answer_type"] = fields["answer_type"] or DEFAULT_ANSWER_TYPE
    return gold_problem(fields["final_answer"], fields["answer_type"])


def _text_problem(name: str, value: Any, max_chars: int, required: bool) -> str | None:
    if value is None or (not required and value == ""):
        return None
    if not isinstance(value, str):
        return f"wrong type for field '{name}': expected text, got {type(value).__name__}"
    if required and not value.strip():
        return f"empty field '{name}'"
    if len(value) > max_chars:
        return f"field '{name}' is too long ({len(value)} > {max_chars} characters)"
    return None


def _documents(value: Any, max_chars: int) -> tuple[list[str], str | None]:
    if value is None or value == "":
        return [], None
    if isinstance(value, str):
        value = _maybe_json_list(value)
    if not isinstance(value, list) or not all(isinstance(d, str) for d in value):
        return [], "wrong type for field 'documents': expected a list of texts"
    for d in value:
        if len(d) > max_chars:
            return [], f"field 'documents' has a document that is too long ({len(d)} > {max_chars} characters)"
    return [d.strip() for d in value if d.strip()], None


def _maybe_json_list(text: str) -> list[str] | str:
    """CSV cells hold documents as a JSON list or as one plain text."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return [text]


def _as_text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="backslashreplace")
    return raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
