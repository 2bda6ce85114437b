"""What a run did: rows per stage, cost per stage, the tables it published. Read by the CLI summary, the
Prefect artifacts and the tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa


@dataclass
class StageStats:
    shards: int = 0
    cached: int = 0
    seconds: float = 0.0  # the shards' compute seconds, summed (they may overlap: shards run at once)
    requests: int = 0
    tokens: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def busy(self) -> float:
        """Seconds during which at least one of the stage's shards was computing."""
        return busy_seconds(self.spans)


@dataclass
class RunResult:
    run_id: str
    config_hash: str
    stages: dict[str, StageStats] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    already_published: bool = False
    wall_seconds: float = 0.0
    stage_wall: dict[str, float] = field(default_factory=dict)  # each stage's own wall seconds
    card: str = ""
    placement: dict = field(default_factory=dict)  # the placement plan's summary (devices empty: CPU)
    model_ids: dict[str, str] = field(default_factory=dict)  # spec → spec@hash of its files (`model_identity`)
    embedding: dict = field(default_factory=dict)  # where dedup embedded: {"on": "actors"/"driver", "texts", "seconds"}


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans: time during which at least one was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
