"""Follow-up likelihood rewards: the arithmetic with a scripted scorer, then on the real model."""

from __future__ import annotations

import json
from statistics import fmean

import pytest

from prefmill.operators.flr import FollowUp, FollowUpReward, load_followups, reply_prefix
from prefmill.schemas.tables import REWARDS
from prefmill.serving.protocols import ScoredPrefix

FOLLOWUPS = (FollowUp("correctness", "positive", "Thanks, that's correct."),
             FollowUp("correctness", "negative", "That's wrong."),
             FollowUp("relevance", "positive", "Exactly what I needed."),
             FollowUp("relevance", "negative", "That is off topic."))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CANDIDATES = [
    {"candidate_id": "c0", "context_id": "x", "context": QUESTION, "reply": "The capital of France is Paris."},
    {"candidate_id": "c1", "context_id": "x", "context": QUESTION, "reply": "Bananas are a good source of potassium."},
]


class TableScorer:
    name = "table"

    def __init__(self, logprobs):
        self.logprobs = logprobs

    def score_continuations(self, prefixes, continuations, max_tokens=None):
        return [ScoredPrefix(self.logprobs, truncated_tokens=3) for _ in prefixes]


def test_reward_is_mean_positive_minus_mean_negative_with_aspects():
    logprobs = [[-1.0, -3.0], [-4.0], [-0.5, -0.5, -2.0], [-6.0, -2.0]]
    [row] = FollowUpReward(FOLLOWUPS)(CANDIDATES[:1], TableScorer(logprobs)).to_pylist()
    means = [fmean(lp) for lp in logprobs]
    assert row["reward"] == pytest.approx(fmean([means[0], means[2]]) - fmean([means[1], means[3]]))
    assert [a["aspect"] for a in row["aspects"]] == ["correctness", "relevance"]
    assert row["aspects"][0]["score"] == pytest.approx(means[0] - means[1])
    assert row["aspects"][1]["positive"] == pytest.approx(means[2])
    assert row["truncated_tokens"] == 3 and row["aggregation"] == "mean"


def test_sum_aggregation_and_schema():
    logprobs = [[-1.0, -3.0], [-4.0], [-0.5, -0.5, -2.0], [-6.0, -2.0]]
    table = FollowUpReward(FOLLOWUPS, aggregation="sum")(CANDIDATES, TableScorer(logprobs))
    assert table.schema == REWARDS
    assert table.column("reward").to_pylist()[0] == pytest.approx((-4.0 + -3.0) / 2 - (-4.0 + -8.0) / 2)
    with pytest.raises(ValueError, match="aggregation"):
        FollowUpReward(FOLLOWUPS, aggregation="max")


def test_followup_files_load_and_bad_ones_are_clear(tmp_path):
    defaults = load_followups()
    assert len({f.aspect for f in defaults}) == 6 and len(defaults) >= 20
    assert {f.polarity for f in defaults} == {"positive", "negative"}
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"tone": {"positive": ["Nice."], "negative": [""]}}))
    with pytest.raises(ValueError, match="aspect 'tone' has an empty or non-text negative"):
        load_followups(path)
    path.write_text(json.dumps({"tone": {"positive": ["Nice."]}}))
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        load_followups(path)


@pytest.fixture(scope="module")
def shared_scorer(model_path):
    from prefmill.serving.prefix_scorer import SharedPrefixScorer

    return SharedPrefixScorer()


@pytest.fixture(scope="module")
def naive_scorer(engine):
    from prefmill.serving.prefix_scorer import NaiveScorer

    return NaiveScorer(engine)


def test_reward_equals_a_hand_computation_from_score(engine, naive_scorer):
    [row] = FollowUpReward(FOLLOWUPS)(CANDIDATES[:1], naive_scorer).to_pylist()
    prefix = reply_prefix(CANDIDATES[0])
    per = [fmean(engine.score([prefix], [{"role": "user", "content": f.text}])[0]) for f in FOLLOWUPS]
    assert row["reward"] == pytest.approx(fmean([per[0], per[2]]) - fmean([per[1], per[3]]), abs=1e-6)
    assert {a["aspect"] for a in row["aspects"]} == {"correctness", "relevance"}


def test_prefix_shared_scoring_agrees_with_naive(shared_scorer, naive_scorer, model_path):
    from prefmill.serving.prefix_scorer import SharedPrefixScorer

    flr = FollowUpReward()
    shared = flr(CANDIDATES, shared_scorer).column("reward").to_pylist()
    naive = flr(CANDIDATES, naive_scorer).column("reward").to_pylist()
    unshared = flr(CANDIDATES, SharedPrefixScorer(share_prefix=False)).column("reward").to_pylist()
    assert shared == pytest.approx(unshared, abs=1e-5)  # same kernels: the cache reuse changes nothing
    assert shared == pytest.approx(naive, abs=1e-3)  # against vLLM's prompt logprobs


def test_empty_and_very_long_replies_are_handled_and_truncation_recorded(shared_scorer, naive_scorer):
    long_reply = "Paris is the capital. " * 400
    cands = [{**CANDIDATES[0], "candidate_id": "empty", "reply": ""},
             {**CANDIDATES[0], "candidate_id": "long", "reply": long_reply}]
    flr = FollowUpReward(FOLLOWUPS, max_tokens=256)
    shared = flr(cands, shared_scorer).to_pylist()
    naive = flr(cands, naive_scorer).to_pylist()
    assert shared[0]["truncated_tokens"] == 0 and shared[1]["truncated_tokens"] > 1500
    assert [r["truncated_tokens"] for r in naive] == [r["truncated_tokens"] for r in shared]
    for s, n in zip(shared, naive):
        assert s["reward"] == pytest.approx(n["reward"], abs=1e-3)


def test_batched_prefixes_score_like_one_prefix_at_a_time(shared_scorer):
    """Prefixes of different lengths share a forward (right-padded, masked, explicit positions): the scores
    and truncation equal one-prefix-at-a-time scoring, in input order, including a prefix cut to fit."""
    from prefmill.serving.prefix_scorer import SharedPrefixScorer

    replies = ["Paris.", "", "The capital of France is Paris, on the Seine. " * 6, "Paris is the capital. " * 40,
               "It is Paris.", "Lyon."]
    prefixes = [reply_prefix({**CANDIDATES[0], "reply": r}) for r in replies]
    conts = [{"role": "user", "content": f.text} for f in FOLLOWUPS] + [{"role": "user", "content": "Ok"}]
    one = SharedPrefixScorer(prefix_batch=1)
    for batch in (4, 8):
        shared_scorer.prefix_batch = batch
        batched = shared_scorer.score_continuations(prefixes, conts, max_tokens=200)
        alone = one.score_continuations(prefixes, conts, max_tokens=200)
        assert [s.truncated_tokens for s in batched] == [s.truncated_tokens for s in alone]
        assert sum(s.truncated_tokens > 0 for s in batched) == 1
        for got, want in zip(batched, alone):
            assert [len(x) for x in got.logprobs] == [len(x) for x in want.logprobs]
            for g, w in zip(got.logprobs, want.logprobs):
                assert g == pytest.approx(w, abs=1e-4)
    shared_scorer.prefix_batch = 8
