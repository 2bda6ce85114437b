"""The rubric judge, its place in pair mining and `prefmill evaluate`'s arithmetic, on scripted models: every
branch forced (an output that does not parse, a score out of range, a rubric file and its bad key, a judge
weight that changes the chosen reply, a reply with no judge score), none left to a model."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from rich.console import Console

from prefmill.flows.cli import agreement_table
from prefmill.flows.evaluate import (
    LabelledFileError,
    LabelledPair,
    agreement,
    candidates,
    load_labelled,
    outcomes,
    report,
    score_parts,
    wilson,
)
from prefmill.flows.stages.judge import JudgeStage
from prefmill.operators.judge import (
    DEFAULT_RUBRICS,
    JUDGE_SCHEMA,
    RubricFileError,
    RubricJudge,
    judge_scores,
    load_rubrics,
)
from prefmill.operators.pairs import PairMiner
from prefmill.schemas.config import ConfigError, load_pipeline_config
from prefmill.schemas.tables import CANDIDATES, JUDGEMENTS, REWARDS
from prefmill.serving.protocols import PROMPT_TOO_LONG, Completion

QUESTION = [{"role": "user", "content": "How do vaccines train the immune system?"}]


class ScriptedJudge:
    """Answers each judge prompt with the text `answer(reply, aspect)` gives, and records the requests."""

    name = "judge-m"

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def chat(self, prompts, sampling):
        self.calls.append((len(prompts), sampling))
        out = []
        for prompt in prompts:
            task = prompt[-1]["content"]
            reply = task.split("###Response to evaluate:\n", 1)[1].split("\n", 1)[0]
            aspect = next(a for a, r in DEFAULT_RUBRICS.items() if r.criteria in task)
            out.append([Completion(self.answer(reply, aspect), 10, "stop")])
        return out


def cand(k: int, reply: str, context: str = "ctx-a", finish: str = "stop") -> dict:
    return {"candidate_id": f"{context}-c{k}", "context_id": context, "conversation_id": f"conv-{context}",
            "seed_id": "seed-a", "context": QUESTION, "reply": reply, "sample_index": k, "sampling_seed": k,
            "num_tokens": 5, "finish_reason": finish, "is_duplicate": False, "model": "policy-m", "is_teacher": False}


def verdict(score, feedback="fine") -> str:
    return json.dumps({"feedback": feedback, "score": score})


def test_unparsed_and_out_of_range_outputs_are_null_scores_with_raw_output_and_reason_in_one_batched_call():
    answers = {"good": verdict(4), "garbled": "I think it is a 4", "wild": verdict(7)}
    lm = ScriptedJudge(lambda reply, aspect: answers[reply])
    rows = [cand(0, "good"), cand(1, "garbled"), cand(2, "wild"), cand(3, "", finish=PROMPT_TOO_LONG)]
    table = RubricJudge(load_rubrics(None))(rows, lm, {"seed-a": "Vaccines show the body an antigen."})
    assert table.schema == JUDGEMENTS and table.num_rows == 4 * 3  # one row per candidate × aspect
    assert len(lm.calls) == 1 and lm.calls[0][0] == 3 * 3  # one call; the never-sampled one is not sent
    assert lm.calls[0][1].json_schema == JUDGE_SCHEMA and lm.calls[0][1].temperature == 0.0
    by = {(r["candidate_id"], r["aspect"]): r for r in table.to_pylist()}
    good, garbled = by[("ctx-a-c0", "honesty")], by[("ctx-a-c1", "honesty")]
    assert good["score"] == 4 and good["feedback"] == "fine" and good["error"] is None and good["used_reference"]
    assert garbled["score"] is None and garbled["raw_output"] == "I think it is a 4" and "JSON" in garbled["error"]
    wild = by[("ctx-a-c2", "helpfulness")]
    assert wild["score"] is None and wild["raw_output"] == verdict(7) and "bad value for 'score'" in wild["error"]
    never = by[("ctx-a-c3", "harmlessness")]
    assert never["score"] is None and PROMPT_TOO_LONG in never["error"]
    scores = judge_scores(table)
    assert scores["ctx-a-c0"] == (4.0, None)
    assert scores["ctx-a-c2"][0] is None and "helpfulness" in scores["ctx-a-c2"][1]


def test_the_reference_answer_is_shown_only_for_the_seed_question_alone():
    lm = ScriptedJudge(lambda reply, aspect: verdict(3))
    later = {**cand(0, "ok"), "context": QUESTION + [{"role": "assistant", "content": "Hi"},
                                                     {"role": "user", "content": "And boosters?"}]}
    judge = RubricJudge(load_rubrics(None), aspects=("honesty",))
    assert judge([later], lm, {"seed-a": "REF"}).column("used_reference").to_pylist() == [False]
    assert judge([cand(0, "ok")], lm, {"seed-a": "REF"}).column("used_reference").to_pylist() == [True]
    prompt = judge.prompt(cand(0, "ok"), "honesty", {"seed-a": "REF"})[-1]["content"]
    assert "###Reference Answer (Score 5):\nREF" in prompt


def test_a_rubric_file_overrides_and_adds_rubrics_and_a_bad_key_names_the_file_and_key(tmp_path):
    rubric = {"criteria": "Is it brief?", **{f"score{k}_description": f"level {k}" for k in range(1, 6)}}
    good = tmp_path / "rubrics.toml"
    good.write_text("[helpfulness]\n" + "".join(f'{k} = "{v}"\n' for k, v in rubric.items()))
    assert load_rubrics(good)["helpfulness"].criteria == "Is it brief?"
    assert load_rubrics(good)["honesty"] == DEFAULT_RUBRICS["honesty"]
    cfg = load_pipeline_config(None, ["judge.enabled=true", f"judge.rubric_file={good}", "judge.aspects=['honesty']"])
    stage = JudgeStage.from_config(cfg)
    assert stage.judge.rubrics["helpfulness"].criteria == "Is it brief?" and list(stage.judge.aspects) == ["honesty"]
    assert JudgeStage.from_config(load_pipeline_config(None, [])) is None  # off by default
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"brevity": rubric}))
    assert "Score 5: level 5" in load_rubrics(extra)["brevity"].text()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"brevity": {**rubric, "score6_description": "x"}}))
    with pytest.raises(RubricFileError, match=r"bad\.json: brevity: unknown key 'score6_description'"):
        load_rubrics(bad)
    with pytest.raises(RubricFileError, match=r"judge\.aspects: no rubric for \['brevity'\]"):
        RubricJudge(load_rubrics(None), aspects=("brevity",))


def test_judge_weight_without_the_judge_is_a_config_error_naming_both_keys():
    with pytest.raises(ConfigError, match=r"pairs\.judge_weight = 1\.0 needs judge\.enabled = true"):
        load_pipeline_config(None, ["pairs.judge_weight=1"])
    assert load_pipeline_config(None, ["pairs.judge_weight=1", "judge.enabled=true"]).judge.aspects


def judgements(scores: dict[str, int | None]) -> pa.Table:
    return pa.Table.from_pylist([{"candidate_id": cid, "context_id": "ctx-a", "aspect": "helpfulness", "score": s,
                                  "feedback": "", "used_reference": False, "raw_output": None if s else "x",
                                  "error": None if s else "malformed JSON", "judge_model": "judge-m"}
                                 for cid, s in scores.items()], schema=JUDGEMENTS)


def rewards(values: dict[str, float]) -> pa.Table:
    return pa.Table.from_pylist([{"candidate_id": cid, "context_id": "ctx-a", "reward": v, "aspects": [],
                                  "aggregation": "mean", "truncated_tokens": 0, "scorer_model": "scorer-m"}
                                 for cid, v in values.items()], schema=REWARDS)


def test_judge_weight_changes_which_reply_is_chosen_and_pairs_record_both_judge_scores():
    rows = pa.Table.from_pylist([cand(0, "FLR likes this one."), cand(1, "The judge likes this one.")],
                                schema=CANDIDATES)
    flr, judged = rewards({"ctx-a-c0": 1.0, "ctx-a-c1": 0.0}), judgements({"ctx-a-c0": 1, "ctx-a-c1": 5})
    by_flr = PairMiner(factuality_weight=0.0, min_margin=0.0)(rows, flr, judgements=judged).pairs.to_pylist()
    by_judge = PairMiner(factuality_weight=0.0, judge_weight=3.0, min_margin=0.0)(rows, flr, judgements=judged)
    assert by_flr[0]["chosen_candidate_id"] == "ctx-a-c0" and by_flr[0]["chosen_judge"] == 1.0
    pair = by_judge.pairs.to_pylist()[0]
    assert pair["chosen_candidate_id"] == "ctx-a-c1" and (pair["chosen_judge"], pair["rejected_judge"]) == (5.0, 1.0)


def test_a_reply_without_a_judge_score_is_a_reject_row_with_its_reason_when_the_judge_weighs_in():
    rows = pa.Table.from_pylist([cand(0, "One."), cand(1, "Two."), cand(2, "Three.")], schema=CANDIDATES)
    flr = rewards({"ctx-a-c0": 1.0, "ctx-a-c1": 0.0, "ctx-a-c2": 0.5})
    judged = judgements({"ctx-a-c0": 4, "ctx-a-c1": None})  # c2 was never judged
    mined = PairMiner(factuality_weight=0.0, judge_weight=1.0, min_margin=0.0)(rows, flr, judgements=judged)
    rejects = {r["candidate_id"]: r for r in mined.rejects.to_pylist()}
    assert set(rejects) == {"ctx-a-c1", "ctx-a-c2", None}
    assert rejects["ctx-a-c1"]["reason"] == rejects["ctx-a-c2"]["reason"] == "no_judge_score"
    assert "malformed JSON" in rejects["ctx-a-c1"]["detail"] and "not judged" in rejects["ctx-a-c2"]["detail"]
    assert rejects[None]["reason"] == "fewer_than_two_candidates"  # only c0 is left to compete
    unjudged = PairMiner(factuality_weight=0.0, judge_weight=1.0)(rows, flr).rejects.to_pylist()
    assert sorted(r["reason"] for r in unjudged if r["candidate_id"]) == ["no_judge_score"] * 3
    assert PairMiner(factuality_weight=0.0, min_margin=0.0)(rows, flr, judgements=judged).pairs.num_rows == 1


LABELLED = [  # (prompt, chosen, rejected): the prompt repeats, the chosen reply is sometimes the shorter one
    ("Is the earth flat?", "No, it is round.", "Yes, it is flat as a pancake, trust me."),
    ("Is the earth flat?", "No, it is round.", "Maybe."),
    ("What is 2+2?", "Four, since two plus two makes four.", "Five."),
    ("Name a colour.", "Blue.", "Blue!"),
]


def labelled() -> list[LabelledPair]:
    return [LabelledPair(k, [{"role": "user", "content": p}], c, r) for k, (p, c, r) in enumerate(LABELLED, 1)]


def scripted_parts(pairs):
    """FLR that prefers the chosen reply except in a tie on the last prompt; a judge that prefers shorter
    replies and fails on 'Maybe.'."""
    chosen = {p.candidate_id("chosen") for p in pairs}
    flr = {c["candidate_id"]: 1.0 if c["candidate_id"] in chosen else 0.0 for c in candidates(pairs)}
    flr[pairs[3].candidate_id("rejected")] = 1.0
    judge = {c["candidate_id"]: (None if c["reply"] == "Maybe." else 5.0 - len(c["reply"]) / 100)
             for c in candidates(pairs)}
    return {"flr": flr, "factuality": "skipped: no documents", "judge": judge}


def test_evaluate_reports_agreement_ties_missing_intervals_and_the_longer_reply_baseline():
    pairs = labelled()
    result = report(pairs, scripted_parts(pairs), PairMiner(judge_weight=1.0), boot=200)
    parts = result["parts"]
    assert (result["pairs"], result["prompts"], result["replies"]) == (4, 3, 7)
    flr = parts["flr"]
    assert (flr["agree"], flr["ties"], flr["missing"], flr["n"], flr["agreement"]) == (3, 1, 0, 4, 0.75)
    assert flr["wilson_low"] < 0.75 < flr["wilson_high"] and flr["boot_low"] is not None  # prompts repeat
    judge = parts["judge"]
    assert (judge["agree"], judge["disagree"], judge["ties"], judge["missing"], judge["n"]) == (1, 1, 1, 1, 3)
    assert parts["factuality"] == {"skipped": "skipped: no documents"}
    assert parts["composite"]["weights"] == {"flr": 1.0, "factuality": 0.0, "judge": 1.0}
    assert "factuality" in parts["composite"]["note"] and parts["composite"]["missing"] == 1
    longer = parts["longer"]
    assert (longer["agree"], longer["disagree"], longer["ties"]) == (2, 1, 1)
    assert agreement(pairs[2:3], ["agree"])["boot_low"] is None  # one prompt each: Wilson only
    printed = Console(width=200, record=True)
    printed.print(agreement_table(result))
    text = printed.export_text()
    assert "0.750" in text and "bootstrap" in text and "skipped: no documents" in text and "longer" in text


def test_score_parts_runs_each_part_in_chunks_with_progress_and_passes_skipped_parts_through():
    pairs, seen = labelled(), []
    parts = {"flr": lambda rows, models: {r["candidate_id"]: 1.0 for r in rows}, "factuality": "skipped: why"}
    values = score_parts(parts, candidates(pairs), lambda step, rows: step(rows, None),
                         lambda *a: seen.append(a), chunk=3)
    assert len(values["flr"]) == 7 and values["factuality"] == "skipped: why"
    assert seen == [("flr", 3, 7), ("flr", 6, 7), ("flr", 7, 7)]
    assert outcomes(pairs, values["flr"]) == ["tie"] * 4


def test_a_bad_labelled_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    trl = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}]}
    path.write_text(json.dumps(trl) + "\n\n" + json.dumps({"prompt": "Hi", "chosen": "Hello"}) + "\n")
    with pytest.raises(LabelledFileError, match=r"pairs\.jsonl:3: missing field\(s\) \['rejected'\]"):
        load_labelled(path)
    path.write_text(json.dumps(trl) + "\n" + json.dumps({**trl, "chosen": [{"role": "user", "content": "x"}]}))
    with pytest.raises(LabelledFileError, match=r"pairs\.jsonl:2: field 'chosen' must be"):
        load_labelled(path)
    path.write_text(json.dumps(trl) + "\n{not json\n")
    with pytest.raises(LabelledFileError, match=r"pairs\.jsonl:2: not JSON"):
        load_labelled(path)
    path.write_text(json.dumps(trl) + "\n")
    assert load_labelled(path)[0].chosen == "Hello!"


def test_evaluate_reads_the_trl_export_folder_and_parquet_and_names_a_bad_row(tmp_path):
    import pyarrow.parquet as pq

    trl = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
           "rejected": [{"role": "assistant", "content": "Go away."}], "margin": 0.5}
    (tmp_path / "out" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([trl, trl]), tmp_path / "out" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([trl]), tmp_path / "out" / "data" / "test-00000-of-00001.parquet")
    assert [p.chosen for p in load_labelled(tmp_path / "out")] == ["Hello!"] * 3
    bad = {**trl, "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}
    pq.write_table(pa.Table.from_pylist([trl, bad]), tmp_path / "bad.parquet")
    with pytest.raises(LabelledFileError, match=r"bad\.parquet: row 2: field 'chosen' must be"):
        load_labelled(tmp_path / "bad.parquet")


def test_a_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    row = {"prompt": "Hi\u2028there", "chosen": "Hello\u2029!", "rejected": "No\u0085."}
    path.write_text("\ufeff" + json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    [pair] = load_labelled(path)
    assert pair.chosen == "Hello\u2029!" and pair.prompt[0]["content"] == "Hi\u2028there"


def test_same_prompt_with_other_documents_is_checked_against_its_own_documents():
    one = LabelledPair(1, [{"role": "user", "content": "Q?"}], "a", "b", ["doc one"])
    two = LabelledPair(2, [{"role": "user", "content": "Q?"}], "c", "d", ["doc two"])
    seeds = {c["reply"]: c["seed_id"] for c in candidates([one, two])}
    assert seeds["a"] == seeds["b"] != seeds["c"] == seeds["d"]


def test_wilson_bounds_stay_within_zero_and_one():
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    low, high = wilson(3, 4)
    assert (round(low, 3), round(high, 3)) == (0.301, 0.954)
