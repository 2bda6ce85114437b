"""Claim critiques: prompt building, parsing (malformed JSON included) and the revision loop, scripted."""

from __future__ import annotations

import json

import pytest

from prefmill.operators.critiques import (
    ClaimCritic,
    parse_claims,
    parse_knows,
    parse_verdict,
    remove_verbatim,
    verdict_prompt,
)
from prefmill.operators.retrieval import DocumentIndex, load_documents
from prefmill.schemas.tables import CRITIQUES
from tests.fakes import ScriptedLM

WALL = "The Berlin Wall fell in 1975."
CANDIDATE = {"candidate_id": "c1", "context_id": "x1", "seed_id": "s1",
             "context": [{"role": "user", "content": "When did the Berlin Wall fall?"}],
             "reply": f"{WALL} It divided Berlin."}
SOURCE = "The Berlin Wall was opened on the night of 9 November 1989."


def test_parsers_keep_failures_as_null_with_reason():
    assert parse_claims('{"claims": ["a", "b", "a", " "]}').value == ["a", "b"]
    bad = parse_claims('{"claims": ["a", ')
    assert bad.value is None and bad.error.startswith("malformed JSON") and bad.raw == '{"claims": ["a", '
    assert parse_claims('{"items": []}').error == "JSON has no 'claims' field"
    assert parse_claims('{"claims": "a"}').error.startswith("bad value for 'claims'")
    assert parse_verdict('{"critique": "no", "verdict": "contradicted"}').value == ("contradicted", "no")
    assert parse_verdict('{"critique": "x", "verdict": "maybe"}').error.startswith("bad value for 'verdict'")
    assert parse_knows('sure: {"answer": "unknown"}').value == "unknown"
    assert parse_knows("no json at all").error.startswith("malformed JSON")


def test_verdict_prompt_lists_the_evidence():
    prompt = verdict_prompt(WALL, [SOURCE])
    assert f"[1] {SOURCE}" in prompt[1]["content"] and WALL in prompt[1]["content"]
    assert "(no evidence found)" in verdict_prompt(WALL, [])[1]["content"]


def test_judge_alone_returns_one_verdict_per_claim_against_its_evidence():
    def script(conv, sampling, k):
        assert sampling.json_schema is not None and sampling.temperature == 0.0
        text = conv[1]["content"]
        if "1975" in text:
            return '{"critique": "says 1989", "verdict": "contradicted"}' if SOURCE in text else "{broken"
        return '{"critique": "ok", "verdict": "supported"}'
    verdicts = ClaimCritic().judge([WALL, "It divided Berlin.", WALL], [[SOURCE], [], []], ScriptedLM(script))
    assert [v.value for v in verdicts] == [("contradicted", "says 1989"), ("supported", "ok"), None]
    assert verdicts[2].error.startswith("malformed JSON") and verdicts[2].raw == "{broken"
    with pytest.raises(ValueError):
        ClaimCritic().judge([WALL], [], ScriptedLM(script))


def test_remove_verbatim_drops_the_sentence():
    assert remove_verbatim(f"{WALL} It divided Berlin.", WALL) == "It divided Berlin."
    assert remove_verbatim("Nothing here.", WALL) == "Nothing here."


def critic_script(conv, sampling, k):
    system, user = conv[0]["content"], conv[1]["content"]
    if "Split the response" in system:
        claims = [c for c in (WALL, "It divided Berlin.") if c in user]
        return json.dumps({"claims": claims})
    if "check one claim" in system:
        verdict = "contradicted" if "1975" in user else "unverifiable"
        return json.dumps({"critique": "The source says 9 November 1989." if verdict == "contradicted" else "n/a",
                           "verdict": verdict})
    if "is this claim true" in system:
        return '{"answer": "unknown"}'
    return "It divided Berlin. The Berlin Wall fell in 1975."  # a revision that ignores the fix


def test_contradiction_is_fixed_or_removed_and_every_round_is_kept():
    table = ClaimCritic(rounds=2)([CANDIDATE], ScriptedLM(critic_script), {"s1": [SOURCE]})
    assert table.schema == CRITIQUES
    [row] = table.to_pylist()
    first = row["rounds"][0]
    assert first["response"] == CANDIDATE["reply"]
    verdicts = {c["claim"]: (c["verdict"], c["action"]) for c in first["claims"]}
    assert verdicts == {WALL: ("contradicted", "fix"), "It divided Berlin.": ("unverifiable", "remove")}
    assert all(SOURCE in c["evidence"] for c in first["claims"])
    assert first["score"] == 0.0
    assert WALL not in row["final_response"] and WALL not in row["rounds"][1]["response"]
    assert [r["round"] for r in row["rounds"]] == [0, 1, 2][: len(row["rounds"])]
    assert row["num_parse_failures"] == 0 and row["num_calls"] >= 4


def test_malformed_model_output_never_crashes_the_batch():
    def broken(conv, sampling, k):
        if "Split the response" in conv[0]["content"]:
            return '{"claims": ["only one claim"]}' if "good" in conv[1]["content"] else "{not json"
        return '{"critique": "fine", "verdict": "supported"'  # truncated
    cands = [{**CANDIDATE, "candidate_id": "bad"}, {**CANDIDATE, "candidate_id": "good", "reply": "A good reply."}]
    rows = ClaimCritic(rounds=1)(cands, ScriptedLM(broken)).to_pylist()
    assert rows[0]["rounds"][0]["claims"] == [] and rows[0]["rounds"][0]["error"].startswith("malformed JSON")
    assert rows[0]["rounds"][0]["raw_output"] == "{not json" and rows[0]["initial_score"] is None
    claim = rows[1]["rounds"][0]["claims"][0]
    assert claim["verdict"] is None and claim["error"].startswith("malformed JSON") and claim["raw_output"]
    assert [r["num_parse_failures"] for r in rows] == [1, 1]


def test_supported_responses_stop_after_one_round():
    def all_supported(conv, sampling, k):
        if "Split the response" in conv[0]["content"]:
            return '{"claims": ["It divided Berlin."]}'
        return '{"critique": "The source agrees.", "verdict": "supported"}'
    [row] = ClaimCritic(rounds=3)([CANDIDATE], ScriptedLM(all_supported)).to_pylist()
    assert len(row["rounds"]) == 1 and row["final_score"] == 1.0 and row["final_response"] == CANDIDATE["reply"]


def test_weights_are_configurable():
    critic = ClaimCritic(rounds=0, weights={"supported": 1.0, "contradicted": 0.0, "unverifiable": 0.5})
    [row] = critic([CANDIDATE], ScriptedLM(critic_script), {"s1": [SOURCE]}).to_pylist()
    assert row["initial_score"] == pytest.approx(0.25)


def test_keyword_and_folder_retrieval(tmp_path):
    (tmp_path / "a.md").write_text(f"{SOURCE}\n\nCopper conducts electricity well.")
    (tmp_path / "b.txt").write_text("The Great Wall of China is long.")
    docs = load_documents(tmp_path)
    assert len(docs) == 3
    index = DocumentIndex(docs)
    assert index.search("When did the Berlin Wall open?", k=1) == [SOURCE]
    assert index.search("zebra", k=2) == []
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(tmp_path / "missing")


def test_embedding_retrieval(embedder):
    index = DocumentIndex(["Copper conducts electricity.", SOURCE, "Bees make honey from nectar."], embedder)
    assert index.search("the fall of the wall in Berlin", k=1) == [SOURCE]


def test_a_revision_that_changes_nothing_removes_the_closest_sentence():
    def stubborn(conv, sampling, k):
        system, user = conv[0]["content"], conv[1]["content"]
        if "Split the response" in system:
            return '{"claims": ["The wall came down in 1975"]}' if "1975" in user else '{"claims": []}'
        if "check one claim" in system:
            return '{"critique": "The source says 1989.", "verdict": "contradicted"}'
        return CANDIDATE["reply"]  # the model repeats the response unchanged
    [row] = ClaimCritic(rounds=1)([CANDIDATE], ScriptedLM(stubborn), {"s1": [SOURCE]}).to_pylist()
    assert row["rounds"][1]["response"] == "It divided Berlin."


def knows_script(answer: str):
    """Every claim is unverifiable; the generator answers `answer` when asked whether it is true."""
    def script(conv, sampling, k):
        system, user = conv[0]["content"], conv[1]["content"]
        if "Split the response" in system:
            return json.dumps({"claims": [c for c in ("It divided Berlin.",) if c in user]})
        if "check one claim" in system:
            return '{"critique": "n/a", "verdict": "unverifiable"}'
        if "is this claim true" in system:
            return answer
        return "The wall stood in Berlin."
    return script


@pytest.mark.parametrize("answer, action", [('{"answer": "true"}', "keep"), ('{"answer": "false"}', "remove"),
                                            ('{"answer": "unknown"}', "remove"), ("{broken", "remove")])
def test_only_a_claim_the_generator_calls_true_is_kept(answer, action):
    [row] = ClaimCritic(rounds=1)([CANDIDATE], ScriptedLM(knows_script(answer))).to_pylist()
    [claim] = row["rounds"][0]["claims"]
    assert claim["action"] == action
    assert ("It divided Berlin." in row["final_response"]) == (action == "keep")


@pytest.mark.parametrize("script", [critic_script, knows_script('{"answer": "false"}')])
def test_num_calls_counts_every_model_call_revisions_included(script):
    lm = RecordingLM(script)
    [row] = ClaimCritic(rounds=2)([CANDIDATE], lm, {"s1": [SOURCE]}).to_pylist()
    assert any("Revise the response" in p for p in _system_prompts(lm))
    assert row["num_calls"] == sum(n for n, _ in lm.calls)


class RecordingLM(ScriptedLM):
    """A scripted model that keeps every conversation it was sent, and counts tokens as words when
    `words_are_tokens` (the optional `count_tokens` capability)."""

    def __init__(self, script, words_are_tokens: bool = False):
        super().__init__(script)
        self.conversations: list = []
        if words_are_tokens:
            self.count_tokens = lambda texts: [len(t.split()) for t in texts]

    def chat(self, conversations, sampling):
        self.conversations += conversations
        return super().chat(conversations, sampling)


def _system_prompts(lm: RecordingLM) -> list[str]:
    return [c[0]["content"] for c in lm.conversations]


LONG_SOURCE = " ".join([*(f"On day {i} the council met to discuss road repairs and the budget for parks."
                           for i in range(350)), SOURCE,
                         *(f"Item {i} of the minutes covers street lighting." for i in range(350))])


def _evidence_of_verdict_prompts(lm: RecordingLM) -> list[str]:
    prompts = [c[1]["content"] for c in lm.conversations if "check one claim" in c[0]["content"]]
    return [p.split("Evidence:\n", 1)[1].rsplit("\n\nClaim:", 1)[0] for p in prompts]


@pytest.mark.parametrize("words_are_tokens", [True, False], ids=["count_tokens", "utf8-bytes-fallback"])
def test_a_long_source_is_cut_to_the_evidence_budget_keeping_the_passage_about_the_claim(words_are_tokens):
    assert len(LONG_SOURCE) > 40_000
    lm = RecordingLM(critic_script, words_are_tokens)
    critic = ClaimCritic(rounds=0, max_evidence_tokens=300)
    [row] = critic([CANDIDATE], lm, {"s1": [LONG_SOURCE, "A short second source."]}).to_pylist()
    evidence = _evidence_of_verdict_prompts(lm)
    assert len(evidence) == 2
    for text in evidence:
        size = len(text.split()) if words_are_tokens else len(text.encode())
        assert size <= 300 + 20  # the budget, plus the "[k] " numbering and passage separators
        assert "A short second source." in text
    wall = next(c for c in row["rounds"][0]["claims"] if c["claim"] == WALL)
    assert "9 November 1989" in wall["evidence"]


def test_evidence_that_fits_the_budget_is_passed_whole():
    lm = RecordingLM(critic_script, words_are_tokens=True)
    ClaimCritic(rounds=0)([CANDIDATE], lm, {"s1": [SOURCE, "A short second source."]})
    assert _evidence_of_verdict_prompts(lm) == [f"[1] {SOURCE}\n[2] A short second source."] * 2
