"""Self-chat and candidate prompt building and parsing, with a scripted model."""

from __future__ import annotations

import pytest

from prefmill.operators.candidates import CandidateSampler, contexts
from prefmill.operators.selfchat import SelfChat, parse_user_turn, simulator_prompt
from tests.fakes import ScriptedLM, StreamingScriptedLM

SEEDS = [{"seed_id": f"s{i}", "question": f"Question {i}?", "persona": "a tester"} for i in range(3)]


def is_simulator(conv) -> bool:
    return conv[0]["role"] == "system" and "You play the USER" in conv[0]["content"]


@pytest.mark.parametrize("raw, text, ended", [
    ("Thought: I want details.\nUser: Can you give an example?", "Can you give an example?", False),
    ("User: Tell me more.\nASSISTANT: Sure", "Tell me more.", False),
    ("**Thought:** still curious\n**User:** And why is that?", "And why is that?", False),
    ("Thought: done\nUser: [END]", None, True),
    ("Thought: only a thought", None, True),
    ("What about winter?", "What about winter?", False),
    ("", None, True),
])
def test_parse_user_turn_strips_the_thought(raw, text, ended):
    parsed = parse_user_turn(raw)
    assert (parsed.text, parsed.ended) == (text, ended)
    assert parsed.raw_output == raw


def test_simulator_prompt_has_persona_and_transcript():
    prompt = simulator_prompt("a retired sailor", [{"role": "user", "content": "Hi?"},
                                                    {"role": "assistant", "content": "Hello."}])
    assert "a retired sailor" in prompt[0]["content"]
    assert "USER: Hi?" in prompt[1]["content"] and "ASSISTANT: Hello." in prompt[1]["content"]


FOLLOW_UPS = ["Why is that so?", "How does it work in practice?", "Can you give an example?",
              "What are the exceptions?", "Where can I read more?"]


def script(conv, sampling, k):
    if is_simulator(conv):
        return f"Thought: I need more.\nUser: {FOLLOW_UPS[sampling.seed % 5]}"
    return "Because of reasons " * 3


def test_roles_alternate_and_turn_limit_holds():
    lm = ScriptedLM(script)
    table = SelfChat(max_turns=3)(SEEDS, lm)
    for row in table.to_pylist():
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * 3
        assert row["num_turns"] == 3 and row["ended_by"] == "max_turns"
        assert all("Thought" not in m["content"] for m in row["messages"])
    # every turn is one batched call per role, with all live conversations
    assert [n for n, _ in lm.calls] == [3, 3, 3, 3, 3]


def test_token_budget_holds():
    table = SelfChat(max_turns=5, token_budget=20, max_tokens_per_turn=8)(SEEDS, ScriptedLM(script))
    for row in table.to_pylist():
        assert row["num_tokens"] <= 20 and row["ended_by"] == "token_budget"
        assert row["messages"][-1]["role"] == "assistant"


def test_user_ending_stops_only_that_conversation():
    def ends_for_s0(conv, sampling, k):
        if is_simulator(conv):
            return "User: [END]" if "Question 0?" in conv[1]["content"] else f"User: {FOLLOW_UPS[sampling.seed % 5]}"
        return "An answer."
    table = SelfChat(max_turns=3)(SEEDS, ScriptedLM(ends_for_s0))
    rows = {r["seed_id"]: r for r in table.to_pylist()}
    assert rows["s0"]["ended_by"] == "user_ended" and rows["s0"]["num_turns"] == 1
    assert rows["s1"]["num_turns"] == 3


def test_simulator_and_assistant_may_be_different_models():
    assistant, simulator = ScriptedLM(script, "assistant-x"), ScriptedLM(script, "simulator-y")
    row = SelfChat(max_turns=2)(SEEDS[:1], assistant, simulator).to_pylist()[0]
    assert (row["assistant_model"], row["simulator_model"]) == ("assistant-x", "simulator-y")
    assert len(simulator.calls) == 1 and len(assistant.calls) == 2


def test_candidates_per_context_with_seeds_and_duplicates():
    conversations = SelfChat(max_turns=2)(SEEDS[:2], ScriptedLM(script))
    rows = contexts(conversations)
    assert len(rows) == 4 and all(r["context"][-1]["role"] == "user" for r in rows)
    assert len(contexts(conversations, "last")) == 2
    replies = ["same", "Same ", "other", "third"]
    table = CandidateSampler(n=4, seed=10)(rows, ScriptedLM(lambda c, s, k: replies[k]))
    assert table.num_rows == 16
    first = table.to_pylist()[:4]
    assert [r["is_duplicate"] for r in first] == [False, True, False, False]
    assert [r["sampling_seed"] for r in first] == [10, 11, 12, 13]
    assert len(set(table.column("candidate_id").to_pylist())) == 16
    again = CandidateSampler(n=4, seed=10)(rows, ScriptedLM(lambda c, s, k: replies[k]))
    assert again.column("candidate_id") == table.column("candidate_id")


def varied(conv, sampling, k):
    if is_simulator(conv):
        return "User: [END]" if "Question 1?" in conv[1]["content"] else f"User: Why {sampling.seed}?"
    return "Because " * (3 + sampling.seed) + f"sample {k}"


def test_the_streaming_driver_makes_the_same_conversations():
    waves = SelfChat(max_turns=3, token_budget=15)(SEEDS, ScriptedLM(varied))
    lm = StreamingScriptedLM(varied)
    streamed = SelfChat(max_turns=3, token_budget=15)(SEEDS, lm)
    assert streamed.to_pylist() == waves.to_pylist()
    assert all(n == 1 for n, _ in lm.calls)  # one conversation per request
    assert {r["ended_by"] for r in waves.to_pylist()} == {"user_ended", "token_budget"}


def test_ids_change_with_everything_that_shapes_the_rows():
    base = SelfChat(max_turns=2)(SEEDS[:1], ScriptedLM(script)).to_pylist()[0]["conversation_id"]
    other_model = SelfChat(max_turns=2)(SEEDS[:1], ScriptedLM(script, "other-model")).to_pylist()[0]
    other_config = SelfChat(max_turns=2, temperature=0.5)(SEEDS[:1], ScriptedLM(script)).to_pylist()[0]
    assert len({base, other_model["conversation_id"], other_config["conversation_id"]}) == 3
    rows = contexts(SelfChat(max_turns=1)(SEEDS[:1], ScriptedLM(script)), "last")
    ids = {CandidateSampler(n=1, max_tokens=m)(rows, ScriptedLM(script)).column("candidate_id")[0].as_py()
           for m in (16, 32)}
    assert len(ids) == 2
