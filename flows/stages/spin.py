"""Gold-vs-own pairs (SPIN): each seed's reference answer against the policy's own reply."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.spin import SelfPlay
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class SPINStage(Stage):
    selfplay: SelfPlay
    assistant: str

    name = "spin"
    label = "gold vs own (SPIN)"
    consumes = ("seeds",)
    produces = ("spin_pairs", "spin_rejects")
    seed_fields = ("reference_answer",)
    pair_tables = ("spin_pairs", "spin_rejects")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> SPINStage | None:
        if not cfg.sources.spin:
            return None
        return cls(SelfPlay(**settings(SelfPlay, cfg.spin)), cfg.models.assistant)

    def roles(self) -> dict[str, ModelRole]:
        return {"assistant": ModelRole(self.assistant)}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        seeds = self.fed_seeds(tables)
        pairs = self.selfplay(seeds, models.chat_model(self.assistant))
        return {"spin_pairs": pairs.pairs, "spin_rejects": pairs.rejects}
