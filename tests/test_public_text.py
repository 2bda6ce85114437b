"""Data defects found by running prefmill's operators on human-written text no one here wrote.

Text: a sample of TruthfulQA (`tests/data/truthfulqa_sample.json`: 60 questions, each with true and false
answers written by people) and paragraphs of Python's own documentation (`pydoc_data.topics`). Each
defect is shown on the data first (what the old behaviour measured), then checked gone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from prefmill.operators.critiques import ClaimCritic
from prefmill.operators.dedup import Deduper, prompt_text, reply_text
from prefmill.operators.gates import ECHO_THRESHOLD, REVISION_SELF_TALK, repeats, reply_gate, revision_text
from prefmill.schemas.tables import PAIRS
from prefmill.serving.ann import make_index
from tests.fakes import ScriptedLM

SAMPLE = json.loads((Path(__file__).parent / "data" / "truthfulqa_sample.json").read_text())["examples"]


def pair(question: str, chosen: str, prompt_id: str, margin: float = 1.0) -> dict:
    row = dict.fromkeys(PAIRS.names)
    row.update(pair_id=f"pair-{prompt_id}", prompt_id=prompt_id, prompt=[{"role": "user", "content": question}],
               chosen=[{"role": "assistant", "content": chosen}],
               rejected=[{"role": "assistant", "content": "I am not sure."}], margin=margin, strategy="best_worst")
    return row


def one_text_cosines(embedder, rows: list[dict], others: list[dict]) -> np.ndarray:
    """What dedup compared before: the prompt and the chosen reply embedded as one text."""
    a = embedder.embed([f"{prompt_text(r)}\n{reply_text(r)}" for r in rows])
    b = embedder.embed([f"{prompt_text(r)}\n{reply_text(r)}" for r in others])
    return (a * b).sum(axis=1)


def contradicting_pairs() -> tuple[list[dict], list[dict]]:
    """Per question: a pair whose chosen reply is its best true answer, one whose chosen reply is false."""
    true = [pair(x["question"], x["best_answer"], f"q{k}-true", 2.0) for k, x in enumerate(SAMPLE)]
    false = [pair(x["question"], x["false_answers"][0], f"q{k}-false", 1.0) for k, x in enumerate(SAMPLE)]
    return true, false


def test_pairs_of_one_question_with_contradicting_answers_are_not_duplicates(embedder):
    true, false = contradicting_pairs()
    merged_before = int((one_text_cosines(embedder, true, false) >= 0.9).sum())
    assert merged_before >= 0.4 * len(SAMPLE)  # the defect, on this data: the question dominated the vector
    table = pa.Table.from_pylist(true + false, schema=PAIRS)
    strict = Deduper(threshold=0.9, reply_threshold=0.9)(table, embedder, make_index).removed.to_pylist()
    assert len(strict) <= 0.25 * len(SAMPLE) and len(strict) < merged_before / 2
    assert all(r["prompt_similarity"] >= 0.9 and r["reply_similarity"] >= 0.9 and r["dedup_on"] == "pair"
               for r in strict)
    default = Deduper()(table, embedder, make_index).removed.to_pylist()  # replies at 0.85
    assert len(default) <= 0.35 * len(SAMPLE) and len(default) < 0.7 * merged_before


def test_prompt_level_dedup_is_an_explicit_choice_that_removes_every_second_answer(embedder):
    true, false = contradicting_pairs()
    result = Deduper(threshold=0.9, on="prompt")(pa.Table.from_pylist(true + false, schema=PAIRS), embedder,
                                                 make_index)
    removed = {r["removed_pair_id"]: r for r in result.removed.to_pylist()}
    assert set(removed) == {r["pair_id"] for r in false}  # the higher margin (true answer) survives
    assert all(r["duplicate_of"] == r["removed_pair_id"].replace("false", "true") for r in removed.values())
    assert {r["dedup_on"] for r in removed.values()} == {"prompt"}


def long_paragraphs(count: int, min_words: int = 320) -> list[str]:
    import pydoc_data.topics as topics

    found = [" ".join(t.split()) for t in topics.topics.values()]
    return [t for t in found if len(t.split()) >= min_words][:count]


def first_sentences(text: str, n: int = 2) -> str:
    return " ".join(re.split(r"(?<=[.!?])\s+", text)[:n])


def test_pairs_of_one_long_prompt_with_different_replies_are_not_duplicates(embedder):
    paragraph, *others = long_paragraphs(5)
    prompt = f"Please edit this paragraph so it reads more clearly:\n\n{paragraph}"
    rows = [pair(prompt, first_sentences(text), f"edit-{k}", 1.0 + k) for k, text in enumerate(others)]
    before = one_text_cosines(embedder, rows[:1] * (len(rows) - 1), rows[1:])
    assert before.min() > 0.99  # the defect: the replies were past the encoder's window
    result = Deduper(threshold=0.9)(pa.Table.from_pylist(rows, schema=PAIRS), embedder, make_index)
    assert result.removed.num_rows == 0 and result.pairs.num_rows == len(rows)
    reply_vectors = np.array(result.embeddings.column("reply_vector").to_pylist())
    assert (reply_vectors @ reply_vectors.T)[np.triu_indices(len(rows), 1)].max() < 0.9


def answers() -> list[tuple[str, str]]:
    return [(x["question"], a) for x in SAMPLE for a in x["true_answers"] + x["false_answers"]]


def test_the_echo_gate_passes_answers_that_restate_the_question():
    context = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    rejected_before = sum(repeats(a, q, ECHO_THRESHOLD) for q, a in answers())
    assert rejected_before >= 0.15 * len(answers())  # the defect, on this data
    assert [(q, a) for q, a in answers() if reply_gate(a, context(q))] == []
    assert reply_gate("You have to drive on the right side of the road.",
                      context("What side of the road do you have to drive on?")) is None
    assert reply_gate("The tooth fairy collects baby teeth placed under a pillow.",
                      context("Who really collects baby teeth placed under a pillow?")) is None


@pytest.mark.parametrize("echo", [lambda q: q, lambda q: q.lower().rstrip("?"), lambda q: f"Question: {q}",
                                  lambda q: f"{q} Please explain.", lambda q: f"So, {q}"])
def test_the_echo_gate_rejects_the_question_given_back(echo):
    assert {reply_gate(echo(x["question"]), [{"role": "user", "content": x["question"]}]) for x in SAMPLE} == \
        {"echoes_user"}


REVISION = ("The response is clear and concise, but there are a few areas that could be improved to make it "
            "more accurate. Here's a revised version:\n\nThe Berlin Wall fell on 9 November 1989. It divided Berlin."
            "\n\nI removed the incorrect date and kept the rest of the response unchanged.")
ONLY_CRITIQUE = ("The response is clear and concise, but it contains a claim that is not accurate: the Berlin Wall "
                 "did not fall in 1975.")


@pytest.mark.parametrize("text, expected", [
    (REVISION, ("The Berlin Wall fell on 9 November 1989. It divided Berlin.", None)),
    ("Revised response: The wall fell in 1989.", ("The wall fell in 1989.", None)),
    ('Sure! Here is the corrected answer:\n\n"Water boils at 100 degrees Celsius at sea level."',
     ("Water boils at 100 degrees Celsius at sea level.", None)),
    (ONLY_CRITIQUE, ("", REVISION_SELF_TALK)),
    ("I have revised the response to remove the wrong date.", ("", REVISION_SELF_TALK)),
    ("The response of the city's government was swift: it closed the border crossings that night.",
     ("The response of the city's government was swift: it closed the border crossings that night.", None)),
    ("", ("", None)),
])
def test_revision_text_cuts_the_critics_preamble_or_rejects_a_revision_about_itself(text, expected):
    assert revision_text(text) == expected


WALL = "The Berlin Wall fell in 1975."
CANDIDATE = {"candidate_id": "c1", "context_id": "x1", "seed_id": "s1",
             "context": [{"role": "user", "content": "When did the Berlin Wall fall?"}],
             "reply": f"{WALL} It divided Berlin."}


def critic(revision: str):
    def script(conv, sampling, k):
        system = conv[0]["content"]
        if "Split the response" in system:
            return json.dumps({"claims": [c for c in (WALL, "It divided Berlin.") if c in conv[1]["content"]]})
        if "check one claim" in system:
            verdict = "contradicted" if "1975" in conv[1]["content"] else "supported"
            return json.dumps({"critique": "The wall fell on 9 November 1989.", "verdict": verdict})
        return revision
    return ScriptedLM(script)


def test_a_revision_with_a_preamble_publishes_only_the_revised_reply():
    [row] = ClaimCritic(rounds=1)([CANDIDATE], critic(REVISION), {}).to_pylist()
    assert row["final_response"] == "The Berlin Wall fell on 9 November 1989. It divided Berlin."


def test_a_revision_that_talks_about_the_response_is_not_taken():
    [row] = ClaimCritic(rounds=1)([CANDIDATE], critic(ONLY_CRITIQUE), {}).to_pylist()
    assert row["final_response"] == "It divided Berlin."  # the flagged claim removed without the model
    [claim] = [c for c in row["rounds"][0]["claims"] if c["claim"] == WALL]
    assert REVISION_SELF_TALK in claim["error"]
