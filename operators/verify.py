"""Final answers: read a solution's final answer (its last "Final answer: …" line, else its last line) and check
it against the seed's gold answer.

Four answer types: `math` (equivalence through Hugging Face's math-verify: LaTeX, fractions, sets, intervals),
`numeric` (a number within a relative tolerance), `exact` (equal after case, space and edge punctuation are
normalised) and `choice` (the same option letter). An empty solution, or one whose answer does not parse as its
type, has no answer (`is_correct` None): the caller keeps it with that reason, never drops it.
"""

from __future__ import annotations

import logging
import math
import re
import string
from dataclasses import dataclass

ANSWER_TYPES = ("math", "numeric", "exact", "choice")
_FINAL_LINE = re.compile(r"final answer\s*(?:is)?\s*[:：]\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_CHOICE = re.compile(r"^\W*([A-Za-z])(?:\W|$)")  # "(b) Paris", "B."
_LETTERS = re.compile(r"\b([A-Z])\b")  # else the last capital standing alone: "The answer is B"


@dataclass(frozen=True)
class Verdict:
    """What the verifier found: the extracted answer (None: no final line), whether it is correct (None: no
    answer that parses) and why."""

    answer: str | None
    is_correct: bool | None
    reason: str


def final_answer(text: str) -> str | None:
    """The answer of the last "Final answer: …" line of `text`, else its last non-empty line (a model that
    ends with "12 + 30 = 42" answered 42); None for an empty text."""
    found = _FINAL_LINE.findall(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if found:
        return found[-1].strip() or None
    return lines[-1] if lines else None


def gold_problem(gold: str, answer_type: str) -> str | None:
    """Why `gold` cannot be checked as `answer_type` (for the seed loader's quarantine), else None."""
    if answer_type not in ANSWER_TYPES:
        return f"field 'answer_type': unknown type {answer_type!r}; use one of {', '.join(ANSWER_TYPES)}"
    if _parsed(gold, answer_type) is None:
        return f"field 'final_answer': {gold!r} does not parse as answer_type {answer_type!r}"
    return None


def verify(text: str, gold: str, answer_type: str, tolerance: float = 1e-6) -> Verdict:
    """Check the final answer of solution `text` against `gold`."""
    answer = final_answer(text)
    if answer is None:
        return Verdict(None, None, "empty solution")
    ours = _parsed(answer, answer_type)
    if ours is None:
        return Verdict(answer, None, f"the final answer does not parse as {answer_type}")
    correct = _equal(ours, _parsed(gold, answer_type), answer_type, tolerance)
    return Verdict(answer, correct, f"{answer_type}: {'matches' if correct else 'differs from'} {gold!r}")


def _parsed(text: str, answer_type: str):
    """`text` as a comparable value of its type, or None when it does not parse."""
    if answer_type == "math":
        return _math(text)
    if answer_type == "numeric":
        numbers = _NUMBER.findall(text)  # the last one: "12 + 30 = 42" answers 42
        return float(numbers[-1].replace(",", "")) if numbers else None
    if answer_type == "choice":
        return _choice(text)
    return normalised(text) or None


def normalised(text: str) -> str:
    """`text` with case, runs of white space and the punctuation at its ends folded away."""
    return " ".join(text.strip().strip(string.punctuation).casefold().split())


def _choice(text: str) -> str | None:
    """The option letter an answer starts with, else the last capital letter standing alone in it."""
    first = _CHOICE.match(text)
    if first:
        return first.group(1).upper()
    alone = _LETTERS.findall(text)
    return alone[-1] if alone else None


def _math(text: str) -> tuple | None:
    """math-verify's readings of an answer: as LaTeX math (so "{1, 2}" is a set, "(1, 2]" an interval) and as
    text (so "The sum is 68" is 68); None when neither parses. No signal-based timeout: stages run in worker
    threads, where signals cannot be set."""
    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    wrapped = f"${text}$" if "$" not in text and "\\boxed" not in text else text
    readings = tuple(r for r in (parse(wrapped, parsing_timeout=None), parse(text, parsing_timeout=None)) if r)
    return readings or None


def _equal(ours, gold, answer_type: str, tolerance: float) -> bool:
    if answer_type == "math":
        from math_verify import verify as math_equal

        return any(math_equal(g, o, timeout_seconds=None) for g in gold for o in ours)
    if answer_type == "numeric":
        return math.isclose(ours, gold, rel_tol=tolerance, abs_tol=tolerance)
    return ours == gold
