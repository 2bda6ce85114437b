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
_FINAL_LINE = re.compile(r"final answer\s*(?:is)?\s*[:：][ \t]*(.*)", re.IGNORECASE)
# one number: 1,234.5 (thousands grouped by three), -3, 2.5e3, or a fraction 3/4
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?\.?\d+(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")
_CHOICE = re.compile(r"^\(?([A-Za-z])(?:\)|\.|:|$)|(?:option|answer is|answer:)\s*\(?([A-Za-z])\b", re.IGNORECASE)
_WORD = re.compile(r"(?<!\\)\b[A-Za-z]{2,}\b")  # a word that is no LaTeX command: the answer is prose
MAX_MATH_CHARS = 200
_TOWER = re.compile(r"\^.*\^|\^\s*\{?\s*\d{4,}")  # a power of a power, or an exponent of 4+ digits


@dataclass(frozen=True)
class Verdict:
    """What the verifier found: the extracted answer (None: no final line), whether it is correct (None: no
    answer that parses) and why."""

    answer: str | None
    is_correct: bool | None
    reason: str


def final_answer(text: str, truncated: bool = False) -> str | None:
    """The answer of the last "Final answer: …" line of `text` (None when it is empty), else its last non-empty
    line (a model that ends with "12 + 30 = 42" answered 42) unless the text was `truncated` (its last line is
    cut mid-way); None for an empty text."""
    found = _FINAL_LINE.findall(text)
    if found:
        return found[-1].strip() or None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines and not truncated else None


def gold_problem(gold: str, answer_type: str) -> str | None:
    """Why `gold` cannot be checked as `answer_type` (for the seed loader's quarantine), else None."""
    if answer_type not in ANSWER_TYPES:
        return f"field 'answer_type': unknown type {answer_type!r}; use one of {', '.join(ANSWER_TYPES)}"
    if _parsed(gold, answer_type) is None:
        return f"field 'final_answer': {gold!r} does not parse as answer_type {answer_type!r}"
    return None


def verify(text: str, gold: str, answer_type: str, tolerance: float = 1e-6, truncated: bool = False) -> Verdict:
    """Check the final answer of solution `text` (cut at its token limit when `truncated`) against `gold`."""
    answer = final_answer(text, truncated)
    if answer is None:
        return Verdict(None, None, "cut at max_tokens before a final answer" if truncated and text.strip()
                       else "no final answer (empty solution or empty 'Final answer:' line)")
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
        return _number(text)
    if answer_type == "choice":
        return _choice(text)
    return normalised(text) or None


def normalised(text: str) -> str:
    """`text` with case, runs of white space and the punctuation at its ends folded away."""
    return " ".join(text.strip().strip(string.punctuation).casefold().split())


def _number(text: str) -> float | None:
    """The number an answer gives: the first one after its last "=" ("12 + 30 = 42" answers 42, "42 (6*7)"
    answers 42); a fraction is its value; None when there is none or it is not finite (a division by zero)."""
    found = _NUMBER.search(text.rsplit("=", 1)[-1])
    if not found:
        return None
    numerator, _, denominator = found.group().replace(",", "").replace(" ", "").partition("/")
    if denominator and not float(denominator):
        return None
    value = float(numerator) / float(denominator) if denominator else float(numerator)
    return value if math.isfinite(value) else None


def _choice(text: str) -> str | None:
    """The option letter: a lone "B", "(b)", "B." or "B:" opening the answer, or after "option" / "answer
    is"; a sentence that merely starts with "A" names no option."""
    found = _CHOICE.search(text.strip())
    letter = found and (found.group(1) or found.group(2))
    return letter.upper() if letter else None


def _math(text: str) -> list | None:
    """math-verify's reading of an answer: as prose when it has words ("The sum is 68"), else as LaTeX math (so
    "{1, 2}" is a set, "(1, 2]" an interval); None when it does not parse. math-verify's timeout needs signals,
    which worker threads cannot set, so an answer that could make sympy compute for minutes (over
    MAX_MATH_CHARS, a power tower, a huge exponent) is refused instead."""
    from math_verify import parse

    if len(text) > MAX_MATH_CHARS or _TOWER.search(text):
        return None
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    plain = "$" in text or "\\boxed" in text or _WORD.search(text)
    return parse(text if plain else f"${text}$", parsing_timeout=None) or None


def _equal(ours, gold, answer_type: str, tolerance: float) -> bool:
    if answer_type == "math":
        from math_verify import verify as math_equal

        return bool(math_equal(gold, ours, timeout_seconds=None))
    if answer_type == "numeric":
        return math.isclose(ours, gold, rel_tol=tolerance, abs_tol=tolerance)
    return ours == gold
