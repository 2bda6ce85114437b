"""`prefmill show`: preference pairs in the terminal, with the critique behind each revised reply.

Rows come from the catalog's read-only SQL (`Catalog.sql`), so a `--where` filter can only read; it must be one
SQL expression (`storage.sql_guard.checked_condition`), so it can only filter. A side
whose reply was revised by the claim critic carries `*_revised_from` = the original candidate id; the
`critiques` row of that id holds the claims, verdicts and critiques that drove the revision.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from prefmill.storage.catalog import Catalog, CatalogError, validate_name
from prefmill.storage.sql_guard import checked_condition

CRITIQUES = "critiques"
PROMPT_TURNS = 3
EDIT_ACTIONS = ("fix", "remove")


def show_pairs(catalog: Catalog, dataset: str, version: int | None = None, where: str | None = None,
               limit: int = 5, console: Console | None = None) -> int:
    """Print up to `limit` pairs of `dataset` matching the SQL condition `where`; return how many."""
    console = console or Console()
    rows = select_pairs(catalog, dataset, version, where, limit).to_pylist()
    critiques = revision_critiques(catalog, dataset, version, rows)
    for row in rows:
        console.print(render_pair(row, critiques))
    console.print(f"{len(rows)} pair(s) shown")
    return len(rows)


def select_pairs(catalog: Catalog, dataset: str, version: int | None, where: str | None, limit: int) -> pa.Table:
    """The pairs of one version that match `where`, through the read-only SQL path. The condition is checked
    on its own first (one expression, nothing after it) and used as DuckDB's parser prints it back."""
    condition = f"WHERE ({checked_condition(where)})" if where else ""
    query = (f'SELECT * FROM (SELECT * FROM "{validate_name(dataset)}"{_at(version)}) {condition} '
             f"ORDER BY prompt_id, pair_id LIMIT {int(limit)}")
    return catalog.sql(query)


def revision_critiques(catalog: Catalog, dataset: str, version: int | None,
                       rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{original candidate_id: critiques row} for every revised side in `rows`. The critiques are read at the
    version the pairs version names as its parent, else at the pairs' own snapshot (a pipeline run publishes
    both in one); {} when the catalog has no critiques by then."""
    originals = sorted({r[k] for r in rows for k in ("chosen_revised_from", "rejected_revised_from") if r.get(k)})
    if not originals:
        return {}
    at = _lineage(catalog, dataset, version).get("parents", {}).get(CRITIQUES, version)
    try:
        known = catalog.versions(CRITIQUES)
    except CatalogError:
        return {}
    if at is not None and not any(v.version <= at for v in known):
        return {}
    ids = ", ".join("'" + i.replace("'", "''") + "'" for i in originals)
    query = f"SELECT * FROM {CRITIQUES}{_at(at)} WHERE candidate_id IN ({ids})"
    return {r["candidate_id"]: r for r in catalog.sql(query).to_pylist()}


def render_pair(row: dict[str, Any], critiques: dict[str, dict[str, Any]]) -> Panel:
    """One pair: the last prompt turns, chosen and rejected side by side with their scores, the pair's
    margin and win probability, and the critique of each revised side."""
    parts: list[Any] = [_prompt(row["prompt"]), _sides(row), _pair_scores(row)]
    for side in ("chosen", "rejected"):
        original = row.get(f"{side}_revised_from")
        if original:
            parts.append(_critique(side, original, critiques.get(original)))
    title = f"pair {row['pair_id']} · prompt {row['prompt_id']} · {row.get('strategy') or '?'}"
    return Panel(Group(*parts), title=title, title_align="left")


def _prompt(messages: list[dict[str, str]]) -> Text:
    shown = messages[-PROMPT_TURNS:]
    text = Text(f"… {len(messages) - len(shown)} earlier turn(s)\n", style="dim") if len(messages) > len(shown) \
        else Text()
    for message in shown:
        text.append(f"{message['role']}: ", style="bold cyan")
        text.append(message["content"] + "\n")
    text.rstrip()
    return text


def _sides(row: dict[str, Any]) -> Table:
    table = Table("chosen", "rejected", expand=True, show_lines=True)
    table.add_row(_reply(row["chosen"]), _reply(row["rejected"]))
    table.add_row(_side_scores(row, "chosen"), _side_scores(row, "rejected"))
    return table


def _reply(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def _side_scores(row: dict[str, Any], side: str) -> Text:
    text = Text(f"score {_num(row.get(f'score_{side}'))}  reward {_num(row.get(f'{side}_reward'))}  "
                f"factuality {_num(row.get(f'{side}_factuality'))}  mean win {_num(row.get(f'{side}_mean_win_prob'))}")
    if row.get(f"{side}_revised_from"):
        text.append(f"\nrevised from {row[f'{side}_revised_from']}", style="yellow")
    return text


def _pair_scores(row: dict[str, Any]) -> Text:
    return Text(f"margin {_num(row.get('margin'))}   P(chosen ≻ rejected) {_num(row.get('chosen_win_prob'))}   "
                f"candidates {row.get('num_candidates', '?')}", style="bold")


def _critique(side: str, original: str, critique: dict[str, Any] | None) -> Panel:
    """The claims the critic flagged (fixed or removed) in the original reply, with its written critique."""
    if critique is None:
        return Panel(Text(f"no critiques row for {original}", style="dim"), title=f"critique ({side})")
    body = Text(f"factuality {_num(critique.get('initial_score'))} → {_num(critique.get('final_score'))}\n")
    for round_ in critique.get("rounds") or []:
        for claim in _flagged(round_.get("claims") or []):
            body.append(f"round {round_['round']} · {claim['verdict']} · {claim['action']}: ", style="bold red")
            body.append(f"{claim['claim']}\n")
            body.append(f"  {claim.get('critique') or '(no critique text)'}\n", style="italic")
    body.rstrip()
    return Panel(body, title=f"critique that drove the {side} revision", border_style="yellow")


def _flagged(claims: list[dict[str, Any]]) -> list[dict[str, Any]]:
    edited = [c for c in claims if c.get("action") in EDIT_ACTIONS]
    return edited or [c for c in claims if c.get("verdict") in ("contradicted", "unverifiable")]


def _lineage(catalog: Catalog, dataset: str, version: int | None) -> dict[str, Any]:
    versions = catalog.versions(dataset)
    chosen = [v for v in versions if version is None or v.version <= version]
    return chosen[-1].lineage if chosen else {}


def _at(version: int | None) -> str:
    return "" if version is None else f" AT (VERSION => {int(version)})"


def _num(value: float | int | None) -> str:
    return "—" if value is None else f"{value:.3f}"
