"""Claim critiques of a shard's candidates (all, or the top k per context by reward), then FLR rewards of
the replies the critic revised, which join the candidates so pair mining weighs them like any other."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.flows.stages.rewards import follow_up_reward
from prefmill.operators.critiques import ClaimCritic
from prefmill.operators.flr import FollowUpReward
from prefmill.operators.pairs import revised_candidates
from prefmill.operators.retrieval import DocumentIndex, load_documents
from prefmill.operators.selection import top_k_by_reward
from prefmill.schemas.config import PipelineConfig, settings
from prefmill.schemas.tables import REWARDS


@dataclass(frozen=True)
class CritiqueStage(Stage):
    critic: ClaimCritic
    flr: FollowUpReward
    critic_model: str
    scorer: str
    top_k: int | None = None
    index: DocumentIndex | None = None

    name = "critiques"
    label = "critiques + revision"
    consumes = ("candidates", "rewards", "seeds")
    produces = ("critiques", "candidates", "rewards")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> CritiqueStage | None:
        k = cfg.critiques
        if not (k.enabled and cfg.sources.selfchat):
            return None
        index = DocumentIndex(load_documents(k.documents)) if k.documents else None
        models = cfg.models.resolved()
        return cls(ClaimCritic(**settings(ClaimCritic, k)), follow_up_reward(cfg), models["critic"],
                   models["scorer"], k.top_k if k.select == "top_k" else None, index)

    def roles(self) -> dict[str, ModelRole]:
        return {"critic": ModelRole(self.critic_model), "scorer": ModelRole(self.scorer, "scorer")}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        candidates, rewards = tables["candidates"], tables["rewards"]
        selected = candidates.to_pylist()
        if self.top_k is not None:
            selected = top_k_by_reward(selected, rewards.to_pylist(), self.top_k)
        documents = {s["seed_id"]: s["documents"] or [] for s in tables["seeds"].to_pylist()}
        critiques = self.critic(selected, models.chat_model(self.critic_model), documents, self.index)
        revised = revised_candidates(candidates, critiques)
        revised_rewards = (self.flr(revised.to_pylist(), models.scorer(self.scorer)) if revised.num_rows
                           else REWARDS.empty_table())
        return {"critiques": critiques, "candidates": pa.concat_tables([candidates, revised]),
                "rewards": pa.concat_tables([rewards, revised_rewards])}
