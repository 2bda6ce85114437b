"""A prompt over the model's context window (issue 12 B.2): the backend answers that one request with
empty `PROMPT_TOO_LONG` completions, and every operator records it with that reason while the rest of the
batch goes on. Scripted models first; the last test runs the pipeline on the real engine."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.critiques import TOO_LONG, ClaimCritic
from prefmill.operators.flr import FollowUp, FollowUpReward
from prefmill.operators.pairs import PairMiner
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.serving.protocols import PROMPT_TOO_LONG, ScoredPrefix
from tests.fakes import ScriptedLM, StreamingScriptedLM

LONG = "word " * 400  # over the scripted models' 300-word window on its own
SEEDS = [{"seed_id": f"s{i}", "question": f"Question {i}?", "persona": "a tester"} for i in range(3)]
LONG_SEED = {"seed_id": "long", "question": LONG, "persona": "a tester"}


def is_simulator(conv) -> bool:
    return conv[0]["role"] == "system" and "You play the USER" in conv[0]["content"]


def script(conv, sampling, k):
    if is_simulator(conv):
        return f"Thought: more.\nUser: Why is that, case {sampling.seed}?"
    talk = "Long answer " * 60 if "Question 1?" in conv[0]["content"] else "Because of reasons"
    return talk.strip() + " more" * k


def by_seed(table: pa.Table) -> dict[str, dict]:
    return {r["seed_id"]: r for r in table.to_pylist()}


@pytest.mark.parametrize("model", [ScriptedLM, StreamingScriptedLM])
def test_a_seed_over_the_window_ends_its_conversation_and_leaves_the_others_alone(model):
    chat = SelfChat(max_turns=2)
    alone = by_seed(chat(SEEDS, model(script, context_window=300)))
    rows = by_seed(chat([SEEDS[0], LONG_SEED, *SEEDS[1:]], model(script, context_window=300)))
    long = rows.pop("long")
    assert long["ended_by"] == PROMPT_TOO_LONG and long["num_turns"] == 0 and long["num_tokens"] == 0
    assert long["messages"] == [{"role": "user", "content": LONG}] and long["gates"] == []
    assert rows == alone  # same seeds, same rows: the long seed changes nothing for the others


def test_a_transcript_outgrowing_the_simulators_window_ends_with_the_turns_it_has():
    assistant, simulator = ScriptedLM(script), ScriptedLM(script, "sim", context_window=300)
    rows = by_seed(SelfChat(max_turns=3)(SEEDS, assistant, simulator))
    # seed 1's 120-word answers: with the second one the simulator's prompt (instructions + transcript +
    # max_tokens) is over the window; the conversation keeps its two exchanges
    assert rows["s1"]["ended_by"] == PROMPT_TOO_LONG
    assert [m["role"] for m in rows["s1"]["messages"]] == ["user", "assistant"] * 2
    assert all(rows[s]["ended_by"] == "max_turns" and rows[s]["num_turns"] == 3 for s in ("s0", "s2"))


class WordScorer:
    """A ContinuationScorer under which longer replies win: the positive follow-up scores the reply's
    length in words, the negative one zero."""

    name = "word-scorer"

    def __init__(self):
        self.prefixes = 0

    def score_continuations(self, prefixes, continuations, max_tokens=None):
        self.prefixes += len(prefixes)
        return [ScoredPrefix([[float(len(p[-1]["content"].split())) if c["content"] == "Thanks!" else 0.0]
                              for c in continuations]) for p in prefixes]


FOLLOWUPS = (FollowUp("a", "positive", "Thanks!"), FollowUp("a", "negative", "That is wrong."))


def test_a_context_over_the_window_is_on_record_and_rejected_with_that_reason_never_dropped():
    # candidates long enough for the scripted 120-token answer, short enough to fit the window with a short prompt
    rollout = Rollout(SelfChat(max_turns=1), CandidateSampler(max_tokens=192))
    tables = rollout([LONG_SEED, *SEEDS], ScriptedLM(script, context_window=300))
    candidates = by_context_seed(tables.candidates)
    long = candidates.pop("long")
    assert len(long) == 4 and all(c["reply"] == "" and c["finish_reason"] == PROMPT_TOO_LONG for c in long)
    assert not any(c["is_duplicate"] for c in long)
    assert all(len(rows) == 4 and rows[0]["finish_reason"] == "stop" for rows in candidates.values())

    scorer = WordScorer()
    rewards = FollowUpReward(FOLLOWUPS)(tables.candidates.to_pylist(), scorer)
    assert scorer.prefixes == rewards.num_rows == 12  # a never-sampled candidate is not scored
    mined = PairMiner(min_margin=0.0)(tables.candidates, rewards)
    [reject] = [r for r in mined.rejects.to_pylist() if r["seed_id"] == "long"]
    assert reject["reason"] == PROMPT_TOO_LONG and reject["num_candidates"] == 0
    assert reject["prompt_id"] == long[0]["context_id"] and reject["candidate_id"] is None
    assert sorted(r["seed_id"] for r in mined.pairs.to_pylist()) == ["s0", "s1", "s2"]


def by_context_seed(candidates: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in candidates.to_pylist():
        out.setdefault(row["seed_id"], []).append(row)
    return out


def critic_script(conv, sampling, k):
    system = conv[0]["content"]
    if "Split the response" in system:
        return json.dumps({"claims": [conv[1]["content"].split("Response: ", 1)[1]]})
    if "check one claim" in system:
        supported = "blue" in conv[1]["content"].split("Claim: ", 1)[1]
        return json.dumps({"critique": "The evidence says blue.",
                           "verdict": "supported" if supported else "contradicted"})
    return "The sky is blue."


def candidate(cid: str, question: str, finish_reason: str = "stop", seed: str = "s") -> dict:
    return {"candidate_id": cid, "context_id": f"ctx-{cid}", "seed_id": seed, "finish_reason": finish_reason,
            "context": [{"role": "user", "content": question}], "reply": "" if finish_reason != "stop" else
            "The sky is green."}


class RevisionTooLong(ScriptedLM):
    """The scripted critic whose revision requests do not fit its window."""

    def _too_long(self, conversation, sampling) -> bool:
        return "Revise the response" in conversation[0]["content"]


def test_critique_requests_over_the_window_give_a_reason_per_claim_not_a_crash():
    rows = [candidate("ok", "What colour is the sky?", seed="plain"),
            candidate("long-q", LONG),  # the claims request itself does not fit
            candidate("long-doc", "What colour is the sky?", seed="doc"),  # its verdict request does not fit
            candidate("unsampled", LONG, finish_reason=PROMPT_TOO_LONG)]
    lm = ScriptedLM(critic_script, context_window=600)
    docs = {"doc": ["The sky is blue. " + "Evidence " * 500], "plain": ["The sky is blue."]}
    out = {r["candidate_id"]: r for r in ClaimCritic(rounds=1, max_evidence_tokens=10_000)(rows, lm, docs).to_pylist()}

    assert out["ok"]["rounds"][0]["claims"][0]["verdict"] == "contradicted"
    assert out["ok"]["final_response"] == "The sky is blue." and out["ok"]["final_score"] == 1.0
    first = out["long-q"]["rounds"][0]
    assert first["claims"] == [] and first["error"] == TOO_LONG and out["long-q"]["num_parse_failures"] == 1
    [claim] = out["long-doc"]["rounds"][0]["claims"]
    assert claim["verdict"] is None and claim["error"] == TOO_LONG and out["long-doc"]["initial_score"] is None
    never = out["unsampled"]
    assert never["num_calls"] == 0 and never["rounds"][0]["error"].startswith(PROMPT_TOO_LONG)

    revising = RevisionTooLong(critic_script)
    [row] = ClaimCritic(rounds=1)([rows[0]], revising, {"plain": docs["plain"]}).to_pylist()
    [claim] = row["rounds"][0]["claims"]
    assert claim["action"] == "fix" and claim["error"].startswith(f"revise: {TOO_LONG}")
    assert "green" not in row["final_response"]  # the flagged sentence is removed without the model


@pytest.mark.slow
def test_the_pipeline_on_the_engine_records_a_seed_over_the_window_and_publishes_the_rest(engine, tmp_path):
    from prefmill.flows.pipeline import pipeline_flow
    from prefmill.schemas.config import load_pipeline_config
    from prefmill.serving.hosts import LocalPool, ModelHost
    from prefmill.storage.catalog import Catalog

    long_question = "1234567890" * 500  # 5,000 digit tokens: over the engine's 4,096-token window alone
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps({"question": q}) for q in
                               ["Why is the sky blue?", long_question, "What do bees make?"]) + "\n")
    cfg = load_pipeline_config(None, [
        f'seeds.path="{seeds}"', "shard_size=3", "selfchat.max_turns=1", "selfchat.max_tokens_per_turn=32",
        "candidates.n=2", "candidates.max_tokens=32", "critiques.rounds=0", "critiques.top_k=1",
        "critiques.max_tokens=64", f'catalog="{tmp_path / "catalog"}"', f'result_storage="{tmp_path / "results"}"'])
    pool = LocalPool(ModelHost(preloaded={"smollm2-135m": engine}))
    result = pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))

    catalog = Catalog(cfg.catalog)
    conversations = {r["messages"][0]["content"]: r for r in catalog.read("conversations").to_pylist()}
    long = conversations.pop(long_question)
    assert long["ended_by"] == PROMPT_TOO_LONG and long["num_turns"] == 0
    assert all(r["num_turns"] == 1 and r["messages"][1]["content"] for r in conversations.values())
    candidates = catalog.read("candidates").to_pylist()
    never = [c for c in candidates if c["seed_id"] == long["seed_id"]]
    assert len(never) == 2 and all(c["finish_reason"] == PROMPT_TOO_LONG and c["reply"] == "" for c in never)
    assert sum(c["finish_reason"] != PROMPT_TOO_LONG for c in candidates) == 4
    rejects = [r for r in catalog.read("pair_rejects").to_pylist() if r["seed_id"] == long["seed_id"]]
    assert [r["reason"] for r in rejects] == [PROMPT_TOO_LONG]
    critiqued = {r["candidate_id"]: r for r in catalog.read("critiques").to_pylist()}
    assert all(critiqued[c["candidate_id"]]["num_calls"] == 0 for c in never if c["candidate_id"] in critiqued)
    assert catalog.read("rewards").num_rows == 4 and "pairs" in result.versions
