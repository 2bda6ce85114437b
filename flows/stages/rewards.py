"""Follow-up likelihood rewards (FLR) of a shard's candidate replies."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.flr import DEFAULT_FOLLOWUPS, FollowUpReward, load_followups
from prefmill.schemas.config import PipelineConfig


def follow_up_reward(cfg: PipelineConfig) -> FollowUpReward:
    """The FLR operator of `cfg.flr` (the critique stage scores revised replies with the same one)."""
    flr = cfg.flr
    return FollowUpReward(load_followups(flr.followups or DEFAULT_FOLLOWUPS), flr.aggregation, flr.max_tokens)


@dataclass(frozen=True)
class RewardStage(Stage):
    flr: FollowUpReward
    scorer: str

    name = "rewards"
    label = "FLR rewards"
    consumes = ("candidates",)
    produces = ("rewards",)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> RewardStage | None:
        if not cfg.sources.selfchat:
            return None
        return cls(follow_up_reward(cfg), cfg.models.resolved()["scorer"])

    def roles(self) -> dict[str, ModelRole]:
        return {"scorer": ModelRole(self.scorer, "scorer")}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        return {"rewards": self.flr(tables["candidates"].to_pylist(), models.scorer(self.scorer))}
