"""Self-chat and candidate quality gates, forced with a scripted model."""

from __future__ import annotations

import pytest

from prefmill.operators.gates import containment, reply_gate, user_turn_gate
from prefmill.operators.selfchat import RESAMPLE_SEED_STEP, SelfChat
from tests.fakes import ScriptedLM, StreamingScriptedLM

ANSWER = ("The sky looks blue because air molecules scatter short blue wavelengths of sunlight much more "
          "strongly than the longer red ones, which is called Rayleigh scattering.")
SEEDS = [{"seed_id": "s0", "question": "Why is the sky blue?", "persona": "a student"}]


def is_simulator(conv) -> bool:
    return conv[0]["role"] == "system" and "You play the USER" in conv[0]["content"]


def simulator_says(first: str, resampled: str = "How does sunset colour differ then?"):
    """A script whose simulated user says `first`, and `resampled` when asked again with another seed."""
    def script(conv, sampling, k):
        if is_simulator(conv):
            return f"User: {resampled if sampling.seed >= RESAMPLE_SEED_STEP else first}"
        return ANSWER
    return script


BAD_TURNS = {
    "echoes_assistant": "Air molecules scatter short blue wavelengths of sunlight much more strongly than red ones.",
    "repeats_user": "Why is the sky blue?",
    "narrates": "The user explains that they already know about scattering.",
    "empty": "   ",
}


@pytest.mark.parametrize("gate, text", BAD_TURNS.items())
def test_a_bad_user_turn_is_resampled_once_with_another_seed(gate, text):
    lm = ScriptedLM(simulator_says(text))
    row = SelfChat(max_turns=2)(SEEDS, lm).to_pylist()[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant", "user", "assistant"]
    assert row["messages"][2]["content"] == "How does sunset colour differ then?"
    assert row["gates"] == [{"turn": 0, "gate": gate, "action": "resample", "text": text.strip() or f"User: {text}"}]
    seeds = [s.seed for _, s in lm.calls]
    assert seeds[2] == seeds[1] + RESAMPLE_SEED_STEP  # the resample is the call right after the bad turn
    assert row["ended_by"] == "max_turns"


@pytest.mark.parametrize("gate, text", BAD_TURNS.items())
def test_a_turn_that_fails_twice_ends_the_conversation_there(gate, text):
    row = SelfChat(max_turns=3)(SEEDS, ScriptedLM(simulator_says(text, resampled=text))).to_pylist()[0]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
    assert row["ended_by"] == f"gate:{gate}"
    assert [(g["gate"], g["action"]) for g in row["gates"]] == [(gate, "resample"), (gate, "end")]


def test_gates_run_the_same_on_the_streaming_driver():
    script = simulator_says(BAD_TURNS["echoes_assistant"])
    waves = SelfChat(max_turns=3)(SEEDS, ScriptedLM(script))
    assert SelfChat(max_turns=3)(SEEDS, StreamingScriptedLM(script)).to_pylist() == waves.to_pylist()


def test_gates_can_be_switched_off():
    row = SelfChat(max_turns=2, gates=False)(SEEDS, ScriptedLM(simulator_says("Why is the sky blue?"))).to_pylist()[0]
    assert row["messages"][2]["content"] == "Why is the sky blue?" and row["gates"] == []


def test_a_short_question_sharing_words_with_the_answer_passes():
    messages = [{"role": "user", "content": "What is photosynthesis?"},
                {"role": "assistant", "content": "Photosynthesis is how plants turn light into sugar."}]
    assert user_turn_gate("What is chlorophyll for?", messages) is None
    assert user_turn_gate("Is photosynthesis fast?", messages) is None
    assert user_turn_gate("What is photosynthesis?", messages) == "repeats_user"


def test_containment_counts_copied_phrases():
    assert containment("a b c d", "x a b c d y") == 1.0
    assert containment("a b c d", "d c b a") == 0.0
    assert containment("hi", "hi") == 0.0  # no trigram: the word-equality rule covers short turns


def test_reply_gate_rejects_an_echo_of_the_question_and_empty_replies():
    context = [{"role": "user", "content": "How do vaccines train the immune system?"}]
    assert reply_gate("How do vaccines train the immune system?", context) == "echoes_user"
    assert reply_gate("  ", context) == "empty_reply"
    assert reply_gate("They show it a harmless piece of the germ, so it learns to recognise it.", context) is None
