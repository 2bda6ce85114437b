"""What a user sees of a run: the terminal summary, the Prefect artifacts and the dataset card.

All three read the same `RunResult`: rows per stage, cost per stage, pair and dedup counts, and the
distributions of FLR reward, factuality and margin over the published pairs.
"""

from __future__ import annotations

import json
from collections import Counter
from statistics import fmean

import pyarrow as pa
from rich.console import Console
from rich.table import Table

from prefmill.flows.results import RunResult
from prefmill.operators.gates import REVISION_SELF_TALK
from prefmill.schemas.config import PipelineConfig

HISTOGRAM_BINS = 8


def stage_rows(result: RunResult) -> list[dict]:
    """One row per stage: shards (cached), compute seconds, requests, generated tokens and tokens/s."""
    rows = []
    for stage, stats in result.stages.items():
        rate = stats.tokens / stats.busy if stats.busy and stats.tokens else None
        rows.append({"stage": stage, "shards": stats.shards, "cached": stats.cached,
                     "compute_s": round(stats.seconds, 1), "wall_s": round(result.stage_wall.get(stage, 0.0), 1),
                     "requests": stats.requests, "tokens": stats.tokens,
                     "tokens_per_s": round(rate, 1) if rate else None})
    return rows


def counts(result: RunResult, dataset: str) -> dict[str, int]:
    """Rows per published table plus the quality-gate, reject and dedup breakdowns."""
    out = {name: table.num_rows for name, table in result.tables.items()}
    conversations = result.tables.get("conversations")
    if conversations is not None and "gates" in conversations.column_names:
        gates = Counter(f"gate {g['gate']}:{g['action']}" for gs in conversations.column("gates").to_pylist()
                        for g in gs or [])
        out |= dict(sorted(gates.items()))
    critiques = result.tables.get("critiques")
    if critiques is not None:
        out["revisions rejected: talk about themselves"] = sum(
            any(REVISION_SELF_TALK in (claim["error"] or "") for claim in r["claims"] or [])
            for rounds in critiques.column("rounds").to_pylist() for r in rounds or [])
    rejects = result.tables.get("pair_rejects")
    if rejects is not None:
        out |= {f"rejected: {k}": v for k, v in sorted(Counter(rejects.column("reason").to_pylist()).items())}
    return out


def summary_dict(result: RunResult, dataset: str) -> dict:
    """The run summary as plain data, for scripts (`prefmill run --summary-json`): the stage table with each
    stage's own wall seconds, each step's wall seconds (pairs, dedup and publish too), where dedup embedded
    and how many texts, the rows per table, the published versions and the run's wall seconds."""
    return {"run_id": result.run_id, "config_hash": result.config_hash,
            "already_published": result.already_published,
            "stages": {row.pop("stage"): row for row in stage_rows(result)},
            "step_wall_s": {step: round(seconds, 1) for step, seconds in result.stage_wall.items()},
            "dedup_embedding": result.embedding,
            "counts": counts(result, dataset), "versions": result.versions, "placement": result.placement,
            "wall_s": round(result.wall_seconds, 1)}


def distributions(pairs: pa.Table) -> dict[str, list[float]]:
    """The score columns a user checks first, over the published pairs (nulls left out)."""
    names = {"FLR reward (chosen)": "chosen_reward", "FLR reward (rejected)": "rejected_reward",
             "factuality (chosen)": "chosen_factuality", "margin": "margin"}
    return {label: [v for v in pairs.column(col).to_pylist() if v is not None]
            for label, col in names.items() if col in pairs.column_names}


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> str:
    """A small text histogram, one line per bin."""
    if not values:
        return "(no values)"
    low, high = min(values), max(values)
    width = (high - low) / bins or 1.0
    tally = Counter(min(int((v - low) / width), bins - 1) for v in values)
    peak = max(tally.values())
    return "\n".join(f"{low + b * width:8.3f} … {low + (b + 1) * width:8.3f} | {'█' * round(20 * tally[b] / peak)} "
                     f"{tally[b]}" for b in range(bins))


def sql_hint(dataset: str, version: int | None) -> str:
    at = f" AT (VERSION => {version})" if version is not None else ""
    return (f'prefmill sql "SELECT prompt_id, margin, chosen_reward, rejected_reward FROM {dataset}{at} '
            'ORDER BY margin DESC LIMIT 5"')


def print_summary(console: Console, cfg: PipelineConfig, result: RunResult) -> None:
    if result.already_published:
        console.print(f"run {result.run_id} already published: {json.dumps(result.versions)} (nothing to do; "
                      "pass --set run_id=NEW to publish again)")
        return
    stages = Table("stage", "shards", "cached", "compute s", "wall s", "requests", "tokens", "tok/s",
                   title=f"run {result.run_id} (config {result.config_hash})")
    for row in stage_rows(result):
        stages.add_row(*(str(v) if v is not None else "–" for v in row.values()))
    console.print(stages)
    rows = Table("table / count", "rows", "version")
    for name, n in counts(result, cfg.dataset).items():
        rows.add_row(name, str(n), str(result.versions.get(name, "")))
    console.print(rows)
    for label, values in distributions(result.tables[cfg.dataset]).items():
        if values:
            console.print(f"{label}: min {min(values):.3f}  mean {fmean(values):.3f}  max {max(values):.3f}")
    if result.placement.get("devices"):
        console.print(placement_line(result.placement))
    if result.embedding.get("texts"):
        console.print(f"dedup embedded {result.embedding['texts']} texts on the {result.embedding['on']} in "
                      f"{result.embedding['seconds']} s")
    console.print(f"wall time {result.wall_seconds:.1f} s")
    console.print("Query it: " + sql_hint(cfg.dataset, result.versions.get(cfg.dataset)))


def placement_line(placement: dict) -> str:
    """Where the models ran, one line: each model's device(s) and memory share, and actors per node."""
    models = "; ".join(f"{m['spec']} ({m['kind']}) on {m['device']}"
                       + (f" at {m['fraction']:.2f}" if m.get("fraction") else "") for m in placement["models"])
    return f"placement: {models}; actors per node {placement['actors_per_node']}"


def dataset_card(cfg: PipelineConfig, result: RunResult) -> str:
    """A markdown card stored with the pairs version: config, models, counts, score statistics, lineage."""
    pairs = result.tables[cfg.dataset]
    lines = [f"# {cfg.dataset}", "", f"Preference pairs from prefmill run `{result.run_id}` "
             f"(config hash `{result.config_hash}`).", "", "## Models", ""]
    lines += [f"- {role}: `{spec}`" for role, spec in cfg.models.resolved().items()]
    lines += ["", "## Counts", "", "| table | rows |", "|---|---|"]
    lines += [f"| {name} | {n} |" for name, n in counts(result, cfg.dataset).items()]
    lines += ["", "## Scores", "", "| score | n | min | mean | max |", "|---|---|---|---|---|"]
    for label, values in distributions(pairs).items():
        stats = f"{min(values):.3f} | {fmean(values):.3f} | {max(values):.3f}" if values else "– | – | –"
        lines.append(f"| {label} | {len(values)} | {stats} |")
    lines += ["", "## Configuration", "", "```json", json.dumps(cfg.model_dump(mode="json"), indent=1), "```", "",
              "Lineage: every table of this run was published in one snapshot; "
              f"`SELECT * FROM prefmill_lineage WHERE json_extract_string(lineage, '$.run_id') = '{result.run_id}'`."]
    return "\n".join(lines)


def create_artifacts(result: RunResult) -> None:
    """Prefect artifacts of the run: the stage table, the counts, score histograms and the dataset card."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = f"prefmill-{result.run_id}"
    create_table_artifact(stage_rows(result), key=f"{key}-stages", description="stages: shards, cost, tokens/s")
    dataset = next((n for n in result.tables if f"{n}_embeddings" in result.tables), "pairs")
    table = [{"table": k, "rows": v, "version": result.versions.get(k)} for k, v in counts(result, dataset).items()]
    create_table_artifact(table, key=f"{key}-counts", description="rows per table, gates, rejects")
    hists = [f"### {label}\n\n```\n{histogram(values)}\n```" for label, values in
             distributions(result.tables[dataset]).items()]
    create_markdown_artifact("\n\n".join(hists) or "no pairs", key=f"{key}-scores",
                             description="distributions of FLR reward, factuality and margin")
    create_markdown_artifact(result.card, key=f"{key}-card", description="dataset card")
