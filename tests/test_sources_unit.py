"""The gold-anchored pair sources (IRPO, Step-DPO, SPIN) and their verifier, each branch forced by a scripted
model. The same sources on the real model: tests/test_sources_real.py."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from prefmill.flows.stages import build_stages, seed_quarantine
from prefmill.operators.reasoning import IRPOPairs, SolutionSampler
from prefmill.operators.seeds import SeedFileError, load_seeds
from prefmill.operators.spin import SelfPlay
from prefmill.operators.steps import RECTIFY_SEED_OFFSET, StepDPO, judged_step, split_steps
from prefmill.operators.verify import final_answer, verify
from prefmill.schemas.config import PipelineConfig
from prefmill.schemas.tables import SEEDS
from tests.fakes import ScriptedLM

RIGHT = ["Step 1: 20 + 30 = 50", "Step 2: 3 + 4 = 7", "Step 3: 50 + 7 = 57", "Final answer: 57"]
WRONG = ["Step 1: 20 + 30 = 50", "Step 2: 3 + 4 = 8", "Step 3: 50 + 8 = 58", "Final answer: 58"]


def seed(question="What is 23 + 34?", final="57", answer_type="numeric", **extra) -> dict:
    return {"seed_id": f"seed-{question}", "question": question, "final_answer": final, "answer_type": answer_type,
            "source": "test:1", **extra}


def by_index(*texts: str):
    """A script that answers sample k of every request with texts[k]."""
    return ScriptedLM(lambda conv, sampling, k: texts[k % len(texts)])


# ---- the verifier -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,gold,answer_type,correct", [
    ("$\\frac{1}{2}$", "0.5", "math", True),
    ("1/2", "\\frac{1}{2}", "math", True),
    ("{1, 2}", "\\{2, 1\\}", "math", True),
    ("(1, 2]", "(1,2]", "math", True),
    ("x = 3", "3", "math", True),
    ("7", "8", "math", False),
    ("1,234.5 dollars", "1234.5", "numeric", True),
    ("12 + 30 = 43", "42", "numeric", False),
    ("(B) Paris", "B", "choice", True),
    ("The answer is C", "B", "choice", False),
    ("Paris.", "paris", "exact", True),
    ("Lyon", "paris", "exact", False),
])
def test_the_verifier_checks_each_answer_type(answer, gold, answer_type, correct):
    verdict = verify(f"Some reasoning.\nFinal answer: {answer}", gold, answer_type)
    assert (verdict.answer, verdict.is_correct) == (answer, correct)


def test_the_final_answer_is_the_last_final_line_else_the_last_line():
    assert final_answer("Final answer: 3\nwait\nFinal answer: 4\nthanks") == "4"
    assert final_answer("12 + 30 = 42\n\n") == "12 + 30 = 42"
    assert verify("12 + 30 = 42", "42", "numeric").is_correct is True
    assert final_answer("  \n") is None
    assert verify("", "42", "numeric").is_correct is None
    assert verify("12 + 30 = 42\nFinal answer:", "42", "numeric").answer is None  # an empty final line
    cut = verify("Let me add 12 and 30, which is", "42", "numeric", truncated=True)
    assert cut.is_correct is None and "max_tokens" in cut.reason


@pytest.mark.parametrize("answer,gold,answer_type", [
    ("5/0", "0", "numeric"), ("1e400", "1e401", "numeric"), ("A careful count gives C", "A", "choice"),
    ("I think it is B", "B", "choice"), ("9^{9^{9^{9}}}", "5", "math"), ("2^{2^{30}}", "5", "math")])
def test_answers_that_would_be_misread_or_never_finish_are_not_graded(answer, gold, answer_type):
    assert verify(f"Final answer: {answer}", gold, answer_type).is_correct is None


@pytest.mark.parametrize("answer,gold", [("1/2", "0.5"), ("42 (since 6*7)", "42"), ("1,2,3", "1")])
def test_a_numeric_answer_is_the_first_number_after_its_last_equals_sign(answer, gold):
    assert verify(f"Final answer: {answer}", gold, "numeric").is_correct is True
    assert verify(f"Final answer: {answer}", "123" if gold == "1" else "2", "numeric").is_correct is False


def test_an_answer_that_does_not_parse_has_no_verdict():
    verdict = verify("Final answer: a lot", "42", "numeric")
    assert verdict.is_correct is None and "does not parse" in verdict.reason


# ---- seeds ------------------------------------------------------------------------------------------------

def test_seeds_bring_a_final_answer_and_a_bad_one_is_quarantined_with_its_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    rows = [{"question": "2+3?", "final_answer": 5},
            {"question": "q2", "final_answer": "lots", "answer_type": "numeric"},
            {"question": "q3", "final_answer": "B", "answer_type": "choice", "gold_solution": "B because"},
            {"question": "q4", "final_answer": "x", "answer_type": "essay"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    loaded = load_seeds(path)
    assert loaded.seeds.select(["final_answer", "answer_type", "gold_solution"]).to_pylist() == [
        {"final_answer": "5", "answer_type": "math", "gold_solution": None},
        {"final_answer": "B", "answer_type": "choice", "gold_solution": "B because"}]
    reasons = {q["source"].rsplit(":", 1)[1]: q["reason"] for q in loaded.quarantine.to_pylist()}
    assert "'final_answer'" in reasons["2"] and "numeric" in reasons["2"]
    assert "'answer_type'" in reasons["4"] and "essay" in reasons["4"]


def irpo_config(**sources) -> PipelineConfig:
    return PipelineConfig(sources={"selfchat": False, "irpo": True, **sources})


def test_a_source_no_seed_can_feed_fails_before_any_model_and_names_the_field():
    seeds = pa.Table.from_pylist([{"seed_id": "s", "question": "q", "source": "f:1"}], schema=SEEDS)
    with pytest.raises(SeedFileError, match="final_answer.*sources.irpo"):
        seed_quarantine(build_stages(irpo_config()), seeds)


def test_a_seed_without_the_field_is_quarantined_for_that_stage_only():
    seeds = pa.Table.from_pylist([seed(), {"seed_id": "s2", "question": "q", "source": "f:2"}], schema=SEEDS)
    stages = build_stages(irpo_config())
    rows = seed_quarantine(stages, seeds).to_pylist()
    assert [(r["stage"], r["source"]) for r in rows] == [("irpo", "f:2")]
    assert "final_answer" in rows[0]["reason"]


def test_step_dpo_without_irpo_is_a_config_error():
    with pytest.raises(ValueError, match="step_dpo needs sources.irpo"):
        PipelineConfig(sources={"step_dpo": True})


# ---- IRPO -------------------------------------------------------------------------------------------------

def solutions(*texts: str, question: str = "What is 23 + 34?"):
    return SolutionSampler(samples=len(texts))([seed(question)], by_index(*texts))


def test_irpo_pairs_a_correct_solution_with_a_wrong_one_and_keeps_every_verdict():
    table = solutions("\n".join(RIGHT), "\n".join(WRONG), "I am not sure.\nFinal answer: many",
                      "Final answer: 57", "Final answer: 60")
    rows = table.to_pylist()
    assert [r["is_correct"] for r in rows] == [True, False, None, True, False]
    assert all(r["verify_reason"] for r in rows)
    out = IRPOPairs(max_pairs=4)(table)
    pairs = out.pairs.to_pylist()
    assert len(pairs) == 2 and {p["pass_rate"] for p in pairs} == {0.4}
    for p in pairs:
        assert verify(p["chosen"][0]["content"], "57", "numeric").is_correct
        assert verify(p["rejected"][0]["content"], "57", "numeric").is_correct is False
    sides = [p["chosen_candidate_id"] for p in pairs] + [p["rejected_candidate_id"] for p in pairs]
    assert len(set(sides)) == 4  # each solution in one pair at most
    assert out.rejects.column("reason").to_pylist() == ["no_answer"]


@pytest.mark.parametrize("texts,reason", [(("Final answer: 57", "57"), "all_correct"),
                                          (("Final answer: 56", "55"), "all_wrong"),
                                          (("", "Final answer: dunno"), "no_answer")])
def test_a_question_without_both_kinds_gives_a_reject_row(texts, reason):
    out = IRPOPairs()(solutions(*texts))
    assert out.pairs.num_rows == 0
    assert reason in out.rejects.column("reason").to_pylist()


def test_irpo_caps_pairs_per_question_and_reports_repeated_solutions():
    table = solutions("Final answer: 57", "Final answer: 57", "57", "Final answer: 1", "Final answer: 2", "3")
    out = IRPOPairs(max_pairs=2)(table)
    assert out.pairs.num_rows == 2
    assert out.rejects.column("reason").to_pylist() == ["duplicate_solution"]


# ---- Step-DPO ---------------------------------------------------------------------------------------------

def stepwise(rectify_ok: bool = True, judge_answer: str | None = None):
    """A model that continues a step prefix correctly unless the prefix holds the wrong step 2; with
    `rectify_ok` False, rectification samples (their own seeds) go wrong too."""
    def script(conv, sampling, k):
        if conv[-1]["role"] != "assistant":
            return judge_answer if judge_answer is not None else "\n".join(RIGHT if k == 0 else WRONG)
        done = split_steps(conv[-1]["content"])
        bad = any("= 8" in step for step in done) or (not rectify_ok and sampling.seed == RECTIFY_SEED_OFFSET)
        return "\n" + "\n".join((WRONG if bad else RIGHT)[len(done):])
    return ScriptedLM(script)


def step_input(lm):
    sols = SolutionSampler(samples=2)([seed()], lm)
    return [seed(gold_solution="20 + 30 = 50, 3 + 4 = 7, so 57.")], sols


def test_rollouts_find_the_second_step_and_rectify_it():
    lm = stepwise()
    seeds, sols = step_input(lm)
    out = StepDPO(rollouts=2, rectify_samples=2)(seeds, sols, lm)
    [pair] = out.pairs.to_pylist()
    assert pair["step_index"] == 2 and pair["step_locator"] == "rollouts"
    assert pair["step_success_rates"] == [1.0, 0.0, 0.0]  # every prefix in the budget, in one batch
    assert pair["prompt"][-1] == {"role": "assistant", "content": RIGHT[0]}
    assert pair["chosen"][0]["content"] == RIGHT[1] and pair["rejected"][0]["content"] == WRONG[1]
    assert pair["chosen_solution"] == "\n".join(RIGHT) and pair["rejected_solution"] == "\n".join(WRONG)
    assert pair["pass_rate"] == 0.5 and out.rejects.num_rows == 0


def test_a_continuation_that_starts_on_the_prefix_line_still_continues_on_the_next_one():
    base = stepwise()
    lm = ScriptedLM(lambda conv, s, k: base.script(conv, s, k).lstrip("\n"))
    seeds, sols = step_input(lm)
    [pair] = StepDPO(rollouts=2, rectify_samples=2)(seeds, sols, lm).pairs.to_pylist()
    assert pair["chosen_solution"] == "\n".join(RIGHT) and pair["step_index"] == 2


def test_repeated_wrong_solutions_are_probed_once():
    lm = stepwise()
    sols = SolutionSampler(samples=3)([seed()], by_index("\n".join(RIGHT), "\n".join(WRONG), "\n".join(WRONG)))
    out = StepDPO(rollouts=2, rectify_samples=2, solutions_per_question=3)([seed()], sols, lm)
    assert out.pairs.num_rows == 1


def test_a_rectification_that_never_verifies_is_a_reject_row():
    lm = stepwise(rectify_ok=False)
    seeds, sols = step_input(lm)
    out = StepDPO(rollouts=2, rectify_samples=2)(seeds, sols, lm)
    assert out.pairs.num_rows == 0
    assert out.rejects.column("reason").to_pylist() == ["rectify_failed"]


def test_the_rollout_budget_caps_the_probes_and_says_so():
    lm = stepwise()
    seeds, sols = step_input(lm)
    out = StepDPO(rollouts=2, max_rollouts=2)(seeds, sols, lm)  # one prefix probed: step 1, which succeeds
    assert out.rejects.column("reason").to_pylist() == ["budget_exhausted"]
    assert lm.calls[-1][0] == 1  # one probe request


def test_a_question_no_sample_solved_has_no_step_to_blame():
    lm = by_index("\n".join(WRONG), "Final answer: 12")
    out = StepDPO()([seed()], SolutionSampler(samples=2)([seed()], lm), lm)
    assert set(out.rejects.column("reason").to_pylist()) == {"unsolved"}


def test_the_judge_locates_the_step_from_the_gold_solution_and_falls_back_to_rollouts():
    lm = stepwise()
    seeds, sols = step_input(lm)
    judged = StepDPO(locator="judge", rollouts=2, rectify_samples=2)(seeds, sols, lm, stepwise(judge_answer="2"))
    assert judged.pairs.column("step_locator").to_pylist() == ["judge"]
    assert judged.pairs.column("step_success_rates").to_pylist() == [[]]
    fallback = StepDPO(locator="judge", rollouts=2, rectify_samples=2)(seeds, sols, lm,
                                                                        stepwise(judge_answer="no idea"))
    assert fallback.pairs.column("step_locator").to_pylist() == ["rollouts"]
    assert judged_step("Step 9", 4) is None and judged_step("3.", 4) == 3


# ---- SPIN -------------------------------------------------------------------------------------------------

def test_spin_chooses_the_gold_answer_over_the_policy_and_rejects_a_gold_equal_sample():
    seeds = [seed("Capital of France?", reference_answer="Paris is the capital of France."),
             seed("Boiling point of water?", reference_answer="100 °C at sea level.")]
    lm = ScriptedLM(lambda conv, s, k: "paris is the capital of france" if "France" in conv[0]["content"]
                    else "It boils at 90 degrees.")
    out = SelfPlay()(seeds, lm)
    [pair] = out.pairs.to_pylist()
    assert pair["chosen"][0]["content"] == "100 °C at sea level."
    assert pair["rejected"][0]["content"] == "It boils at 90 degrees."
    assert pair["prompt"] == [{"role": "user", "content": "Boiling point of water?"}]
    assert out.rejects.column("reason").to_pylist() == ["gold_equal"]
    assert lm.calls[0][1].temperature == 1.0


def test_spin_rejects_an_empty_or_truncated_reply():
    seeds = [seed("Q one?", reference_answer="Gold one."), seed("Q two?", reference_answer="Gold two.")]
    lm = ScriptedLM(lambda conv, s, k: "" if "one" in conv[0]["content"] else "a b c d e f")
    out = SelfPlay(max_tokens=3)(seeds, lm)
    assert out.pairs.num_rows == 0
    assert out.rejects.column("reason").to_pylist() == ["empty_reply", "truncated"]


def test_spin_rounds_on_one_question_are_not_duplicates_but_a_repeated_own_reply_is():
    from prefmill.operators.dedup import dedup_key, reply_text

    def spin(reply: str) -> dict:
        return {"source": "spin", "prompt": [{"role": "user", "content": "Q?"}],
                "chosen": [{"role": "assistant", "content": "Gold."}],
                "rejected": [{"role": "assistant", "content": reply}]}
    assert dedup_key(spin("round 0 reply")) != dedup_key(spin("round 1 reply"))
    assert dedup_key(spin("same")) == dedup_key(spin("same")) and reply_text(spin("mine")) == "mine"


def test_a_step_pair_is_compared_with_its_steps_so_far():
    from prefmill.operators.dedup import reply_text

    pair = {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": RIGHT[0]}],
            "chosen": [{"role": "assistant", "content": RIGHT[1]}], "source": "step_dpo"}
    assert reply_text(pair) == f"{RIGHT[0]}\n{RIGHT[1]}"


def test_the_trl_export_moves_a_step_prefix_into_both_replies_and_trl_renders_one_assistant_turn(model_path):
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template

    from prefmill.flows.training import continued_prompts
    from prefmill.schemas.tables import PAIRS

    prompt = [{"role": "user", "content": "What is 23 + 34?"}, {"role": "assistant", "content": RIGHT[0]}]
    table = pa.Table.from_pylist([{"prompt": prompt, "chosen": [{"role": "assistant", "content": RIGHT[1]}],
                                   "rejected": [{"role": "assistant", "content": WRONG[1]}]}], schema=PAIRS)
    row = continued_prompts(table.select(["prompt", "chosen", "rejected"])).to_pylist()[0]
    assert row["prompt"] == prompt[:1]
    assert row["chosen"][0]["content"] == f"{RIGHT[0]}\n{RIGHT[1]}"
    rendered = apply_chat_template(row, AutoTokenizer.from_pretrained(model_path))
    assert rendered["chosen"].count("<|im_start|>assistant") == 0  # one turn, opened by the prompt
    assert rendered["chosen"].startswith(f"{RIGHT[0]}\n{RIGHT[1]}")
