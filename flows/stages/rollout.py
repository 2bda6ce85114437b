"""Self-chat and candidate replies for a shard of seeds, as one request stream on the assistant's engine, and
the teacher's reply to each context when the run has one (DNO)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from prefmill.flows.stages.base import ModelRole, Models, Stage
from prefmill.operators.branching import Branching
from prefmill.operators.candidates import CandidateSampler
from prefmill.operators.rollout import Rollout
from prefmill.operators.selfchat import SelfChat
from prefmill.schemas.config import PipelineConfig, settings


@dataclass(frozen=True)
class RolloutStage(Stage):
    rollout: Rollout
    assistant: str
    simulator: str
    teacher: str | None = None
    teacher_url: str | None = field(default=None, repr=False)  # where, not what: not part of the fingerprint

    name = "rollout"
    label = "self-chat + candidates"
    consumes = ("seeds",)

    @property
    def produces(self) -> tuple[str, ...]:
        """Conversations and candidates, and their branches when branching is on (sources.refuel)."""
        return ("conversations", "candidates", *(("branches",) if self.rollout.branching else ()))

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> RolloutStage | None:
        if not cfg.sources.selfchat:
            return None
        models = cfg.models.resolved()
        rollout = Rollout(SelfChat(**settings(SelfChat, cfg.selfchat)),
                          CandidateSampler(**settings(CandidateSampler, cfg.candidates)), cfg.candidates.contexts,
                          branching(cfg))
        return cls(rollout, models["assistant"], models["simulator"], models.get("teacher"), cfg.models.teacher_url)

    def roles(self) -> dict[str, ModelRole]:
        teacher = {"teacher": ModelRole(self.teacher, url=self.teacher_url)} if self.teacher else {}
        return {"assistant": ModelRole(self.assistant), "simulator": ModelRole(self.simulator), **teacher}

    def __call__(self, tables: dict[str, pa.Table], models: Models) -> dict[str, pa.Table]:
        teacher = models.chat_model(self.teacher, self.teacher_url) if self.teacher else None
        out = self.rollout(tables["seeds"].to_pylist(), models.chat_model(self.assistant),
                           models.chat_model(self.simulator), teacher=teacher)
        branches = {"branches": out.branches} if out.branches is not None else {}
        return {"conversations": out.conversations, "candidates": out.candidates, **branches}


def branching(cfg: PipelineConfig) -> Branching | None:
    """The branching of `cfg.branching` when REFUEL is a source, else None (self-chat alone)."""
    return Branching(**settings(Branching, cfg.branching)) if cfg.sources.refuel else None
