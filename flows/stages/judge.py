"""Rubric-judge grades (Prometheus-style) of a shard's candidates, critique revisions included: the judge
runs after the critique stage, which adds the revised replies to `candidates`."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.judge import RubricJudge, load_rubrics
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class JudgeStage(Stage):
    judge: RubricJudge
    judge_model: str

    name = "judge"
    label = "rubric judge"
    consumes = ("candidates", "seeds")
    produces = ("judgements",)

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> JudgeStage | None:
        if not (cfg.judge.enabled and cfg.sources.selfchat):
            return None
        judge = RubricJudge(load_rubrics(cfg.judge.rubric_file), **settings(RubricJudge, cfg.judge))
        return cls(judge, cfg.models.resolved()["judge"])

    def roles(self) -> dict[str, ModelRole]:
        return {"judge": ModelRole(self.judge_model)}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        references = {s["seed_id"]: s["reference_answer"] for s in tables["seeds"].to_pylist()}
        judgements = self.judge(tables["candidates"].to_pylist(), models.chat_model(self.judge_model), references)
        return {"judgements": judgements}
