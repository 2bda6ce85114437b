"""The async engine: per-conversation requests in vLLM's continuous batch, and self-chat on it."""

from __future__ import annotations

import asyncio

import pytest

from prefmill.operators.seeds import load_seeds
from prefmill.operators.selfchat import SelfChat
from prefmill.serving.protocols import Request, Sampling

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def async_engine(model_path):
    from prefmill.serving.async_engine import AsyncVLLMEngine

    engine = AsyncVLLMEngine()
    yield engine
    engine.close()


def test_single_requests_match_the_sync_engine(async_engine, engine):
    conversation = [{"role": "user", "content": "Name one planet. Answer in one or two words."}]
    sampling = Sampling(n=4, seed=9, max_tokens=40, temperature=1.0)
    replies = asyncio.run(async_engine.achat(conversation, sampling))
    assert len(replies) == 4 and len({r.num_tokens for r in replies}) > 1  # samples that end at different steps
    assert replies == engine.chat([conversation], sampling)[0]
    continuation = {"role": "assistant", "content": "Mars."}
    assert async_engine.score([conversation], [continuation])[0] == pytest.approx(
        engine.score([conversation], [continuation])[0], abs=1e-4)


def test_chat_keeps_input_order(async_engine):
    conversations = [[{"role": "user", "content": f"Repeat exactly: item{i}"}] for i in range(5)]
    sampling = Sampling(seed=1, max_tokens=8, temperature=0.0)
    together = async_engine.chat(conversations, sampling)
    assert together == [async_engine.chat([c], sampling)[0] for c in conversations]


def test_selfchat_on_the_async_engine_keeps_its_limits(async_engine):
    seeds = load_seeds().seeds.to_pylist()[:4]
    table = SelfChat(max_turns=3, token_budget=120, max_tokens_per_turn=40, simulator_max_tokens=40)(seeds,
                                                                                                     async_engine)
    for row in table.to_pylist():
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert row["num_tokens"] <= 120 and 1 <= row["num_turns"] <= 3
        assert all("thought:" not in m["content"].lower() for m in row["messages"][1:] if m["role"] == "user")


def test_chat_and_stream_work_inside_a_running_event_loop(async_engine):
    """A Prefect async task or a notebook calls the synchronous methods with its own loop running."""
    conversation = [{"role": "user", "content": "Repeat exactly: inside"}]
    sampling = Sampling(seed=3, max_tokens=8, temperature=0.0)
    expected = async_engine.chat([conversation], sampling)
    streamed: dict[str, list] = {}

    def on_done(request, completions):
        streamed[request.key] = completions
        return []

    async def inside_a_loop():
        replies = async_engine.chat([conversation], sampling)
        async_engine.stream([Request("one", conversation, sampling)], on_done)
        return replies
    assert asyncio.run(inside_a_loop()) == expected
    assert streamed == {"one": expected[0]}


def test_a_call_from_on_done_fails_clearly_and_the_engine_goes_on(async_engine):
    conversation = [{"role": "user", "content": "Say hi."}]
    sampling = Sampling(seed=3, max_tokens=4, temperature=0.0)

    def on_done(request, completions):
        async_engine.chat([conversation], sampling)
        return []
    with pytest.raises(RuntimeError, match="on_done"):
        async_engine.stream([Request(k, conversation, sampling) for k in range(3)], on_done)
    assert len(async_engine.chat([conversation], sampling)[0]) == 1


def test_count_tokens_is_the_tokenizers_count_without_special_tokens(async_engine):
    texts = ["The Berlin Wall fell in 1989.", "naïve café 東京", ""]
    expected = [len(async_engine.tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    assert async_engine.count_tokens(texts) == expected and async_engine.count_tokens([]) == []
    assert all(n <= len(t.encode()) for n, t in zip(expected, texts))  # the operators' fallback bounds it
