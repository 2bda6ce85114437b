"""`prefmill card`: a Hugging Face dataset card (README.md) for one pairs version, with score pictures.

The card holds the YAML header the Hub reads (tags, size, and the split files when the card sits next to
an `export --format trl` folder), counts, PNG histograms of the scores (matplotlib, no display needed),
summary statistics, every version's lineage up to this one, and the run's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from prefmill.flows.training import DATA_DIR
from prefmill.storage.catalog import Catalog, CatalogError, Version


@dataclass(frozen=True)
class Plot:
    """One picture: which columns (one histogram each, overlaid) and how to label it."""

    name: str
    title: str
    xlabel: str
    columns: tuple[tuple[str, str], ...]  # (column, legend label)
    bounds: tuple[float, float] | None = None  # fixed x range for scores that live in one (probabilities)


PLOTS = (
    Plot("reward", "Follow-up likelihood reward", "FLR reward (satisfied − dissatisfied follow-up log-lik.)",
         (("chosen_reward", "chosen"), ("rejected_reward", "rejected"))),
    Plot("factuality", "Claim factuality", "share of supported claims (weighted)",
         (("chosen_factuality", "chosen"), ("rejected_factuality", "rejected")), (0.0, 1.0)),
    Plot("margin", "Pair margin", "composite score: chosen − rejected", (("margin", "margin"),)),
    Plot("win_prob", "Win probability", "win probability (soft label)",
         (("chosen_win_prob", "P(chosen ≻ rejected)"), ("chosen_mean_win_prob", "chosen, mean over candidates"),
          ("rejected_mean_win_prob", "rejected, mean over candidates")), (0.0, 1.0)),
)
STAT_COLUMNS = ("score_chosen", "score_rejected", "chosen_reward", "rejected_reward", "chosen_factuality",
                "rejected_factuality", "margin", "chosen_win_prob")


def write_card(catalog: Catalog, dataset: str, output: Path, version: int | None = None) -> Path:
    """Write `output/README.md` and one PNG per score plot for `dataset` at `version` (default latest)."""
    history = _history(catalog.versions(dataset), version)
    table = catalog.read(dataset, history[-1].version)
    output.mkdir(parents=True, exist_ok=True)
    pictures = [_plot(table, plot, output / f"{plot.name}.png") for plot in PLOTS]
    text = "\n".join([_header(dataset, history[-1], table, output), _body(dataset, history, table, pictures)])
    card = output / "README.md"
    card.write_text(text)
    return card


def _history(versions: list[Version], version: int | None) -> list[Version]:
    """The versions up to and including the one asked for (a snapshot id maps to the last version at it)."""
    upto = [v for v in versions if version is None or v.version <= version]
    if not upto:
        raise CatalogError(f"no version at or before {version}; versions: {[v.version for v in versions]}")
    return upto


def _plot(table: pa.Table, plot: Plot, path: Path) -> Path:
    """A histogram per column, overlaid on shared bins; a labelled empty frame when no value is set."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    series = {label: _values(table, column) for column, label in plot.columns}
    values = [v for vs in series.values() for v in vs]
    if values:
        bins = _bins(*(plot.bounds or (min(values), max(values))))
        for label, column_values in series.items():
            if column_values:
                ax.hist(column_values, bins=bins, alpha=0.55, label=f"{label} (n={len(column_values)})")
        ax.margins(y=0.1 + 0.1 * len(series))  # headroom for the legend, one line per series
        ax.legend(fontsize="small", loc="upper center")
    else:
        ax.text(0.5, 0.5, "no values in this version", ha="center", va="center", transform=ax.transAxes)
    if plot.bounds:
        ax.set_xlim(*plot.bounds)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(plot.title)
    ax.set_xlabel(plot.xlabel)
    ax.set_ylabel("pairs")
    fig.savefig(path)
    return path


def _values(table: pa.Table, column: str) -> list[float]:
    if column not in table.column_names:
        return []
    return [v for v in table.column(column).to_pylist() if v is not None]


def _bins(low: float, high: float, count: int = 20) -> list[float]:
    if low == high:
        low, high = low - 0.5, high + 0.5
    return [low + (high - low) * i / count for i in range(count + 1)]


def _header(dataset: str, version: Version, table: pa.Table, output: Path) -> str:
    """The YAML block the Hub reads; `configs` only when split files from `export --format trl` are here."""
    meta: dict[str, Any] = {
        "pretty_name": f"prefmill {dataset} v{version.version}",
        "tags": ["dpo", "preference", "synthetic", "prefmill", "trl"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(table.num_rows)],
    }
    splits = sorted({p.name.split("-")[0] for p in (output / DATA_DIR).glob("*.parquet")})
    if splits:
        files = [{"split": s, "path": f"{DATA_DIR}/{s}-*"} for s in splits]
        meta["configs"] = [{"config_name": "default", "data_files": files}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < limit:
            return name
    return "n>1M"


def _body(dataset: str, history: list[Version], table: pa.Table, pictures: list[Path]) -> str:
    version = history[-1]
    sections = [
        f"# {dataset}, version {version.version}\n",
        "Synthetic preference pairs made by prefmill (by `source`: self-chat candidates ranked by follow-up "
        "likelihood rewards and claim critiques; verifier-graded solutions, IRPO; first wrong steps, Step-DPO; "
        "gold vs own replies, SPIN). Format: TRL explicit conversational — `prompt` is a list of messages, "
        "`chosen` and `rejected` hold one assistant message each — plus ids, scores and soft labels.\n",
        "## Counts\n", _counts(table), _training_notes(table),
        "## Score distributions\n", *[f"![{p.stem}]({p.name})\n" for p in pictures], _stats(table),
        "## Lineage\n", _lineage_table(history),
        "```json\n" + json.dumps({k: v for k, v in version.lineage.items() if k not in ("config", "card")},
                                 indent=2, default=str) + "\n```\n",
        "## Config\n", "```json\n" + json.dumps(version.lineage.get("config", {}), indent=2, default=str) + "\n```\n",
        "## Load\n", _usage(dataset, version.version),
    ]
    return "\n".join(sections)


def _counts(table: pa.Table) -> str:
    rows = [("pairs", table.num_rows)]
    for column, label in (("prompt_id", "prompts"), ("seed_id", "seeds"), ("conversation_id", "conversations")):
        if column in table.column_names:
            rows.append((label, pc.count_distinct(table.column(column)).as_py()))
    for side in ("chosen", "rejected"):
        column = f"{side}_revised_from"
        if column in table.column_names:
            rows.append((f"{side} replies revised by the critic", table.num_rows - table.column(column).null_count))
    for column in ("source", "iteration", "strategy", "policy_model", "policy_id", "scorer_model", "critic_model"):
        if column in table.column_names:
            rows.append((column, _tally(table.column(column))))
    return _markdown_table(("", "count"), rows)


TRAINING_NOTES = {
    "irpo": "IRPO pairs train with DPO plus an NLL term on the chosen solution: TRL's `DPOConfig(rpo_alpha=1.0)`.",
    "step_dpo": "A Step-DPO pair's prompt ends with an assistant turn holding the correct steps so far; the TRL "
                "export moves those steps to the front of both replies (a shared prefix cancels in the DPO loss, "
                "so it weighs only the step).",
    "spin": "SPIN pairs choose the gold answer over iteration `iteration`'s own reply; select earlier iterations' "
            "pairs by SQL (`WHERE iteration < n`) to mix them in.",
    "refuel": "REFUEL pairs continue a shared multi-turn prefix with two whole futures (simulated-user turns "
              "included): DPO reads them as multi-message chosen/rejected, but then puts the simulated user's "
              "tokens into its loss too, which REFUEL leaves out: prefer a trainer that masks non-assistant "
              "turns. REFUEL/REBEL-style trainers regress `future_reward_diff` (per-turn rewards in "
              "`chosen_turn_rewards` / `rejected_turn_rewards`).",
}


def _training_notes(table: pa.Table) -> str:
    """How to train on the sources present (IRPO's NLL term, Step-DPO's continued prompt, SPIN's rounds)."""
    sources = set(table.column("source").to_pylist()) if "source" in table.column_names else set()
    notes = [f"- {TRAINING_NOTES[s]}" for s in sorted(sources) if s in TRAINING_NOTES]
    return "\n## Training\n\n" + "\n".join(notes) + "\n" if notes else ""


def _tally(column: pa.ChunkedArray) -> str:
    counts = pc.value_counts(column).to_pylist()
    return ", ".join(f"{c['values']}: {c['counts']}" for c in sorted(counts, key=lambda c: -c["counts"]))


def _stats(table: pa.Table) -> str:
    rows = []
    for column in STAT_COLUMNS:
        values = _values(table, column)
        if values:
            ordered = sorted(values)
            rows.append((column, len(values), f"{ordered[0]:.3f}", f"{sum(values) / len(values):.3f}",
                         f"{ordered[len(ordered) // 2]:.3f}", f"{ordered[-1]:.3f}"))
    return _markdown_table(("score", "n", "min", "mean", "median", "max"), rows)


def _lineage_table(history: list[Version]) -> str:
    rows = [(v.version, v.rows_added, v.row_count, v.lineage.get("run_id", ""), v.lineage.get("config_hash", ""),
             json.dumps(v.lineage["parents"]) if "parents" in v.lineage else "",
             v.created_at.isoformat(timespec="seconds")) for v in history]
    return _markdown_table(("version", "rows added", "rows", "run", "config hash", "parents", "created"), rows)


def _usage(dataset: str, version: int) -> str:
    return ("```bash\n"
            f"prefmill export {dataset} --format trl --version {version} --test-size 0.1 --seed 0 "
            f"--output {dataset}_trl\n"
            "```\n\n```python\nfrom datasets import load_dataset\n"
            f'splits = load_dataset("parquet", data_dir="{dataset}_trl")  # train / test, split by prompt\n```\n')


def _markdown_table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
