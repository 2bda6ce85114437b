"""The rubric judge on real parts: one pipeline run with the judge on (the session engine, FLR with the
prefix-shared scorer, a real catalog), and `prefmill evaluate` through the CLI on a small labelled file.

What the tiny model scores is not asserted; what must hold for any output is."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.schemas.config import JUDGE_ASPECTS, validate_pipeline_config
from prefmill.serving.hosts import LocalPool, ModelHost
from prefmill.storage.catalog import Catalog

pytestmark = pytest.mark.slow
SEEDS = [{"question": "What is the capital of France?", "reference_answer": "The capital of France is Paris."},
         {"question": "Give one tip for sleeping better."}]


@pytest.fixture(scope="module")
def judged_run(engine, tmp_path_factory):
    from prefmill.flows.pipeline import pipeline_flow

    folder = tmp_path_factory.mktemp("judge")
    (folder / "seeds.jsonl").write_text("\n".join(json.dumps(s) for s in SEEDS))
    cfg = validate_pipeline_config({
        "seeds": {"path": str(folder / "seeds.jsonl")}, "catalog": str(folder / "catalog"),
        "result_storage": str(folder / "results"), "shard_size": 2,
        "selfchat": {"max_turns": 1, "max_tokens_per_turn": 32}, "candidates": {"n": 2, "max_tokens": 32},
        "critiques": {"enabled": False}, "judge": {"enabled": True, "max_tokens": 96},
        "pairs": {"judge_weight": 1.0, "min_margin": 0.0}})
    result = pipeline_flow(pool=LocalPool(ModelHost(preloaded={"smollm2-135m": engine})))(cfg.model_dump(mode="json"))
    return result, Catalog(cfg.catalog)


def test_every_candidate_is_graded_on_every_aspect_with_a_score_in_range_or_a_reason(judged_run):
    result, catalog = judged_run
    candidates = catalog.read("candidates").to_pylist()
    judgements = catalog.read("judgements").to_pylist()
    assert len(candidates) == 2 * 2 and "judgements" in result.versions
    assert len(judgements) == len(candidates) * len(JUDGE_ASPECTS)  # one row per candidate × aspect
    assert {(j["candidate_id"], j["aspect"]) for j in judgements} == {
        (c["candidate_id"], a) for c in candidates for a in JUDGE_ASPECTS}
    for row in judgements:
        assert (row["score"] in range(1, 6) and row["error"] is None) or (
            row["score"] is None and row["error"] and row["raw_output"] is not None)
        assert row["judge_model"] == "smollm2-135m"
    with_reference = {c["candidate_id"] for c in candidates if c["context"][0]["content"] == SEEDS[0]["question"]}
    assert {j["candidate_id"] for j in judgements if j["used_reference"]} == with_reference


def test_pairs_carry_both_judge_scores_and_an_unjudged_reply_is_a_reject_with_its_reason(judged_run):
    _, catalog = judged_run
    pairs = catalog.read("pairs").to_pylist()
    rejects = catalog.read("pair_rejects").to_pylist()
    contexts = set(catalog.read("candidates").column("context_id").to_pylist())
    assert {p["prompt_id"] for p in pairs} | {r["prompt_id"] for r in rejects} == contexts  # none vanishes
    unscored = {j["candidate_id"] for j in catalog.read("judgements").to_pylist() if j["score"] is None}
    judge_rejects = {r["candidate_id"] for r in rejects if r["reason"] == "no_judge_score"}
    rejected_first = {r["candidate_id"] for r in rejects if r["reason"] != "no_judge_score"}  # empty, echo, …
    assert judge_rejects == unscored - rejected_first
    for pair in pairs:
        assert 1 <= pair["chosen_judge"] <= 5 and 1 <= pair["rejected_judge"] <= 5


def test_evaluate_through_the_cli_reports_flr_and_judge_agreement_on_a_labelled_file(engine, tmp_path, monkeypatch):
    lines = [{"prompt": "Is the earth flat?", "chosen": "No. The earth is round.", "rejected": "Yes, it is flat."},
             {"prompt": [{"role": "user", "content": "What is 2+2?"}],
              "chosen": [{"role": "assistant", "content": "2+2 is 4."}],
              "rejected": [{"role": "assistant", "content": "2+2 is 5."}]},
             {"prompt": "Is the earth flat?", "chosen": "No. The earth is round.", "rejected": "Nobody knows."}]
    path = tmp_path / "labelled.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    monkeypatch.setattr("prefmill.flows.evaluate.open_pool",
                        lambda cfg: LocalPool(ModelHost(preloaded={"smollm2-135m": engine})))
    run = CliRunner().invoke(app, ["evaluate", str(path), "--json", "--set", "judge.max_tokens=96",
                                   "--set", "judge.enabled=true", "--set", "pairs.judge_weight=1"])
    assert run.exit_code == 0, run.output
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert (result["pairs"], result["prompts"], result["replies"]) == (3, 2, 5)
    parts = result["parts"]
    for name in ("flr", "judge", "composite", "longer"):
        part = parts[name]
        assert part["agree"] + part["disagree"] + part["ties"] + part["missing"] == 3, name
        assert part["n"] == 3 - part["missing"]
    assert parts["flr"]["missing"] == 0 and parts["longer"]["agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert "documents" in parts["factuality"]["skipped"]
    assert parts["composite"]["weights"] == {"flr": 1.0, "factuality": 0.0, "judge": 1.0}
