"""Claim critiques on the real engine: structure, rounds, lineage, and what the pipeline does with a
contradiction the model flags (asserting on the pipeline's behaviour, not the tiny model's judgement).

The tiny model may split a response into no claims and may flag none, so the tests that need claims and a
second round run on `Steered`: the real engine, except that the claims are the response's sentences and the
planted claim is found contradicted. Verdicts on the other claims, and every revision, are the model's."""

from __future__ import annotations

import json
import re

import pytest

from prefmill.operators.critiques import VERDICTS, ClaimCritic
from prefmill.operators.retrieval import DocumentIndex
from prefmill.schemas.tables import CRITIQUES
from prefmill.serving.engine import chat_prompt
from prefmill.serving.protocols import Completion

SOURCE = ("The Berlin Wall, built in 1961, was opened on the night of 9 November 1989. Germany was formally "
          "reunified on 3 October 1990.")
PLANTED = "The Berlin Wall fell in 1975."
CANDIDATES = [
    {"candidate_id": "planted", "context_id": "ctx", "seed_id": "wall",
     "context": [{"role": "user", "content": "When did the Berlin Wall fall?"}],
     "reply": f"{PLANTED} It was built in 1961 and Germany was reunified in 1990."},
    {"candidate_id": "honey", "context_id": "ctx2", "seed_id": "bees",
     "context": [{"role": "user", "content": "How do bees make honey?"}],
     "reply": "Bees collect nectar and evaporate it in wax cells until it becomes honey."},
]


class Steered:
    """The real engine, except for two answers it scripts: a response's claims are its sentences, and the
    planted claim (the one about 1975) is contradicted."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def chat(self, conversations, sampling):
        real = [c for c in conversations if self.scripted(c) is None]
        answers = iter(self.engine.chat(real, sampling) if real else [])
        return [[Completion(text, len(text.split()), "stop")] * sampling.n
                if (text := self.scripted(c)) is not None else next(answers) for c in conversations]

    def score(self, conversations, continuations):
        return self.engine.score(conversations, continuations)

    @staticmethod
    def scripted(conversation) -> str | None:
        system, user = conversation[0]["content"], conversation[-1]["content"]
        if "Split the response" in system:
            response = user.split("\n\nResponse: ", 1)[1]
            return json.dumps({"claims": re.split(r"(?<=[.!?])\s+", response.strip())})
        if "check one claim" in system and "1975" in user.split("Claim: ")[-1]:
            return json.dumps({"critique": "The evidence says 9 November 1989.", "verdict": "contradicted"})
        return None


def critique(lm):
    index = DocumentIndex(["Honey bees store nectar in wax cells and fan it until its water content falls to "
                           "about 18 percent.", "Copper is a good conductor of electricity."])
    return ClaimCritic(rounds=2, max_tokens=160)(CANDIDATES, lm, {"wall": [SOURCE]}, index)


@pytest.fixture(scope="module")
def critiques(engine):
    return critique(engine)


@pytest.fixture(scope="module")
def steered(engine):
    return critique(Steered(engine))


@pytest.mark.parametrize("which", ["critiques", "steered"])
def test_structure_rounds_and_lineage(which, request):
    critiques = request.getfixturevalue(which)
    assert critiques.schema == CRITIQUES
    for row, cand in zip(critiques.to_pylist(), CANDIDATES, strict=True):
        rounds = row["rounds"]
        assert 1 <= len(rounds) <= 3 and [r["round"] for r in rounds] == list(range(len(rounds)))
        assert rounds[0]["response"] == cand["reply"]
        assert row["final_response"] and row["num_calls"] >= 1 + sum(len(r["claims"]) for r in rounds)
        for r in rounds:
            assert (r["error"] is None) == (r["raw_output"] is None)
            assert r["score"] is None or 0.0 <= r["score"] <= 1.0
            for claim in r["claims"]:
                assert claim["verdict"] in VERDICTS or (claim["verdict"] is None and claim["error"])
        assert row["initial_score"] == rounds[0]["score"] and row["final_score"] == rounds[-1]["score"]


def test_evidence_holds_the_seed_source_and_retrieved_passages(steered):
    wall, honey = steered.to_pylist()
    assert [c["claim"] for c in wall["rounds"][0]["claims"]] == [PLANTED, CANDIDATES[0]["reply"][len(PLANTED) + 1:]]
    assert [c["claim"] for c in honey["rounds"][0]["claims"]] == [CANDIDATES[1]["reply"]]
    for claim in wall["rounds"][0]["claims"]:
        assert SOURCE in claim["evidence"]
    for claim in honey["rounds"][0]["claims"]:
        assert "Berlin" not in (claim["evidence"] or "")


def test_flagged_claims_lead_to_a_revision_that_changes_or_removes_them(steered):
    wall = steered.to_pylist()[0]["rounds"]
    assert len(wall) >= 2 and (wall[0]["claims"][0]["verdict"], wall[0]["claims"][0]["action"]) == (
        "contradicted", "fix")
    assert PLANTED not in wall[1]["response"]
    for row in steered.to_pylist():
        rounds = row["rounds"]
        for this, following in zip(rounds, rounds[1:]):  # once at least, for the planted claim
            flagged = [c for c in this["claims"] if c["verdict"] in ("contradicted", "unverifiable")]
            assert flagged, "a new round only follows a round with flagged claims"
            for claim in flagged:
                assert claim["action"] in ("fix", "remove", "keep")
                if claim["action"] in ("fix", "remove") and claim["claim"] in this["response"]:
                    assert claim["claim"] not in following["response"]
            if any(c["action"] in ("fix", "remove") for c in flagged):
                assert following["response"] != this["response"] or not following["response"]
        last = rounds[-1]
        if len(rounds) < 3:
            assert not any(c["action"] in ("fix", "remove") for c in last["claims"])


LONG_SOURCE = " ".join([*(f"On day {i} the city council met to discuss road repairs and the budget for parks."
                           for i in range(340)), SOURCE,
                         *(f"Item {i} of the minutes covers street lighting on the east side." for i in range(340))])


class Recording:
    """The real engine, keeping every conversation sent to it; with `counting`, it also has the optional
    `count_tokens` capability, answered by the engine's own tokenizer."""

    def __init__(self, engine, counting: bool):
        self.engine, self.name, self.sent = engine, engine.name, []
        if counting:
            self.count_tokens = lambda texts: [len(engine.tokenizer(t, add_special_tokens=False)["input_ids"])
                                               for t in texts]

    def chat(self, conversations, sampling):
        self.sent += conversations
        return self.engine.chat(conversations, sampling)

    def score(self, conversations, continuations):
        return self.engine.score(conversations, continuations)


@pytest.mark.parametrize("counting", [True, False], ids=["count_tokens", "utf8-bytes-fallback"])
def test_a_50k_character_source_no_longer_fails_the_batch(engine, counting):
    assert len(LONG_SOURCE) > 45_000
    lm, critic = Recording(engine, counting), ClaimCritic(rounds=0, max_tokens=160)
    [row] = critic(CANDIDATES[:1], lm, {"wall": [LONG_SOURCE]}).to_pylist()
    verdict_prompts = [c for c in lm.sent if "check one claim" in c[0]["content"]]
    assert verdict_prompts and len(verdict_prompts) == len(row["rounds"][0]["claims"])
    for conversation in lm.sent:
        prompt = chat_prompt(engine.tokenizer, conversation)["prompt_token_ids"]
        assert len(prompt) + critic.max_tokens <= engine.config.max_model_len
    for claim in row["rounds"][0]["claims"]:
        assert claim["evidence"] and len(engine.tokenizer(claim["evidence"])["input_ids"]) <= 2048 + 20
        assert claim["verdict"] in VERDICTS or claim["error"]
