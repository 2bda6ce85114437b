"""The demo run on the embedded default: seeds → self-chat → candidates → FLR rewards → versioned datasets.

Every stage's table is published as a new version of its dataset, with lineage pointing at the versions
it was made from, so the run can be queried with `prefmill sql` afterwards.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow.compute as pc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from operators.candidates import CandidateSampler
from operators.flr import FollowUpReward
from operators.rollout import Rollout
from operators.seeds import BUILTIN_SEEDS, load_seeds
from operators.selfchat import SelfChat
from schemas.config import DEFAULT_MODEL
from schemas.tables import CANDIDATES, CONVERSATIONS, QUARANTINE, REWARDS, SEEDS
from serving.engine import VLLMEngine
from serving.prefix_scorer import SharedPrefixScorer
from storage.catalog import Catalog


def run_demo(seeds_path: Path = BUILTIN_SEEDS, num_seeds: int = 8, catalog_path: Path | None = None,
             console: Console | None = None) -> dict[str, int]:
    """Run the pipeline on `num_seeds` seeds with the embedded model; return {dataset: version}."""
    console = console or Console()
    run_id = uuid.uuid4().hex[:12]
    catalog = Catalog(catalog_path)
    loaded = load_seeds(seeds_path)
    seeds = loaded.seeds.slice(0, num_seeds)
    rollout = Rollout(SelfChat(max_turns=2, max_tokens_per_turn=96), CandidateSampler(n=4, max_tokens=96), "last")
    flr = FollowUpReward()
    config = {"selfchat": asdict(rollout.selfchat), "candidates": asdict(rollout.sampler),
              "contexts": rollout.contexts, "flr_aggregation": flr.aggregation,
              "seeds": str(seeds_path), "num_seeds": num_seeds}
    lineage = {"run_id": run_id, "config": config, "models": [DEFAULT_MODEL]}
    versions: dict[str, int] = {}

    def publish(table, name, schema, parents=()):
        version = catalog.publish(table, name, {**lineage, "parents": {p: versions[p] for p in parents}}, schema)
        versions[name] = version.version

    publish(seeds, "seeds", SEEDS)
    if loaded.quarantine.num_rows:
        publish(loaded.quarantine, "quarantine", QUARANTINE)
    with Progress(console=console) as progress:
        task = progress.add_task("starting the engine", total=3)
        engine = VLLMEngine()
        chats = progress.add_task("conversations (self-chat + candidates)", total=seeds.num_rows)
        progress.update(task, advance=1, description="self-chat and candidate replies")
        out = rollout(seeds.to_pylist(), engine, progress=lambda done, _: progress.update(chats, completed=done))
        engine.close()
        publish(out.conversations, "conversations", CONVERSATIONS, ["seeds"])
        publish(out.candidates, "candidates", CANDIDATES, ["conversations"])
        progress.update(task, advance=1, description="follow-up likelihood rewards")
        rewards = flr(out.candidates.to_pylist(), SharedPrefixScorer())
        publish(rewards, "rewards", REWARDS, ["candidates"])
        progress.update(task, advance=1, description="done")
    _summary(console, run_id, catalog, versions, rewards)
    return versions


def _summary(console: Console, run_id: str, catalog: Catalog, versions: dict[str, int], rewards) -> None:
    table = Table("dataset", "version", "rows", title=f"run {run_id} → {catalog.root}")
    for name, version in versions.items():
        rows = next(v.rows_added for v in catalog.versions(name) if v.version == version)
        table.add_row(name, str(version), str(rows))
    console.print(table)
    reward = rewards.column("reward")
    console.print(f"FLR reward: min {pc.min(reward).as_py():.3f}  mean {pc.mean(reward).as_py():.3f}  "
                  f"max {pc.max(reward).as_py():.3f}")
    console.print('Query it: prefmill sql "SELECT context_id, max(reward) - min(reward) AS spread '
                  'FROM rewards GROUP BY 1 ORDER BY 2 DESC LIMIT 5"')
