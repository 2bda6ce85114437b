"""The pipeline's stages, in the order a run executes them. Adding one: a module here with its `Stage`
class, a config section in `schemas/config.py`, and its class in `STAGES`."""

from __future__ import annotations

import json

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.flows.stages.branching import BranchingStage
from prefmill.flows.stages.critiques import CritiqueStage
from prefmill.flows.stages.judge import JudgeStage
from prefmill.flows.stages.reasoning import IRPOStage
from prefmill.flows.stages.rewards import RewardStage
from prefmill.flows.stages.rollout import RolloutStage
from prefmill.flows.stages.spin import SPINStage
from prefmill.flows.stages.steps import StepDPOStage
from prefmill.operators.seeds import SeedFileError
from prefmill.schemas.config import PipelineConfig
from prefmill.schemas.tables import QUARANTINE

STAGES: tuple[type[Stage], ...] = (RolloutStage, RewardStage, BranchingStage, CritiqueStage, JudgeStage, IRPOStage,
                                   StepDPOStage, SPINStage)
SHARD_INPUTS = ("seeds",)  # what every shard starts with

__all__ = ["STAGES", "ModelRole", "Models", "Stage", "build_stages", "seed_quarantine"]


def build_stages(cfg: PipelineConfig, registry: tuple[type[Stage], ...] = STAGES) -> list[Stage]:
    """The stages `cfg` turns on, in order; fails when one consumes a table nothing before it produces."""
    stages = [stage for cls in registry if (stage := cls.from_config(cfg)) is not None]
    available = set(SHARD_INPUTS)
    for stage in stages:
        missing = [name for name in stage.consumes if name not in available]
        if missing:
            raise ValueError(f"stage {stage.name!r} consumes {missing}, which no stage before it produces")
        available |= set(stage.produces)
    return stages


def seed_quarantine(stages: list[Stage], seeds: pa.Table) -> pa.Table:
    """Quarantine rows for the seeds a stage skips because they lack a field it needs; a stage that no seed
    can feed fails the run before any model loads."""
    rows = seeds.to_pylist()
    bad = []
    for stage in stages:
        if stage.seed_fields and not any(stage.takes(seed) for seed in rows):
            raise SeedFileError(f"stage {stage.name!r} needs seed field(s) {list(stage.seed_fields)}, which no seed "
                                f"has: add them to the seed file (e.g. {{\"question\": \"What is 2+3?\", "
                                f"\"final_answer\": \"5\", \"reference_answer\": \"2+3 = 5.\"}}) or turn "
                                f"sources.{stage.name} off")
        bad += [_skipped(stage, seed) for seed in rows if not stage.takes(seed)]
    return pa.Table.from_pylist(bad, schema=QUARANTINE)


def _skipped(stage: Stage, seed: dict) -> dict:
    missing = [name for name in stage.seed_fields if not seed.get(name)]
    return {"stage": stage.name, "source": seed["source"], "row": json.dumps(seed, ensure_ascii=False),
            "reason": f"missing field(s) {missing}, which stage {stage.name!r} needs: the seed is skipped by it"}
