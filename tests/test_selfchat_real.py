"""Self-chat and candidates on the real engine and the real embedded model."""

from __future__ import annotations

import pytest

from prefmill.operators.candidates import CandidateSampler, contexts
from prefmill.operators.rollout import Rollout
from prefmill.operators.seeds import load_seeds
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.tables import CANDIDATES, CONVERSATIONS
from prefmill.serving.protocols import Request, Sampling
from tests.fakes import ScriptedLM

# a simulated user whose thought and role label must be stripped (the tiny model's own may end a chat
# at once, so a test that needs a simulated turn cannot count on it)
SIMULATED = "Thought: I want one concrete example, because the answer stayed general.\n" \
            "**User:** What would a librarian in Zanzibar say about that?"


@pytest.fixture(scope="module")
def seeds():
    return load_seeds().seeds.to_pylist()[:4]


@pytest.fixture(scope="module")
def selfchat():
    return SelfChat(max_turns=2, token_budget=160, max_tokens_per_turn=48, simulator_max_tokens=48, seed=3)


@pytest.fixture(scope="module")
def conversations(engine, seeds, selfchat):
    return selfchat(seeds, engine)


def test_conversations_alternate_and_respect_limits(conversations, seeds):
    assert conversations.schema == CONVERSATIONS
    rows = conversations.to_pylist()
    assert [r["seed_id"] for r in rows] == [s["seed_id"] for s in seeds]
    for row, seed in zip(rows, seeds, strict=True):
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and row["messages"][0]["content"] == seed["question"]
        assert all(a != b for a, b in zip(roles, roles[1:])), roles
        assert roles[-1] == "assistant"
        assert 1 <= row["num_turns"] <= 2 and row["num_tokens"] <= 160
        assert row["ended_by"] in {"max_turns", "token_budget", "user_ended"} or row["ended_by"].startswith("gate:")
        assert all(m["content"].strip() for m in row["messages"])


@pytest.fixture(scope="module")
def with_simulated_turns(engine, seeds, selfchat):
    """Self-chat of the real assistant with a scripted simulator: every conversation gets a simulated turn."""
    return selfchat(seeds, engine, ScriptedLM(lambda conv, sampling, k: SIMULATED, name="scripted-user"))


def simulated_turns(table) -> list[str]:
    return [m["content"] for row in table.to_pylist() for m in row["messages"][1:] if m["role"] == "user"]


def test_the_justification_never_leaks_into_a_user_turn(conversations, with_simulated_turns, seeds):
    forced = with_simulated_turns.to_pylist()
    assert [r["num_turns"] for r in forced] == [2] * len(seeds), [r["ended_by"] for r in forced]
    assert simulated_turns(with_simulated_turns) == ["What would a librarian in Zanzibar say about that?"] * len(seeds)
    for text in simulated_turns(conversations):  # the real simulator's turns, if it wrote any
        assert "thought:" not in text.lower()
        assert not text.lower().startswith("user:")


def test_a_fixed_seed_reproduces_the_conversations(engine, seeds, selfchat, conversations):
    assert selfchat(seeds, engine).to_pylist() == conversations.to_pylist()


def test_a_tight_budget_ends_conversations_by_budget(engine, seeds):
    table = SelfChat(max_turns=4, token_budget=40, max_tokens_per_turn=32, seed=1)(seeds[:2], engine)
    assert table.num_rows == 2
    for row in table.to_pylist():
        assert row["num_tokens"] <= 40
        assert row["ended_by"] in {"token_budget", "user_ended"} or row["ended_by"].startswith("gate:")


def test_candidates_have_distinct_seeds_and_trace_to_seeds(engine, conversations):
    rows = contexts(conversations, "last")
    table = CandidateSampler(n=3, max_tokens=32, seed=5)(rows, engine)
    assert table.schema == CANDIDATES and table.num_rows == 3 * len(rows)
    by_context: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        by_context.setdefault(r["context_id"], []).append(r)
    seed_ids = set(conversations.column("seed_id").to_pylist())
    for group in by_context.values():
        assert [r["sampling_seed"] for r in group] == [5, 6, 7]
        assert group[0]["seed_id"] in seed_ids
        texts = [" ".join(r["reply"].split()).casefold() for r in group]
        assert [r["is_duplicate"] for r in group] == [t in texts[:k] for k, t in enumerate(texts)]
    assert sum(not r["is_duplicate"] for r in table.to_pylist()) > len(rows)


def test_stream_matches_chat_and_runs_follow_ups_in_the_same_batch(engine):
    first = Request("first", [{"role": "user", "content": "Name a colour."}], Sampling(n=2, max_tokens=16, seed=5))
    follow_up = Request("follow-up", [{"role": "user", "content": "Name a fruit."}],
                        Sampling(max_tokens=16, seed=6))
    others = [Request(f"other-{k}", [{"role": "user", "content": f"Count to {k}."}], Sampling(max_tokens=24, seed=k))
              for k in range(3)]
    got: dict[str, list] = {}

    def on_done(request, completions):
        got[request.key] = completions
        return [follow_up] if request.key == "first" else []
    engine.stream([first, *others], on_done)
    assert set(got) == {"first", "follow-up", *(r.key for r in others)}
    for request in [first, follow_up, *others]:
        assert got[request.key] == engine.chat([request.conversation], request.sampling)[0]
    assert len(got["first"]) == 2


def test_a_failing_callback_aborts_the_requests_in_flight(engine):
    requests = [Request(k, [{"role": "user", "content": f"Tell a story about {k}."}], Sampling(max_tokens=64, seed=1))
                for k in ("cats", "ships", "rain")]

    def on_done(request, completions):
        raise RuntimeError(f"callback failed on {request.key}")
    with pytest.raises(RuntimeError, match="callback failed"):
        engine.stream(requests, on_done)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert engine.chat([requests[0].conversation], Sampling(max_tokens=4, seed=1))[0][0].num_tokens > 0


def test_calling_the_engine_from_inside_its_stream_fails_clearly(engine):
    request = Request("a", [{"role": "user", "content": "Say hi."}], Sampling(max_tokens=8, seed=1))

    def on_done(request, completions):
        return engine.chat([request.conversation], request.sampling)  # would steal the stream's outputs
    with pytest.raises(RuntimeError, match=r"chat\(\) called while stream\(\) is running"):
        engine.stream([request, Request("b", request.conversation, Sampling(max_tokens=32, seed=2))], on_done)
    assert not engine.llm.llm_engine.has_unfinished_requests()
    assert engine.chat([request.conversation], request.sampling)[0][0].num_tokens > 0


def test_rollout_samples_the_last_contexts_alongside_self_chat(engine, seeds, selfchat):
    rollout = Rollout(selfchat, CandidateSampler(n=3, max_tokens=32, seed=5), "last")
    out = rollout(seeds, engine)
    assert out.conversations.schema == CONVERSATIONS and out.candidates.schema == CANDIDATES
    rows = contexts(out.conversations, "last")
    assert out.candidates.column("context_id").to_pylist() == [r["context_id"] for r in rows for _ in range(3)]
    assert out.candidates.column("sampling_seed").to_pylist() == [5, 6, 7] * len(rows)
    for candidate in out.candidates.to_pylist():
        assert candidate["context"][-1]["role"] == "user" and candidate["reply"].strip()
    again = rollout(seeds, engine)
    assert again.conversations.to_pylist() == out.conversations.to_pylist()
    assert again.candidates.to_pylist() == out.candidates.to_pylist()
