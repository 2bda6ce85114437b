"""Verifier-graded reasoning (IRPO): sampled solutions of the seeds with a final answer, verified, then paired."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.reasoning import IRPOPairs, SolutionSampler
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class IRPOStage(Stage):
    sampler: SolutionSampler
    pairing: IRPOPairs
    assistant: str

    name = "irpo"
    label = "reasoning + verifier (IRPO)"
    consumes = ("seeds",)
    produces = ("solutions", "irpo_pairs", "irpo_rejects")
    seed_fields = ("final_answer",)
    pair_tables = ("irpo_pairs", "irpo_rejects")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> IRPOStage | None:
        if not cfg.sources.irpo:
            return None
        return cls(SolutionSampler(**settings(SolutionSampler, cfg.irpo)), IRPOPairs(cfg.irpo.max_pairs),
                   cfg.models.assistant)

    def roles(self) -> dict[str, ModelRole]:
        return {"assistant": ModelRole(self.assistant)}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        seeds = self.fed_seeds(tables)
        solutions = self.sampler(seeds, models.chat_model(self.assistant))
        pairs = self.pairing(solutions)
        return {"solutions": solutions, "irpo_pairs": pairs.pairs, "irpo_rejects": pairs.rejects}
