"""The stage contract: stages built from their config sections, one definition of each default, a fingerprint
that covers the code a stage runs, and resume from prefmill's own shard store."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from prefect import flow

from prefmill.flows.pipeline import RunModels, Shard, no_report, run_stages, shard_seeds, shard_size
from prefmill.flows.results import RunResult
from prefmill.flows.stages import STAGES, Stage, build_stages
from prefmill.flows.stages.base import imported_modules
from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.critiques import ClaimCritic
from prefmill.operators.dedup import Deduper
from prefmill.operators.flr import FollowUpReward
from prefmill.operators.pairs import PairMiner
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.config import (
    CandidatesSection,
    CritiquesSection,
    DedupSection,
    FLRSection,
    PairsSection,
    PipelineConfig,
    SelfChatSection,
    load_pipeline_config,
)
from prefmill.serving.hosts import StepRun
from prefmill.storage.shards import ShardStore, StoredShard

REPO = Path(__file__).resolve().parents[1]
# config fields a stage (or the flow) reads itself (the rest of each section is its operator's settings)
STAGE_LEVEL = {CandidatesSection: {"contexts"}, CritiquesSection: {"enabled", "select", "top_k", "documents"},
               FLRSection: {"followups", "prefix_batch"}, DedupSection: {"actor_embed_min_pairs"}}
OPERATORS = [(SelfChat, SelfChatSection), (CandidateSampler, CandidatesSection), (ClaimCritic, CritiquesSection),
             (FollowUpReward, FLRSection), (PairMiner, PairsSection), (Deduper, DedupSection)]


@pytest.mark.parametrize("operator, section", OPERATORS, ids=lambda v: v.__name__)
def test_an_operator_takes_its_defaults_from_its_config_section(operator, section):
    defaults = {f.name: f.default for f in dataclasses.fields(operator) if f.default is not dataclasses.MISSING}
    shared = set(section.model_fields) - STAGE_LEVEL.get(section, set())
    assert shared <= set(defaults), f"{section.__name__} has settings {operator.__name__} does not take"
    assert {name: defaults[name] for name in shared} == {name: getattr(section(), name) for name in shared}


def test_the_default_config_builds_the_operators_default_settings():
    rollout, rewards, critiques = build_stages(PipelineConfig())
    assert rollout.rollout == Rollout(SelfChat(), CandidateSampler())
    assert (rewards.flr.aggregation, rewards.flr.max_tokens) == (FollowUpReward().aggregation,
                                                                  FollowUpReward().max_tokens)
    assert critiques.critic == ClaimCritic() and critiques.top_k == CritiquesSection().top_k


def test_the_stage_list_follows_the_config_and_every_input_is_produced_before_it_is_consumed():
    assert [s.name for s in build_stages(PipelineConfig())] == ["rollout", "rewards", "critiques"]
    off = load_pipeline_config(None, ["critiques.enabled=false"])
    assert [s.name for s in build_stages(off)] == ["rollout", "rewards"]

    @dataclasses.dataclass(frozen=True)
    class Judge(Stage):
        name, consumes, produces = "judge", ("verdicts",), ("scores",)

        @classmethod
        def from_config(cls, cfg):
            return cls()

    with pytest.raises(ValueError, match=r"'judge' consumes \['verdicts'\]"):
        build_stages(PipelineConfig(), (*STAGES, Judge))


def test_a_stage_fingerprint_covers_the_modules_its_code_imports():
    rollout = imported_modules("prefmill.flows.stages.rollout")
    critiques = imported_modules("prefmill.flows.stages.critiques")
    assert {f"prefmill.operators.{m}" for m in ("gates", "selfchat", "streams")} <= rollout
    assert {f"prefmill.operators.{m}" for m in ("gates", "retrieval", "selection")} <= critiques


FINGERPRINTS = """
import json, sys
from prefmill.flows.stages import build_stages
from prefmill.schemas.config import load_pipeline_config
print(json.dumps({s.name: s.fingerprint() for s in build_stages(load_pipeline_config(None, sys.argv[1:]))}))
"""


def fingerprints(root: Path, *overrides: str) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", FINGERPRINTS, *overrides], cwd=root, check=True,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)})
    return json.loads(out.stdout)


def test_editing_a_module_a_stage_depends_on_changes_its_fingerprint_and_speed_settings_do_not(tmp_path):
    """A shard computed before `operators/gates.py` changed must not be served after it (resume would
    hand out results of the old algorithm); where and how fast a run goes must not invalidate anything."""
    for layer in ("prefmill", "flows", "operators", "schemas", "serving", "storage"):  # laid out as installed
        target = tmp_path / "prefmill" / (layer if layer != "prefmill" else "")
        shutil.copytree(REPO / layer, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    before = fingerprints(tmp_path)
    assert fingerprints(tmp_path, "flr.prefix_batch=1", "backend=ray", "ray.actors=3", "shard_size=9") == before
    gates = tmp_path / "prefmill" / "operators" / "gates.py"
    gates.write_text(gates.read_text().replace("MIN_WORDS = 4", "MIN_WORDS = 5"))
    after = fingerprints(tmp_path)
    assert after["rollout"] != before["rollout"] and after["critiques"] != before["critiques"]
    assert after["rewards"] == before["rewards"]  # FLR does not use the gates


@dataclasses.dataclass(frozen=True)
class Doubler(Stage):
    """A stage without models: doubles a column, so resume can be watched without an engine."""

    name, consumes, produces = "double", ("seeds",), ("doubled",)

    def roles(self):
        return {}

    def __call__(self, tables, models):
        return {"doubled": pa.table({"x": pc.multiply(tables["seeds"]["x"], 2)})}


class CountingPool:
    def __init__(self):
        self.calls = 0

    def run(self, stage, inputs):
        self.calls += 1
        return StepRun(stage(inputs, None), 0.01, 1, 0, 0.0)


def run_doubler(store: ShardStore, models: RunModels) -> tuple[list[Shard], RunResult]:
    @flow
    def doubling():
        result = RunResult("r", "c")
        shards = [Shard(pa.table({"x": [i, i + 1]})) for i in range(0, 6, 2)]
        return run_stages([Doubler()], shards, models, store, result, no_report), result

    return doubling()


def test_a_rerun_takes_finished_shards_from_the_store_and_opens_no_model(tmp_path, monkeypatch):
    import prefmill.flows.pipeline as pipeline_module

    store, pool = ShardStore(tmp_path / "results"), CountingPool()
    shards, result = run_doubler(store, RunModels(PipelineConfig(), pool))
    assert pool.calls == 3 and (result.stages["double"].shards, result.stages["double"].cached) == (3, 0)
    assert [s.tables["doubled"]["x"].to_pylist() for s in shards] == [[0, 2], [4, 6], [8, 10]]

    monkeypatch.setattr(pipeline_module, "open_pool", lambda cfg, plan: pytest.fail("a cached re-run opened a model"))
    again, result = run_doubler(store, RunModels(PipelineConfig()))
    assert (result.stages["double"].shards, result.stages["double"].cached) == (3, 3)
    assert [s.tables for s in again] == [s.tables for s in shards] and [s.digests for s in again] == \
        [s.digests for s in shards]


def test_the_shard_store_round_trips_and_ignores_what_a_killed_writer_left(tmp_path):
    store = ShardStore(tmp_path)
    assert store.get("k") is None
    (tmp_path / ".k.dead.tmp").mkdir()  # a writer killed before its rename
    (tmp_path / ".k.dead.tmp" / "0.arrow").write_bytes(b"half")
    shard = StoredShard({"a": pa.table({"x": [1]}), "b": pa.table({"y": ["z"]})}, {"digests": {"a": "1"}})
    store.put("k", shard)
    store.put("k", StoredShard({"a": pa.table({"x": [2]})}, {}))  # another writer's copy of the same work
    back = store.get("k")
    assert back.tables == shard.tables and back.meta == shard.meta


def test_auto_shards_stay_small_for_small_runs_and_grow_into_few_tasks_for_big_ones():
    auto = PipelineConfig()
    assert [shard_size(auto, n) for n in (1, 8, 16, 17, 256, 1000, 10**6)] == [4, 4, 4, 5, 64, 64, 64]
    assert shard_size(PipelineConfig(backend="ray", ray={"actors": 8}), 1000) == 32  # 4 shards for every actor
    assert shard_size(PipelineConfig(shard_size=7), 10**6) == 7
    shards = shard_seeds(auto, pa.table({"seed_id": [str(i) for i in range(1000)]}))
    assert [s.tables["seeds"].num_rows for s in shards] == [64] * 15 + [40]
