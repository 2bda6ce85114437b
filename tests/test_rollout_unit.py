"""Self-chat and candidates as one request stream, with scripted models: same rows as the two stages run
one after the other, and candidates asked for as soon as their context is known."""

from __future__ import annotations

import pytest

from prefmill.operators.candidates import CandidateSampler, contexts
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.operators.streams import run_requests
from prefmill.serving.protocols import Request, Sampling
from tests.fakes import ScriptedLM, StreamingScriptedLM
from tests.test_selfchat_unit import SEEDS, varied

SELFCHAT = SelfChat(max_turns=3, token_budget=30)
SAMPLER = CandidateSampler(n=3, seed=7)


def staged(which: str):
    lm = ScriptedLM(varied)
    conversations = SELFCHAT(SEEDS, lm)
    return conversations, SAMPLER(contexts(conversations, which), lm)


@pytest.mark.parametrize("which", ["last", "all"])
@pytest.mark.parametrize("model", [ScriptedLM, StreamingScriptedLM])
def test_rollout_equals_selfchat_then_candidates(which, model):
    conversations, candidates = staged(which)
    out = Rollout(SELFCHAT, SAMPLER, which)(SEEDS, model(varied))
    assert out.conversations.to_pylist() == conversations.to_pylist()
    assert out.candidates.to_pylist() == candidates.to_pylist()
    assert candidates.num_rows == 3 * len(contexts(conversations, which)) > 0


def test_last_context_candidates_start_with_the_final_assistant_turn():
    lm = StreamingScriptedLM(varied)
    out = Rollout(SELFCHAT, SAMPLER, "last")(SEEDS, lm)
    finals = [(i, row["num_turns"] - 1) for i, row in enumerate(out.conversations.to_pylist())
              if row["ended_by"] == "max_turns"]
    assert finals, "the script must let some conversation reach max_turns"
    for i, turn in finals:
        [candidates] = [k for k in lm.events if k[0] == "add" and k[1][:2] == ("candidates", i)]
        assert lm.events.index(candidates) < lm.events.index(("done", ("assistant", i, turn)))


def test_rollout_with_a_separate_simulator_uses_each_model_for_its_role():
    assistant, simulator = ScriptedLM(varied, "assistant-model"), ScriptedLM(varied, "simulator-model")
    out = Rollout(SELFCHAT, SAMPLER)(SEEDS, assistant, simulator)
    assert set(out.candidates.column("model").to_pylist()) == {"assistant-model"}
    assert {s.n for _, s in simulator.calls} == {1} and 3 in {s.n for _, s in assistant.calls}
    row = out.conversations.to_pylist()[0]
    assert (row["assistant_model"], row["simulator_model"]) == ("assistant-model", "simulator-model")


def test_rollout_rejects_an_unknown_context_choice():
    with pytest.raises(ValueError, match="'every'"):
        Rollout(contexts="every")


def test_a_request_for_an_unknown_model_names_it():
    lm = StreamingScriptedLM(varied)
    with pytest.raises(KeyError, match="'judge'"):
        run_requests({"default": lm}, [Request("k", [{"role": "user", "content": "hi"}], Sampling(), "judge")],
                     lambda r, c: [])
    follow_up = Request("k2", [{"role": "user", "content": "hi"}], Sampling(), "judge")
    with pytest.raises(KeyError, match="'judge'"):
        run_requests({"default": lm}, [Request("k", [{"role": "user", "content": "hi"}], Sampling(seed=1))],
                     lambda r, c: [follow_up] if r.key == "k" else [])


def test_the_flow_rollout_stage_on_a_host_streams_when_assistant_and_simulator_are_one_model():
    """Regression: each `chat_model` call of a host session returned a new wrapper, so the stage's
    assistant and simulator looked like two models and the rollout fell back from one stream to waves."""
    import pyarrow as pa

    from prefmill.flows.stages.rollout import RolloutStage
    from prefmill.serving.hosts import ModelHost, run_step

    lm = StreamingScriptedLM(varied, name="m")
    run = run_step(RolloutStage(Rollout(SELFCHAT, SAMPLER), "m", "m"), {"seeds": pa.Table.from_pylist(SEEDS)},
                   ModelHost(preloaded={"m": lm}))
    assert any(kind == "add" for kind, _ in lm.events), "the rollout did not use the model's stream"
    assert run.requests == len([e for e in lm.events if e[0] == "done"]) > 0
