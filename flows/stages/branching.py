"""Branched-rollout pairs (REFUEL): every assistant turn of both futures of each branch scored with FLR (or
graded by the rubric judge, `branching.reward = "judge"`), the summed future rewards compared, a pair or a
reject row per branch."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.flows.stages.rewards import follow_up_reward
from prefmill.operators.branching import BranchPairs, turn_items
from prefmill.operators.flr import FollowUpReward
from prefmill.operators.judge import JUDGE_MIDPOINT, RubricJudge, judge_scores, load_rubrics
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class BranchingStage(Stage):
    flr: FollowUpReward | None  # None when the judge grades the turns
    pairing: BranchPairs
    scorer: str
    judge: RubricJudge | None = None  # with branching.reward = judge: it grades every turn, FLR is not used

    name = "refuel"
    label = "branched rollouts (REFUEL)"
    consumes = ("conversations", "branches")
    produces = ("branches", "refuel_pairs", "refuel_rejects")
    pair_tables = ("refuel_pairs", "refuel_rejects")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> BranchingStage | None:
        if not cfg.sources.refuel:
            return None
        pairing = BranchPairs(**settings(BranchPairs, cfg.branching))
        if cfg.branching.reward == "judge":
            judge = RubricJudge(load_rubrics(cfg.judge.rubric_file), **settings(RubricJudge, cfg.judge))
            return cls(None, pairing, cfg.models.resolved()["judge"], judge)
        return cls(follow_up_reward(cfg), pairing, cfg.models.resolved()["scorer"])

    def roles(self) -> dict[str, ModelRole]:
        return {"judge": ModelRole(self.scorer)} if self.judge else {"scorer": ModelRole(self.scorer, "scorer")}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        conversations = {row["conversation_id"]: row for row in tables["conversations"].to_pylist()}
        branches = tables["branches"].to_pylist()
        items = turn_items(branches, conversations)
        rewards = self.judged(items, models) if self.judge else self.turn_rewards(items, models.scorer(self.scorer))
        scored, pairs = self.pairing(branches, conversations, rewards, self.scorer)
        return {"branches": scored, "refuel_pairs": pairs.pairs, "refuel_rejects": pairs.rejects}

    def turn_rewards(self, items: list[dict], scorer) -> dict[str, float]:
        """FLR of every scored turn, by its key."""
        table = self.flr(items, scorer)
        return dict(zip(table.column("candidate_id").to_pylist(), table.column("reward").to_pylist()))

    def judged(self, items: list[dict], models: Models) -> dict[str, float]:
        """The judge's mean grade of every scored turn less the scale's midpoint, by its key (NaN where an aspect
        did not parse): an always-positive grade would make the future with more turns win whatever they say,
        and a user who ended early because they were satisfied would lose."""
        table = self.judge(items, models.chat_model(self.scorer))
        return {key: math.nan if score is None else score - JUDGE_MIDPOINT
                for key, (score, _) in judge_scores(table).items()}
