"""First-wrong-step pairs (Step-DPO) from the wrong solutions of the IRPO stage."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.steps import StepDPO
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class StepDPOStage(Stage):
    steps: StepDPO
    assistant: str
    judge: str | None = None  # the judge locator's model (None: rollouts only)

    name = "step_dpo"
    label = "first wrong steps (Step-DPO)"
    consumes = ("seeds", "solutions")
    produces = ("step_dpo_pairs", "step_dpo_rejects")
    seed_fields = ("final_answer",)
    pair_tables = ("step_dpo_pairs", "step_dpo_rejects")

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> StepDPOStage | None:
        if not cfg.sources.step_dpo:
            return None
        steps = StepDPO(**settings(StepDPO, cfg.step_dpo), numeric_tolerance=cfg.irpo.numeric_tolerance)
        judge = cfg.models.resolved()["judge"] if steps.locator == "judge" else None
        return cls(steps, cfg.models.assistant, judge)

    def roles(self) -> dict[str, ModelRole]:
        return {"assistant": ModelRole(self.assistant)} | ({"judge": ModelRole(self.judge)} if self.judge else {})

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        judge = models.chat_model(self.judge) if self.judge else None
        seeds = self.fed_seeds(tables)
        pairs = self.steps(seeds, tables["solutions"], models.chat_model(self.assistant), judge)
        return {"step_dpo_pairs": pairs.pairs, "step_dpo_rejects": pairs.rejects}
