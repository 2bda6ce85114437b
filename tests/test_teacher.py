"""The DNO teacher: one reply per context from another model, flagged and ranked like any candidate. Scripted
models force a teacher that wins and one that loses; a real run serves the teacher with `prefmill serve` over
HTTP while the policy runs in process."""

from __future__ import annotations

import json

import httpx
import pyarrow as pa
import pytest

from prefmill.flows.placement import run_roles
from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.pairs import PairMiner
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.config import ConfigError, load_pipeline_config, validate_pipeline_config
from prefmill.schemas.tables import CANDIDATES, REWARDS
from prefmill.serving.hosts import LocalPool, ModelHost
from prefmill.storage.catalog import Catalog
from tests.fakes import ScriptedLM

SEEDS = [{"seed_id": f"s{i}", "question": f"Question {i}?", "persona": "a tester"} for i in range(2)]


def policy_script(conv, sampling, k):
    return f"Policy reply {sampling.seed + k} to {conv[-1]['content']}"


def teacher_script(conv, sampling, k):
    return f"A careful teacher answer to {conv[-1]['content']}"


def rollout(teacher_name="teacher-m", teacher=teacher_script, teacher_window=None):
    lm = ScriptedLM(policy_script, name="policy-m")
    roll = Rollout(SelfChat(max_turns=1), CandidateSampler(n=3, seed=10))
    teacher_lm = ScriptedLM(teacher, name=teacher_name, context_window=teacher_window)
    return roll(SEEDS, lm, teacher=teacher_lm).candidates.to_pylist()


def test_every_context_gets_one_flagged_teacher_reply_after_the_policys_samples():
    rows = rollout()
    teacher = [r for r in rows if r["is_teacher"]]
    assert len(rows) == 8 and len(teacher) == 2
    assert {r["context_id"] for r in teacher} == {r["context_id"] for r in rows}
    assert all(r["model"] == "teacher-m" and r["sample_index"] == 3 and r["sampling_seed"] == 13 for r in teacher)
    assert all(r["reply"].startswith("A careful teacher") for r in teacher)
    assert not any(r["is_teacher"] for r in rows if r["model"] == "policy-m")


def test_a_teacher_under_the_policys_own_spec_keeps_distinct_ids_and_a_copy_is_flagged():
    rows = rollout(teacher_name="policy-m", teacher=policy_script)
    assert len({r["candidate_id"] for r in rows}) == len(rows) == 8
    teacher = [r for r in rows if r["is_teacher"]]
    assert [r["is_duplicate"] for r in teacher] == [False, False]  # seed 13 is not one of the policy's 10..12
    copied = rollout(teacher=lambda conv, sampling, k: f"Policy reply 10 to {conv[-1]['content']}")
    assert all(r["is_duplicate"] for r in copied if r["is_teacher"])


def mined(teacher_reward: float, teacher_window=None, rejects=False):
    rows = [r for r in rollout(teacher_window=teacher_window) if r["seed_id"] == "s0"]
    values = [teacher_reward if r["is_teacher"] else 1.0 + 0.5 * r["sample_index"] for r in rows]
    rewards = pa.Table.from_pylist([{"candidate_id": r["candidate_id"], "context_id": r["context_id"], "reward": v,
                                     "aspects": [], "aggregation": "mean", "truncated_tokens": 0,
                                     "scorer_model": "s"} for r, v in zip(rows, values)], schema=REWARDS)
    out = PairMiner(factuality_weight=0.0)(pa.Table.from_pylist(rows, schema=CANDIDATES), rewards)
    return (out.pairs.to_pylist(), out.rejects.to_pylist()) if rejects else out.pairs.to_pylist()


def test_a_teacher_that_wins_is_chosen_and_the_pair_says_so():
    [pair] = mined(teacher_reward=9.0)
    assert (pair["chosen_is_teacher"], pair["rejected_is_teacher"]) == (True, False)
    assert pair["chosen"][0]["content"].startswith("A careful teacher")
    assert pair["policy_model"] == "policy-m"  # the policy sampled the context, whoever won


def test_a_teacher_that_loses_is_rejected_and_the_pair_says_so():
    [pair] = mined(teacher_reward=-9.0)
    assert (pair["chosen_is_teacher"], pair["rejected_is_teacher"]) == (False, True)
    assert pair["rejected"][0]["content"].startswith("A careful teacher")


def test_a_context_too_long_for_the_teacher_alone_rejects_the_teacher_reply_not_the_context():
    pairs, rejects = mined(teacher_reward=9.0, teacher_window=3, rejects=True)
    assert len(pairs) == 1 and not pairs[0]["chosen_is_teacher"]  # the policy's replies still make their pair
    assert [(r["reason"], r["candidate_id"].startswith("teacher")) for r in rejects] == [("prompt_too_long", True)]


def test_teacher_config_is_checked_and_its_server_is_where_not_what():
    with pytest.raises(ConfigError, match="models.teacher_url is set but models.teacher is not"):
        load_pipeline_config(overrides=["models.teacher_url=http://127.0.0.1:9/v1"])
    base = validate_pipeline_config({"models": {"teacher": "big"}})
    moved = validate_pipeline_config({"models": {"teacher": "big", "teacher_url": "http://h:1/v1"}})
    assert base.fingerprint() == moved.fingerprint() != validate_pipeline_config({}).fingerprint()


def test_a_served_teacher_is_not_placed_on_our_devices_and_a_local_one_is():
    served = validate_pipeline_config({"models": {"teacher": "big", "teacher_url": "http://h:1/v1"}})
    local = validate_pipeline_config({"models": {"teacher": "big"}})
    assert "teacher" not in {r.name for r in run_roles(served)}
    assert ("teacher", "big") in {(r.name, r.spec) for r in run_roles(local)}


def served_requests(url: str) -> float:
    """Requests the server finished so far, from vLLM's Prometheus counter."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total"))


@pytest.fixture(scope="module")
def teacher_run(engine, http_server, tmp_path_factory):
    from prefmill.flows.pipeline import pipeline_flow

    folder = tmp_path_factory.mktemp("teacher")
    seeds = [{"question": "What is a good way to learn to cook?"}, {"question": "Why is the sky blue?"}]
    (folder / "seeds.jsonl").write_text("\n".join(json.dumps(s) for s in seeds))
    cfg = validate_pipeline_config({
        "seeds": {"path": str(folder / "seeds.jsonl")}, "catalog": str(folder / "catalog"),
        "result_storage": str(folder / "results"),
        "models": {"teacher": "smollm2-135m", "teacher_url": http_server + "/v1"},
        "selfchat": {"max_turns": 1, "max_tokens_per_turn": 32}, "candidates": {"n": 2, "max_tokens": 32},
        "critiques": {"enabled": False}, "pairs": {"min_margin": 0.0}})
    before = served_requests(http_server)
    pool = LocalPool(ModelHost(preloaded={"smollm2-135m": engine}))  # the policy in process, the teacher served
    pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))
    return Catalog(cfg.catalog), served_requests(http_server) - before


def test_the_served_teacher_answers_every_context_over_http_and_is_scored(teacher_run):
    catalog, served = teacher_run
    candidates = catalog.read("candidates").to_pylist()
    contexts = {r["context_id"] for r in candidates}
    teacher = [r for r in candidates if r["is_teacher"]]
    assert len(contexts) == 2 and sorted(r["context_id"] for r in teacher) == sorted(contexts)
    assert served == len(teacher)  # the policy's requests never reached the server
    rewarded = {r["candidate_id"] for r in catalog.read("rewards").to_pylist()}
    assert {r["candidate_id"] for r in teacher} <= rewarded


def test_every_published_pair_records_whether_the_teacher_was_chosen_or_rejected(teacher_run):
    catalog, _ = teacher_run
    pairs = catalog.read("pairs").to_pylist()
    rejects = catalog.read("pair_rejects").to_pylist()
    assert len(pairs) + len(rejects) >= 2  # every context is accounted for
    assert pairs, "min_margin 0: two distinct scored replies of a context always make a pair"
    teacher_ids = {r["candidate_id"] for r in catalog.read("candidates").to_pylist() if r["is_teacher"]}
    for pair in pairs:
        assert pair["chosen_is_teacher"] == (pair["chosen_candidate_id"] in teacher_ids)
        assert pair["rejected_is_teacher"] == (pair["rejected_candidate_id"] in teacher_ids)
