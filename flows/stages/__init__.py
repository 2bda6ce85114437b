"""The pipeline's stages, in the order a run executes them. Adding one: a module here with its `Stage`
class, a config section in `schemas/config.py`, and its class in `STAGES`."""

from __future__ import annotations

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.flows.stages.critiques import CritiqueStage
from prefmill.flows.stages.rewards import RewardStage
from prefmill.flows.stages.rollout import RolloutStage
from prefmill.schemas.config import PipelineConfig

STAGES: tuple[type[Stage], ...] = (RolloutStage, RewardStage, CritiqueStage)
SHARD_INPUTS = ("seeds",)  # what every shard starts with

__all__ = ["STAGES", "ModelRole", "Models", "Stage", "build_stages"]


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
