"""Export a pairs version as train/test Parquet splits in the layout TRL and `datasets` read.

The files hold TRL's explicit conversational preference format (`prompt` = message list, `chosen` / `rejected`
= one assistant message each; REFUEL's are whole multi-turn futures, simulated-user turns included) plus ids,
soft labels and each pair's source, which `DPOTrainer` drops on its own (`remove_unused_columns`). A Step-DPO
pair's prompt ends with an assistant turn (the correct steps so far); TRL's template would close that turn and
open another, so the export moves it into both replies (steps so far + the next step): the shared prefix
cancels in the DPO loss, which then weighs only the step. IRPO pairs train with DPO plus an NLL term on the
chosen side (`DPOConfig(rpo_alpha=1.0)`). Splits are made by prompt, so every pair of one prompt lands in the
same split and the test split never shares a context with training."""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefmill.storage.catalog import Catalog, CatalogError

TRL_COLUMNS = ["prompt", "chosen", "rejected"]
EXTRA_COLUMNS = ["pair_id", "prompt_id", "seed_id", "score_chosen", "score_rejected", "margin", "chosen_win_prob",
                 "chosen_mean_win_prob", "rejected_mean_win_prob", "strategy", "source", "iteration", "policy_id",
                 "step_index", "branch_turn", "chosen_turn_rewards", "rejected_turn_rewards", "future_reward_diff"]
DATA_DIR = "data"


@dataclass(frozen=True)
class TrlExport:
    """Where the splits went and what is in them."""

    output: Path
    version: int
    rows: dict[str, int]
    prompts: dict[str, int]


def export_trl(catalog: Catalog, dataset: str, output: Path, version: int | None = None,
               test_size: float = 0.1, seed: int = 0) -> TrlExport:
    """Write `dataset` (at `version`, default latest) to `output/data/{train,test}-00000-of-00001.parquet`."""
    if not 0.0 <= test_size < 1.0:
        raise CatalogError(f"--test-size must be in [0, 1), got {test_size}")
    version = version if version is not None else catalog.versions(dataset)[-1].version
    table = trl_table(catalog.read(dataset, version))
    test_prompts = split_prompts(table.column("prompt_id").to_pylist(), test_size, seed)
    in_test = pc.is_in(table.column("prompt_id"), pa.array(sorted(test_prompts), pa.string()))
    splits = {"train": table.filter(pc.invert(in_test)), "test": table.filter(in_test)}
    _write_splits(Path(output), {name: t for name, t in splits.items() if t.num_rows})
    return TrlExport(Path(output), version, {n: t.num_rows for n, t in splits.items()},
                     {n: len(set(t.column("prompt_id").to_pylist())) for n, t in splits.items()})


def trl_table(pairs: pa.Table) -> pa.Table:
    """The TRL columns first, then the ids and soft labels that are there; fails on a table that isn't pairs."""
    missing = [c for c in [*TRL_COLUMNS, "pair_id", "prompt_id"] if c not in pairs.column_names]
    if missing:
        raise CatalogError(f"not a pairs table: missing column(s) {missing} for the TRL format")
    keep = TRL_COLUMNS + [c for c in EXTRA_COLUMNS if c in pairs.column_names]
    return continued_prompts(pairs.select(keep)).sort_by([("prompt_id", "ascending"), ("pair_id", "ascending")])


def continued_prompts(table: pa.Table) -> pa.Table:
    """Pairs whose prompt ends with assistant turns (Step-DPO's steps so far) with those turns moved to the
    front of both replies, on their own line, since TRL renders a reply as a new assistant turn."""
    rows = [_continued(p, c, r) for p, c, r in zip(*(table.column(n).to_pylist() for n in TRL_COLUMNS))]
    for k, name in enumerate(TRL_COLUMNS):
        table = table.set_column(k, name, pa.array([row[k] for row in rows], table.schema.field(name).type))
    return table


def _continued(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    start = max((i for i, m in enumerate(prompt) if m["role"] != "assistant"), default=-1) + 1
    if start == len(prompt):
        return prompt, chosen, rejected
    head = "\n".join(m["content"] for m in prompt[start:])
    return prompt[:start], *([{"role": "assistant", "content": f"{head}\n{side[0]['content']}"}] + side[1:]
                             for side in (chosen, rejected))


def split_prompts(prompt_ids: list[str], test_size: float, seed: int) -> set[str]:
    """The prompt ids that go to the test split: a seeded hash order over the distinct ids, so the choice
    depends only on the ids and the seed, never on row order. At least one test prompt when `test_size`
    > 0 and there are two or more prompts; never all of them."""
    distinct = sorted(set(prompt_ids), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    if test_size == 0 or len(distinct) < 2:
        return set()
    count = min(max(1, math.floor(test_size * len(distinct) + 0.5)), len(distinct) - 1)
    return set(distinct[:count])


def _write_splits(output: Path, splits: dict[str, pa.Table]) -> None:
    """Replace `output/data/` as a whole, so files of an earlier export never mix with this one."""
    output.mkdir(parents=True, exist_ok=True)
    staging = output / f".{DATA_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, table in splits.items():
        pq.write_table(table, staging / f"{name}-00000-of-00001.parquet")
    target = output / DATA_DIR
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
