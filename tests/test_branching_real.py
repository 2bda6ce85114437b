"""Branched rollouts (REFUEL) end to end on the real model: one flow run on the in-process engine with
sources.refuel on, checked against the published conversations and branches.

Whatever the tiny model writes, every conversation branches at every turn (turns = every), and every branch
ends as a published pair, a reject row or a dedup removal; each published pair's prompt is the shared prefix
of both trajectories and its per-turn reward lists have one value per assistant turn of its side."""

from __future__ import annotations

import pytest

from prefmill.schemas.config import validate_pipeline_config
from prefmill.serving.hosts import LocalPool, ModelHost
from prefmill.storage.catalog import Catalog

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def refuel_run(engine, tmp_path_factory):
    from prefmill.flows.pipeline import pipeline_flow

    folder = tmp_path_factory.mktemp("refuel")
    cfg = validate_pipeline_config({
        "seeds": {"limit": 3}, "catalog": str(folder / "catalog"), "result_storage": str(folder / "results"),
        "shard_size": 3, "sources": {"refuel": True}, "critiques": {"enabled": False},
        "selfchat": {"max_turns": 2, "max_tokens_per_turn": 32, "simulator_max_tokens": 32},
        "candidates": {"n": 2, "max_tokens": 24}, "branching": {"turns": "every", "margin": 0.0}})
    result = pipeline_flow(pool=LocalPool(ModelHost(preloaded={"smollm2-135m": engine})))(cfg.model_dump(mode="json"))
    catalog = Catalog(cfg.catalog)
    return result, {name: catalog.read(name).to_pylist() for name in result.versions}


def test_every_conversation_branches_at_every_turn(refuel_run):
    result, tables = refuel_run
    assert "branches" in result.versions and "refuel" in result.stages
    expected = sorted((c["conversation_id"], h) for c in tables["conversations"]
                      for h in range(sum(m["role"] == "user" for m in c["messages"])))  # a prefix per user turn
    assert expected and all(c["num_turns"] >= 1 for c in tables["conversations"])
    assert sorted((b["conversation_id"], b["branch_turn"]) for b in tables["branches"]) == expected


def test_every_branch_is_scored_and_ends_as_a_pair_or_a_reject(refuel_run):
    _, tables = refuel_run
    branches = tables["branches"]
    assert all(len(b["turn_rewards"]) == sum(m["role"] == "assistant" for m in b["messages"][b["prefix_length"]:])
               for b in branches)
    published = [p for p in tables["pairs"] if p["source"] == "refuel"]
    rejects = [r for r in tables["pair_rejects"] if r["source"] == "refuel"]
    ids = {b["branch_id"] for b in branches}
    accounted = [r["candidate_id"] for r in rejects] + [p[f"{side}_candidate_id"] for p in published
                                                        for side in ("chosen", "rejected")
                                                        if p[f"{side}_candidate_id"] in ids]
    assert len(accounted) == len(set(accounted)) and set(accounted) <= ids  # no branch twice, none unknown
    assert len(ids - set(accounted)) <= len(tables["dedup_removed"])  # the rest: pairs dedup removed


def test_published_pairs_share_a_real_prefix_and_reward_every_turn(refuel_run):
    _, tables = refuel_run
    conversations = {c["conversation_id"]: c["messages"] for c in tables["conversations"]}
    futures = conversations | {b["branch_id"]: b["messages"] for b in tables["branches"]}
    published = [p for p in tables["pairs"] if p["source"] == "refuel"]
    assert published, "margin 0: every branch whose futures both ran to their end and differ is a pair"
    for pair in published:
        prompt = pair["prompt"]
        assert prompt[-1]["role"] == "user" and prompt == conversations[pair["conversation_id"]][:len(prompt)]
        assert {pair["chosen_candidate_id"], pair["rejected_candidate_id"]} & set(conversations)
        for side in ("chosen", "rejected"):
            assert futures[pair[f"{side}_candidate_id"]] == prompt + pair[side]
            turns = sum(m["role"] == "assistant" for m in pair[side])
            assert turns >= 1 and len(pair[f"{side}_turn_rewards"]) == turns
        assert pair["future_reward_diff"] == pytest.approx(
            sum(pair["chosen_turn_rewards"]) - sum(pair["rejected_turn_rewards"]))
        assert pair["branch_turn"] == sum(m["role"] == "assistant" for m in prompt)
