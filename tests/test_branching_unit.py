"""Branched rollouts (REFUEL) with scripted models: which turns branch, that branches share the request stream and
leave the conversations alone, and each branch's pair or reject row (ties, a gate that ends a branch)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from prefmill.flows.stages import build_stages
from prefmill.flows.stages.base import ModelRole
from prefmill.flows.stages.branching import BranchingStage
from prefmill.operators.branching import Branching, BranchPairs
from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.flr import FollowUp, FollowUpReward
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.config import validate_pipeline_config
from prefmill.serving.protocols import ScoredPrefix
from tests.fakes import ScriptedLM, StreamingScriptedLM

SEEDS = [{"seed_id": f"s{i}", "question": f"Question {i}?", "persona": "a tester"} for i in range(3)]
OFFSET = 1003
FOLLOW_UPS = ["Why is that so?", "How does it work in practice?", "Can you give an example?",
              "What are the exceptions?", "Where can I read more?", "Is that always true?", "Who found it?"]


def is_simulator(conv) -> bool:
    return conv[0]["role"] == "system" and "You play the USER" in conv[0]["content"]


def varied(conv, sampling, k):
    """Replies whose length (the scripted reward) depends on the seed, so the two futures differ."""
    if is_simulator(conv):
        return f"Thought: more.\nUser: {FOLLOW_UPS[sampling.seed % 7]}"
    return " ".join(["word"] * (1 + sampling.seed % 5))


def same_length(conv, sampling, k):
    """Every reply is as long as every other: both futures score the same."""
    if is_simulator(conv):
        return f"Thought: more.\nUser: {FOLLOW_UPS[sampling.seed % 7]}"
    return f"answer {sampling.seed}"


def branch_says_nothing(conv, sampling, k):
    """The simulator of a branch writes no user line (the `empty` gate), twice: the branch ends there."""
    if is_simulator(conv) and sampling.seed >= OFFSET:
        return "Thought: nothing to add."
    return varied(conv, sampling, k)


class WordScorer:
    """FLR under which a reply's reward is its length in words (positive follow-up), the negative one zero."""

    name = "word-scorer"

    def score_continuations(self, prefixes, continuations, max_tokens=None):
        return [ScoredPrefix([[float(len(p[-1]["content"].split()))] if c["content"] == "Thanks!" else [0.0]
                              for c in continuations]) for p in prefixes]


class Models:
    def scorer(self, spec):
        return WordScorer()


FOLLOWUPS = (FollowUp("a", "positive", "Thanks!"), FollowUp("a", "negative", "That is wrong."))


def rollout(script, turns: str | None = "every", lm_class=ScriptedLM, max_turns: int = 3):
    branching = Branching(turns=turns, seed_offset=OFFSET) if turns else None
    run = Rollout(SelfChat(max_turns=max_turns), CandidateSampler(n=2, max_tokens=8), "last", branching)
    return run(SEEDS, lm_class(script))


def refuel(out, margin: float = 0.5) -> dict:
    stage = BranchingStage(FollowUpReward(FOLLOWUPS), BranchPairs(margin), "word-scorer")
    return stage({"conversations": out.conversations, "branches": out.branches}, Models())


def test_conversations_and_candidates_do_not_change_with_branching_on():
    off, on = rollout(varied, turns=None), rollout(varied)
    assert off.branches is None and on.branches.num_rows == 9
    assert on.conversations.equals(off.conversations)
    assert on.candidates.equals(off.candidates)


def test_every_turn_branches_from_each_prefix_with_other_seeds():
    out = rollout(varied)
    conversations = {c["conversation_id"]: c for c in out.conversations.to_pylist()}
    branches = out.branches.to_pylist()
    turns = Counter((b["conversation_id"], b["branch_turn"], b["prefix_length"]) for b in branches)
    assert sorted(turns) == sorted((c, h, 2 * h + 1) for c in conversations for h in range(3))
    for branch in branches:
        original = conversations[branch["conversation_id"]]["messages"]
        prefix = branch["prefix_length"]
        assert branch["messages"][:prefix] == original[:prefix] and original[prefix - 1]["role"] == "user"
        assert branch["messages"][prefix] != original[prefix]  # the future is sampled again
        assert branch["num_turns"] == 3 and branch["ended_by"] == "max_turns"


def test_uniform_picks_one_seeded_turn_per_conversation_and_every_turn_alike():
    branching = Branching(turns="uniform", seed=3)
    for num_turns in (3, 2):  # a conversation that ended before max_turns: its planned turn, else a second draw
        picks = [branching.branch_turns(f"conv-{n}", 3, num_turns) for n in range(600)]
        assert all(len(p) == 1 for p in picks)
        assert picks == [branching.branch_turns(f"conv-{n}", 3, num_turns) for n in range(600)]
        counts = Counter(p[0] for p in picks)
        assert set(counts) == set(range(num_turns))
        assert all(abs(c - 600 / num_turns) < 60 for c in counts.values()), counts
    assert Branching(turns="every").branch_turns("c", 3, 3) == [0, 1, 2]
    assert branching.branch_turns("c", 3, 0) == []
    assert rollout(varied, turns="uniform").branches.num_rows == len(SEEDS)


def test_branches_join_the_one_request_stream_as_soon_as_their_prefix_exists():
    lm = StreamingScriptedLM(varied)
    stream = Rollout(SelfChat(max_turns=3), CandidateSampler(n=2, max_tokens=8), "last",
                     Branching(turns="every", seed_offset=OFFSET))(SEEDS, lm)
    assert stream.branches.equals(rollout(varied).branches)
    order = [(event, key[1]) for event, key in lm.events if key[0] in ("assistant", "user")]
    last_done = max(k for k, (event, i) in enumerate(order) if event == "done" and i < len(SEEDS))
    first_branch = min(k for k, (event, i) in enumerate(order) if event == "add" and i >= len(SEEDS))
    assert first_branch < last_done  # branches run beside the conversations, not after them


def test_pairs_have_the_shared_prefix_as_prompt_and_one_reward_per_turn():
    out = rollout(varied)
    tables = refuel(out, margin=0.5)
    pairs, branches = tables["refuel_pairs"].to_pylist(), {b["branch_id"]: b for b in tables["branches"].to_pylist()}
    conversations = {c["conversation_id"]: c for c in out.conversations.to_pylist()}
    assert pairs and len(pairs) + tables["refuel_rejects"].num_rows == out.branches.num_rows
    for pair in pairs:
        branch = branches[pair["chosen_candidate_id"]] if pair["chosen_candidate_id"] in branches else \
            branches[pair["rejected_candidate_id"]]
        futures = {branch["branch_id"]: branch["messages"],
                   branch["conversation_id"]: conversations[branch["conversation_id"]]["messages"]}
        prompt = pair["prompt"]
        assert prompt[-1]["role"] == "user" and pair["branch_turn"] == branch["branch_turn"]
        assert futures[pair["chosen_candidate_id"]] == prompt + pair["chosen"]
        assert futures[pair["rejected_candidate_id"]] == prompt + pair["rejected"]
        for side in ("chosen", "rejected"):
            turns = [m for m in pair[side] if m["role"] == "assistant"]
            assert len(pair[f"{side}_turn_rewards"]) == len(turns)
            assert pair[f"{side}_turn_rewards"] == [float(len(m["content"].split())) for m in turns]
        assert pair["future_reward_diff"] == pytest.approx(
            sum(pair["chosen_turn_rewards"]) - sum(pair["rejected_turn_rewards"]))
        assert pair["future_reward_diff"] >= 0.5 and pair["source"] == "refuel"


def judge_by_length(conv, sampling, k, graded: list) -> str:
    """A judge whose grade is the length of the response it reads (1-5); its first output does not parse."""
    response = conv[-1]["content"].split("###Response to evaluate:\n", 1)[1].split("\n", 1)[0]
    graded.append(response)
    return "not json" if len(graded) == 1 else json.dumps({"feedback": "ok", "score": min(5, len(response.split()))})


class JudgeModels:
    def chat_model(self, spec, url=None):
        graded: list[str] = []
        return ScriptedLM(lambda conv, sampling, k: judge_by_length(conv, sampling, k, graded), name=spec)


def test_the_rubric_judge_can_grade_every_turn_and_a_turn_it_cannot_grade_rejects_the_branch():
    cfg = validate_pipeline_config({"sources": {"refuel": True}, "branching": {"reward": "judge", "margin": 0.0},
                                    "judge": {"aspects": ["helpfulness"]}, "models": {"judge": "judge-m"}})
    stage = next(s for s in build_stages(cfg) if s.name == "refuel")
    assert stage.roles() == {"judge": ModelRole("judge-m")}
    out = rollout(varied)
    tables = stage({"conversations": out.conversations, "branches": out.branches}, JudgeModels())
    pairs, rejects = tables["refuel_pairs"].to_pylist(), tables["refuel_rejects"].to_pylist()
    assert pairs and len(pairs) + len(rejects) == out.branches.num_rows
    assert {r["reason"] for r in rejects} <= {"no_turn_reward", "tie"} and "no_turn_reward" in {
        r["reason"] for r in rejects}
    for pair in pairs:  # the grade is the turn's length in words, capped at 5, less the midpoint 3
        turns = [m for m in pair["chosen"] if m["role"] == "assistant"]
        assert pair["chosen_turn_rewards"] == [min(5, len(m["content"].split())) - 3.0 for m in turns]
        assert pair["scorer_model"] == "judge-m"


def test_futures_that_tie_are_rejected():
    tables = refuel(rollout(same_length), margin=0.5)
    rejects = tables["refuel_rejects"].to_pylist()
    assert tables["refuel_pairs"].num_rows == 0 and len(rejects) == 9
    assert {r["reason"] for r in rejects} == {"tie"} and all(r["source"] == "refuel" for r in rejects)
    assert all(b["future_reward"] == b["original_future_reward"] for b in tables["branches"].to_pylist())


def test_a_gate_that_ends_a_branch_rejects_it_with_that_reason():
    out = rollout(branch_says_nothing)
    assert {c["ended_by"] for c in out.conversations.to_pylist()} == {"max_turns"}
    cut = [b for b in out.branches.to_pylist() if b["branch_turn"] < 2]  # the last turn's branch has no user turn
    assert cut and all(b["ended_by"] == "gate:empty" for b in cut)
    rejects = {r["candidate_id"]: r for r in refuel(out, margin=0.0)["refuel_rejects"].to_pylist()}
    for branch in cut:
        assert rejects[branch["branch_id"]]["reason"] == "gate"
        assert "gate:empty" in rejects[branch["branch_id"]]["detail"]


def test_refuel_adds_its_stage_and_the_branches_table_only_when_on():
    on = validate_pipeline_config({"sources": {"refuel": True}, "critiques": {"enabled": False}})
    off = validate_pipeline_config({"critiques": {"enabled": False}})
    stages_on, stages_off = build_stages(on), build_stages(off)
    assert [s.name for s in stages_on] == ["rollout", "rewards", "refuel"]
    assert "branches" in stages_on[0].produces and "branches" not in stages_off[0].produces
    assert [s.name for s in stages_off] == ["rollout", "rewards"]
    assert stages_on[0].fingerprint() != stages_off[0].fingerprint()


def test_multi_turn_pairs_survive_dedup_keys_and_render_through_trl(model_path):
    """Dedup compares the whole continuation; the TRL export keeps it, and trl's chat template renders the
    chosen side as every later turn (user turns included) after the prompt's generation prompt."""
    from transformers import AutoTokenizer
    from trl.data_utils import maybe_apply_chat_template

    from prefmill.flows.training import trl_table
    from prefmill.operators.dedup import dedup_key, reply_text

    pairs = refuel(rollout(varied), margin=0.5)["refuel_pairs"]
    pair = pairs.to_pylist()[0]
    assert reply_text(pair) == "\n".join(m["content"] for m in pair["chosen"])
    later = {**pair, "chosen": pair["chosen"][:-1] + [{"role": "assistant", "content": "another last turn"}]}
    assert dedup_key(later) != dedup_key(pair)  # every turn of the continuation counts, not only the first
    [row] = [r for r in trl_table(pairs).to_pylist() if r["pair_id"] == pair["pair_id"]]
    assert (row["prompt"], row["chosen"]) == (pair["prompt"], pair["chosen"]) and len(row["chosen"]) > 1
    assert (row["future_reward_diff"], row["chosen_turn_rewards"]) == (pair["future_reward_diff"],
                                                                       pair["chosen_turn_rewards"])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rendered = maybe_apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
    whole = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert rendered["prompt"] + rendered["chosen"] == whole
    assert all(m["content"] in rendered["chosen"] for m in row["chosen"])


def test_a_refuel_pair_shares_its_prompt_id_with_self_chats_context_of_the_same_prefix():
    out = rollout(varied)
    contexts = {c["context_id"]: c["context"] for c in out.candidates.to_pylist()}
    tables = refuel(out, margin=0.0)
    rows = tables["refuel_pairs"].to_pylist() + tables["refuel_rejects"].to_pylist()
    last = [r for r in tables["refuel_pairs"].to_pylist() if r["prompt_id"] in contexts]
    assert rows and last  # a branch at the last turn continues the context self-chat's candidates answer
    assert all(contexts[r["prompt_id"]] == r["prompt"] for r in last)
