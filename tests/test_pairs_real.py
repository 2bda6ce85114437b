"""Pairs and dedup on real parts: the vLLM engine's rollout, FLR with the prefix-shared scorer, the
packaged embedder, and a real DuckLake catalog that stores the vectors with the pairs.

What the tiny model says is not asserted; what must hold for any output is."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.dedup import Deduper, vectors_of
from prefmill.operators.flr import FollowUpReward
from prefmill.operators.pairs import PairMiner
from prefmill.operators.rollout import Rollout
from prefmill.operators.seeds import load_seeds
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.tables import DEDUP_REMOVED, PAIR_EMBEDDINGS, PAIR_REJECTS, PAIRS
from prefmill.serving.ann import make_index
from prefmill.storage.catalog import Catalog

pytestmark = pytest.mark.slow
CONTEXT_REASONS = {"fewer_than_two_candidates", "tie", "under_margin"}
CANDIDATE_REASONS = {"no_reward", "no_factuality", "duplicate_reply", "echoes_user", "empty_reply"}


@pytest.fixture(scope="module")
def mined(engine):
    from prefmill.serving.prefix_scorer import SharedPrefixScorer

    seeds = load_seeds().seeds.slice(0, 4).to_pylist()
    rollout = Rollout(SelfChat(max_turns=1, max_tokens_per_turn=48), CandidateSampler(n=3, max_tokens=48), "last")
    candidates = rollout(seeds, engine).candidates
    rewards = FollowUpReward()(candidates.to_pylist(), SharedPrefixScorer())
    return candidates, PairMiner(factuality_weight=0.0, min_margin=0.1)(candidates, rewards, run_id="run-a")


def test_every_candidate_ends_in_a_pair_or_a_reject_and_no_pair_is_degenerate(mined):
    candidates, result = mined
    assert result.pairs.schema == PAIRS and result.rejects.schema == PAIR_REJECTS
    pairs, rejects = result.pairs.to_pylist(), result.rejects.to_pylist()
    for pair in pairs:
        assert pair["chosen"][0]["content"].strip() != pair["rejected"][0]["content"].strip()
        assert pair["margin"] >= 0.1 and pair["chosen_win_prob"] > 0.5
        assert pair["prompt"][-1]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert pair["run_id"] == "run-a" and pair["policy_model"] == "smollm2-135m"
    assert {r["reason"] for r in rejects if r["candidate_id"] is None} <= CONTEXT_REASONS
    assert {r["reason"] for r in rejects if r["candidate_id"] is not None} <= CANDIDATE_REASONS
    contexts = set(candidates.column("context_id").to_pylist())
    explained = {p["prompt_id"] for p in pairs} | {r["prompt_id"] for r in rejects}
    assert explained == contexts  # no context vanishes silently


def test_pairs_round_trip_through_the_catalog_with_their_vectors_and_are_never_embedded_again(mined, embedder,
                                                                                             tmp_path):
    _, result = mined
    if result.pairs.num_rows == 0:
        pytest.skip("the model gave no pair above the margin in this run")  # the unit tests force that case
    deduped = Deduper()(result.pairs, embedder, make_index, run_id="run-a")
    catalog = Catalog(tmp_path / "lake")
    versions = catalog.publish_many({"pairs": deduped.pairs, "pairs_embeddings": deduped.embeddings,
                                     "pair_rejects": result.rejects, "dedup_removed": deduped.removed},
                                    {"run_id": "run-a"},
                                    {"pairs": PAIRS, "pairs_embeddings": PAIR_EMBEDDINGS,
                                     "pair_rejects": PAIR_REJECTS, "dedup_removed": DEDUP_REMOVED})
    assert len({v.version for v in versions.values()}) == 1  # one snapshot for the run's tables
    assert catalog.read("pairs").to_pylist() == deduped.pairs.to_pylist()
    stored = catalog.read("pairs_embeddings", with_version=True)
    for name in ("prompt_vector", "reply_vector"):
        assert stored.schema.field(name).type == pa.list_(pa.float32())
        assert np.array_equal(vectors_of(stored.column(name)), vectors_of(deduped.embeddings.column(name)))

    class NoEncoder:
        name = embedder.name

        def embed(self, texts):
            assert not texts, "a published pair was embedded again"
            return np.zeros((0, 384), np.float32)

    again = Deduper()(deduped.pairs, NoEncoder(), make_index, published=stored, run_id="run-b")
    assert again.pairs.num_rows == 0 and again.removed.num_rows == deduped.pairs.num_rows
    assert set(again.removed.column("duplicate_of_version").to_pylist()) == {versions["pairs"].version}
