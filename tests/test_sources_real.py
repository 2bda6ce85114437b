"""The gold-anchored sources end to end on the real model: generated sums (the test computes their gold
answers), IRPO + Step-DPO + SPIN in one flow run on the in-process engine, published into one pairs dataset.

What holds whatever the tiny model writes is asserted for every row; the counts that need the model to get
some sums right and some wrong hold for these fixed seeds (sampling is seeded)."""

from __future__ import annotations

import json
import random
import re

import pytest

from prefmill.schemas.config import validate_pipeline_config
from prefmill.serving.hosts import LocalPool, ModelHost
from prefmill.storage.catalog import Catalog

pytestmark = pytest.mark.slow

INSTRUCTION = 'Solve it step by step, one step per line, and end with a line "Final answer: <number>".'


def stated(text: str) -> int | None:
    """The integer a solution gives, read independently of the verifier: on its last "final answer" line (else
    its last line), the first integer after the last "="."""
    lines = [line for line in text.splitlines() if line.strip()]
    marked = [line.lower().split("final answer", 1)[1] for line in lines if "final answer" in line.lower()]
    line = marked[-1] if marked else (lines[-1] if lines else "")
    numbers = re.findall(r"-?\d+", line.rsplit("=", 1)[-1])
    return int(numbers[0]) if numbers else None


def sum_seeds(n: int, rng: random.Random) -> list[dict]:
    """`n` one-digit sums with their computed answers; the first two carry a reference answer for SPIN."""
    seeds = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        seed = {"question": f"What is {a} + {b}?", "final_answer": str(a + b), "answer_type": "numeric"}
        if i < 2:
            seed["reference_answer"] = f"Adding {a} and {b} gives {a + b}, so the answer is {a + b}."
        seeds.append(seed)
    return seeds + [{"question": "Name a primary colour.", "reference_answer": "Red is a primary colour."}]


@pytest.fixture(scope="module")
def gold_run(engine, tmp_path_factory):
    from prefmill.flows.pipeline import pipeline_flow

    folder = tmp_path_factory.mktemp("gold")
    seeds = sum_seeds(4, random.Random(1))
    (folder / "seeds.jsonl").write_text("\n".join(json.dumps(s) for s in seeds))
    cfg = validate_pipeline_config({
        "seeds": {"path": str(folder / "seeds.jsonl")}, "catalog": str(folder / "catalog"),
        "result_storage": str(folder / "results"), "shard_size": 5, "iteration": 1,
        "sources": {"selfchat": False, "irpo": True, "step_dpo": True, "spin": True},
        "irpo": {"samples": 8, "max_tokens": 48, "instruction": INSTRUCTION},
        "step_dpo": {"rollouts": 2, "max_rollouts": 6, "rectify_samples": 4, "max_tokens": 40},
        "spin": {"max_tokens": 40}})
    pool = LocalPool(ModelHost(preloaded={"smollm2-135m": engine}))
    result = pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))
    catalog = Catalog(cfg.catalog)
    return result, catalog, {s["question"]: s for s in seeds}


def test_every_irpo_pair_chooses_a_verified_solution_over_a_wrong_one(gold_run):
    result, catalog, seeds = gold_run
    assert {"solutions", "pairs", "pair_rejects", "quarantine"} <= set(result.versions)
    irpo = catalog.sql("SELECT * FROM pairs WHERE source = 'irpo'").to_pylist()
    assert irpo, "the fixed seeds give the model some sums right and some wrong"
    for pair in irpo:
        gold = seeds[pair["prompt"][0]["content"].split("\n\n")[0]]["final_answer"]
        assert stated(pair["chosen"][0]["content"]) == int(gold)
        assert stated(pair["rejected"][0]["content"]) != int(gold)
        assert pair["gold_answer"] == gold and 0 < pair["pass_rate"] < 1


def test_every_solution_is_kept_with_its_verdict(gold_run):
    _, catalog, _ = gold_run
    solutions = catalog.read("solutions").to_pylist()
    assert len(solutions) == 4 * 8
    assert all(s["verify_reason"] for s in solutions)
    rejects = catalog.sql("SELECT reason FROM pair_rejects WHERE source = 'irpo'").column("reason").to_pylist()
    unpaired = [s for s in solutions if s["is_correct"] is None]
    assert rejects.count("no_answer") >= len(unpaired)


def test_step_dpo_pairs_continue_a_real_solution_prefix(gold_run):
    _, catalog, _ = gold_run
    steps = catalog.sql("SELECT * FROM pairs WHERE source = 'step_dpo'").to_pylist()
    texts = catalog.sql("SELECT solution FROM solutions").column("solution").to_pylist()
    assert steps, "the fixed seeds give at least one located and rectified step"
    for pair in steps:  # a pair whose first step is wrong has no prefix: its prompt is the question
        prefix = pair["prompt"][-1]["content"] if pair["prompt"][-1]["role"] == "assistant" else ""
        assert pair["rejected_solution"] in texts and pair["rejected_solution"].startswith(prefix)
        assert pair["chosen_solution"].startswith(prefix) and pair["chosen"] != pair["rejected"]
        assert len(prefix.splitlines()) == pair["step_index"] - 1 if prefix else pair["step_index"] == 1


def test_spin_pairs_choose_the_reference_answer(gold_run):
    _, catalog, seeds = gold_run
    spin = catalog.sql("SELECT * FROM pairs WHERE source = 'spin'").to_pylist()
    rejects = catalog.sql("SELECT * FROM pair_rejects WHERE source = 'spin'").to_pylist()
    assert len(spin) + len(rejects) == 3  # the three seeds with a reference answer
    for pair in spin:
        assert pair["chosen"][0]["content"] == seeds[pair["prompt"][0]["content"]]["reference_answer"]


def test_pairs_record_the_iteration_and_policy_and_skipped_seeds_are_quarantined(gold_run):
    _, catalog, _ = gold_run
    placement = catalog.versions("pairs")[-1].lineage["placement"]
    assert placement["devices"] == [] and {m["kind"] for m in placement["models"]} >= {"engine"}  # CPU: as before
    lineage = catalog.versions("pairs")[-1].lineage
    assert lineage["iteration"] == 1 and lineage["model_ids"]["smollm2-135m"].startswith("smollm2-135m@")
    tags = catalog.sql("SELECT DISTINCT iteration, policy_id FROM pairs").to_pylist()
    assert len(tags) == 1 and tags[0]["iteration"] == 1 and tags[0]["policy_id"].startswith("smollm2-135m@")
    quarantined = catalog.sql("SELECT stage, reason FROM quarantine").to_pylist()
    assert {q["stage"] for q in quarantined} == {"irpo", "step_dpo", "spin"}
    assert all("missing field" in q["reason"] for q in quarantined)


def test_the_card_and_trl_export_say_how_to_train_each_source(gold_run, tmp_path):
    from prefmill.flows.card import write_card
    from prefmill.flows.training import export_trl

    _, catalog, _ = gold_run
    card = write_card(catalog, "pairs", tmp_path / "card").read_text()
    assert "rpo_alpha" in card and "steps so far" in card and "iteration" in card
    export = export_trl(catalog, "pairs", tmp_path / "trl", test_size=0.0)
    import pyarrow.parquet as pq

    train = pq.read_table(next((tmp_path / "trl" / "data").glob("train-*.parquet")))
    assert export.rows["train"] == train.num_rows and {"source", "iteration", "policy_id"} <= set(train.column_names)
