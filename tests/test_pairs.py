"""Pair mining on hand-made candidates, rewards and critiques: every outcome forced, none left to a model."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from prefmill.operators.pairs import PairMiner, revised_candidates, revised_id, win_prob
from prefmill.schemas.tables import CANDIDATES, CRITIQUES, PAIR_REJECTS, PAIRS, REWARDS

QUESTION = [{"role": "user", "content": "How do vaccines train the immune system?"}]
REPLIES = ["They show the body a harmless piece of a germ so it learns to recognise it.",
           "Vaccines contain weakened germs; memory cells then respond faster.",
           "I like turtles.",
           "Vaccines are injections."]


def candidates(replies=REPLIES, context="ctx-a", seed="seed-a"):
    return [{"candidate_id": f"{context}-c{k}", "context_id": context, "conversation_id": f"conv-{context}",
             "seed_id": seed, "context": QUESTION, "reply": text, "sample_index": k, "sampling_seed": k,
             "num_tokens": len(text.split()), "finish_reason": "stop", "is_duplicate": False, "model": "policy-m"}
            for k, text in enumerate(replies)]


def rewards(rows, values):
    return pa.Table.from_pylist([{"candidate_id": r["candidate_id"], "context_id": r["context_id"], "reward": v,
                                  "aspects": [], "aggregation": "mean", "truncated_tokens": 0,
                                  "scorer_model": "scorer-m"} for r, v in zip(rows, values)], schema=REWARDS)


def critiques(rows, initial, final=None, final_text=None):
    final = final or initial
    final_text = final_text or [r["reply"] for r in rows]
    return pa.Table.from_pylist([{"candidate_id": r["candidate_id"], "context_id": r["context_id"], "rounds": [],
                                  "final_response": t, "initial_score": i, "final_score": f,
                                  "num_parse_failures": 0, "num_calls": 1, "critic_model": "critic-m"}
                                 for r, i, f, t in zip(rows, initial, final, final_text)], schema=CRITIQUES)


def table(rows):
    return pa.Table.from_pylist(rows, schema=CANDIDATES)


def reasons(mined):
    return sorted(r["reason"] for r in mined.rejects.to_pylist())


def test_best_worst_gives_one_trl_pair_with_scores_parts_and_soft_labels():
    rows = candidates()
    mined = PairMiner(min_margin=0.1)(table(rows), rewards(rows, [-1.0, -1.5, -3.0, -2.0]),
                                      critiques(rows, [1.0, 0.5, 0.0, 0.5]), run_id="run-1")
    assert mined.pairs.schema == PAIRS and mined.rejects.schema == PAIR_REJECTS
    [pair] = mined.pairs.to_pylist()
    assert pair["prompt"] == QUESTION and pair["prompt_id"] == "ctx-a"
    assert pair["chosen"] == [{"role": "assistant", "content": REPLIES[0]}]
    assert pair["rejected"] == [{"role": "assistant", "content": REPLIES[2]}]
    assert (pair["chosen_reward"], pair["rejected_reward"]) == (-1.0, -3.0)
    assert (pair["chosen_factuality"], pair["rejected_factuality"]) == (1.0, 0.0)
    assert pair["margin"] == pytest.approx(pair["score_chosen"] - pair["score_rejected"]) and pair["margin"] > 0
    assert pair["chosen_win_prob"] == pytest.approx(1 / (1 + math.exp(-pair["margin"])))
    assert pair["chosen_mean_win_prob"] > 0.5 > pair["rejected_mean_win_prob"]
    assert (pair["policy_model"], pair["scorer_model"], pair["critic_model"]) == ("policy-m", "scorer-m", "critic-m")
    assert pair["run_id"] == "run-1" and pair["num_candidates"] == 4 and pair["strategy"] == "best_worst"
    assert mined.rejects.num_rows == 0


def test_pooled_normalisation_ignores_a_context_offset_and_keeps_magnitudes():
    a, b = candidates(REPLIES[:2], "ctx-a"), candidates(REPLIES[:2], "ctx-b")
    miner = PairMiner(factuality_weight=0.0, min_margin=0.0)
    base = {p["prompt_id"]: p["margin"] for p in
            miner(table(a + b), rewards(a + b, [-1.0, -2.0, -1.0, -1.1])).pairs.to_pylist()}
    shifted = {p["prompt_id"]: p["margin"] for p in
               miner(table(a + b), rewards(a + b, [-11.0, -12.0, -1.0, -1.1])).pairs.to_pylist()}
    assert shifted == pytest.approx(base)
    assert base["ctx-a"] == pytest.approx(10 * base["ctx-b"])  # a 10x larger gap stays 10x larger
    context_z = {p["prompt_id"]: p["margin"] for p in PairMiner(factuality_weight=0.0, normalization="context",
                 min_margin=0.0)(table(a + b), rewards(a + b, [-1.0, -2.0, -1.0, -1.1])).pairs.to_pylist()}
    assert context_z["ctx-a"] == pytest.approx(context_z["ctx-b"])  # what `pooled` avoids


def test_a_tie_and_a_lone_candidate_are_rejects_with_their_reason():
    tie = candidates(REPLIES[:3], "ctx-tie")
    lone = candidates(REPLIES[:1], "ctx-lone", seed="seed-b")
    mined = PairMiner(factuality_weight=0.0)(table(tie + lone), rewards(tie + lone, [-1.0, -1.0, -1.0, -2.0]))
    assert mined.pairs.num_rows == 0
    by_prompt = {r["prompt_id"]: r for r in mined.rejects.to_pylist()}
    assert by_prompt["ctx-tie"]["reason"] == "tie" and by_prompt["ctx-tie"]["num_candidates"] == 3
    assert by_prompt["ctx-lone"]["reason"] == "fewer_than_two_candidates"
    assert by_prompt["ctx-lone"]["seed_id"] == "seed-b"


def test_identical_replies_never_become_chosen_and_rejected():
    rows = candidates(["Same answer.", "same   ANSWER.", "Same answer."])
    mined = PairMiner(factuality_weight=0.0, min_margin=0.0)(table(rows), rewards(rows, [-1.0, -2.0, -3.0]))
    assert mined.pairs.num_rows == 0
    assert reasons(mined) == ["duplicate_reply", "duplicate_reply", "fewer_than_two_candidates"]


def test_under_the_margin_is_a_reject_with_the_best_margin():
    rows = candidates(REPLIES[:2])
    mined = PairMiner(factuality_weight=0.0, normalization="none", min_margin=0.5)(
        table(rows), rewards(rows, [-1.0, -1.2]))
    [reject] = mined.rejects.to_pylist()
    assert reject["reason"] == "under_margin" and reject["best_margin"] == pytest.approx(0.2)
    assert mined.pairs.num_rows == 0


def test_a_missing_reward_or_factuality_is_a_reject_never_a_silent_drop():
    rows = candidates()
    mined = PairMiner(min_margin=0.0)(table(rows), rewards(rows[:3], [-1.0, -2.0, -3.0]),
                                      critiques(rows, [1.0, None, 0.0, 1.0]))
    rejected = {r["candidate_id"]: r["reason"] for r in mined.rejects.to_pylist()}
    assert rejected == {"ctx-a-c3": "no_reward", "ctx-a-c1": "no_factuality"}
    [pair] = mined.pairs.to_pylist()
    assert {pair["chosen_candidate_id"], pair["rejected_candidate_id"]} == {"ctx-a-c0", "ctx-a-c2"}
    nan_reward = PairMiner(factuality_weight=0.0)(table(rows[:1]), rewards(rows[:1], [float("nan")]))
    assert reasons(nan_reward) == ["no_reward"]


def test_a_reply_that_echoes_the_question_is_rejected():
    rows = candidates([QUESTION[0]["content"], REPLIES[0], REPLIES[1]])
    mined = PairMiner(factuality_weight=0.0, min_margin=0.0)(table(rows), rewards(rows, [0.0, -1.0, -2.0]))
    assert {r["candidate_id"]: r["reason"] for r in mined.rejects.to_pylist()} == {"ctx-a-c0": "echoes_user"}
    assert mined.pairs.to_pylist()[0]["chosen_candidate_id"] == "ctx-a-c1"


def test_a_revised_reply_competes_as_its_own_candidate_and_remembers_its_original():
    rows = candidates(REPLIES[:2])
    fixed = "Vaccines contain weakened or inactivated germs; memory cells then respond faster."
    crit = critiques(rows, initial=[0.5, 0.0], final=[0.5, 1.0], final_text=[REPLIES[0], fixed])
    revised = revised_candidates(table(rows), crit)
    [rev] = revised.to_pylist()
    assert rev["candidate_id"] == revised_id("ctx-a-c1", fixed) and rev["reply"] == fixed
    assert rev["model"] == "critic-m" and rev["finish_reason"] == "revised"
    everything = pa.concat_tables([table(rows), revised])
    mined = PairMiner(min_margin=0.0)(everything, rewards(everything.to_pylist(), [-1.0, -1.5, -1.0]), crit)
    [pair] = mined.pairs.to_pylist()
    assert pair["chosen_candidate_id"] == rev["candidate_id"] and pair["chosen_revised_from"] == "ctx-a-c1"
    assert pair["chosen_factuality"] == 1.0 and pair["rejected_factuality"] == 0.0
    assert pair["rejected_candidate_id"] == "ctx-a-c1" and pair["rejected_revised_from"] is None
    assert pair["num_candidates"] == 3 and pair["policy_model"] == "policy-m"


def test_best_vs_random_lower_is_seeded_and_only_picks_replies_below_the_margin():
    rows = candidates()
    values = [-1.0, -1.05, -3.0, -2.5]
    picks = set()
    for seed in range(12):
        miner = PairMiner(strategy="best_vs_random_lower", factuality_weight=0.0, normalization="none",
                          min_margin=0.5, seed=seed)
        [pair] = miner(table(rows), rewards(rows, values)).pairs.to_pylist()
        again = miner(table(list(reversed(rows))), rewards(rows, values)).pairs.to_pylist()[0]
        assert again["rejected_candidate_id"] == pair["rejected_candidate_id"]  # input order does not matter
        assert pair["chosen_candidate_id"] == "ctx-a-c0" and pair["margin"] >= 0.5
        picks.add(pair["rejected_candidate_id"])
    assert picks == {"ctx-a-c2", "ctx-a-c3"}  # never c1, which is within the margin


def test_all_above_margin_is_capped_per_context_largest_margins_first():
    rows = candidates()
    miner = PairMiner(strategy="all_above_margin", factuality_weight=0.0, normalization="none", min_margin=0.4,
                      max_pairs_per_context=3)
    pairs = miner(table(rows), rewards(rows, [-1.0, -1.2, -3.0, -2.0])).pairs.to_pylist()
    margins = [p["margin"] for p in pairs]
    assert len(pairs) == 3 and margins == sorted(margins, reverse=True) and min(margins) >= 0.4
    assert len({p["pair_id"] for p in pairs}) == 3
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_soft_labels_are_sppo_probabilities():
    assert win_prob(1.0, 1.0) == 0.5
    assert win_prob(2.0, 0.0) == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert win_prob(0.0, 2.0) == pytest.approx(1 - win_prob(2.0, 0.0))


def test_bad_settings_fail_naming_the_allowed_values():
    with pytest.raises(ValueError, match="best_worst"):
        PairMiner(strategy="best")
    with pytest.raises(ValueError, match="pooled"):
        PairMiner(normalization="zscore")
