"""Preference pairs: per context, score every candidate (and every critique-revised reply) and mine
chosen/rejected pairs in TRL's explicit conversational format.

Composite score = `flr_weight` · FLR reward + `factuality_weight` · factuality score + `judge_weight` ·
rubric-judge score (the mean of the reply's aspect scores, 1-5, from the `judgements` table), each
normalised within its context. Default normalisation `pooled`: subtract the context's mean (a prompt that
makes every follow-up likely, or whose source makes every claim checkable, says nothing about which reply is
better), then divide by the spread of those within-context deviations pooled over the whole batch (so the
parts are on one scale). Dividing by each context's own spread (`context`, a per-context z-score) would
blow two replies that differ by noise up to a full unit apart and make the margin meaningless.

Strategies (a pair is kept only at or above `min_margin`):
- `best_worst`: the best against the worst reply of the context;
- `best_vs_random_lower`: the best against a seeded random reply at least `min_margin` below it
  (UltraFeedback binarisation, as in Zephyr);
- `all_above_margin`: every ordered pair at or above the margin, largest margins first, at most
  `max_pairs_per_context`.
Chosen and rejected are never the same text: identical replies are merged before mining. A context
that cannot give a pair, and a candidate that cannot compete (no FLR reward; no factuality score when
critiques ran and weigh in; no judge score on every aspect when `judge_weight` > 0), becomes a
`pair_rejects` row with the reason; a context whose candidates were never sampled because it does not fit
the model's context window is one `prompt_too_long` row. Each pair keeps SPPO-style soft labels:
`P[i][j] = σ(s_i − s_j)`; `chosen_win_prob` = `P[chosen][rejected]`; each side's mean win probability over the
other replies of the context. Each pair records both replies' judge scores (`chosen_judge`, `rejected_judge`)
whenever the judge ran, weighed in or not.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from statistics import fmean

import pyarrow as pa

from prefmill.operators.gates import reply_gate
from prefmill.operators.ids import stable_id
from prefmill.operators.judge import judge_scores
from prefmill.schemas.config import PairsSection
from prefmill.schemas.tables import CANDIDATES, PAIR_REJECTS, PAIRS
from prefmill.serving.protocols import PROMPT_TOO_LONG

STRATEGIES = ("best_worst", "best_vs_random_lower", "all_above_margin")
NORMALIZATIONS = ("pooled", "context", "none")


@dataclass(frozen=True)
class MinedPairs:
    pairs: pa.Table
    rejects: pa.Table


@dataclass
class Scored:
    """One reply competing in its context."""

    row: dict
    reward: float
    factuality: float | None
    revised_from: str | None
    judge: float | None = None
    score: float = 0.0


def revised_id(candidate_id: str, text: str) -> str:
    return stable_id("rev", candidate_id, text)


def revised_candidates(candidates: pa.Table, critiques: pa.Table) -> pa.Table:
    """CANDIDATES rows for the replies a critique revised, each with its own id (score them with FLR
    too, then mine over candidates + these). The original is found again through `critiques`."""
    by_id = {c["candidate_id"]: c for c in candidates.to_pylist()}
    rows = []
    for critique in critiques.to_pylist():
        original = by_id.get(critique["candidate_id"])
        text = (critique["final_response"] or "").strip()
        if original is None or not text or _norm(text) == _norm(original["reply"]):
            continue
        rows.append({**original, "candidate_id": revised_id(original["candidate_id"], text), "reply": text,
                     "num_tokens": None, "finish_reason": "revised", "is_duplicate": False,
                     "model": critique["critic_model"], "is_teacher": False})
    return pa.Table.from_pylist(rows, schema=CANDIDATES)


_DEFAULTS = PairsSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class PairMiner:
    """`__call__(candidates, rewards, critiques=None, run_id=None)` → `MinedPairs`."""

    strategy: str = _DEFAULTS.strategy
    flr_weight: float = _DEFAULTS.flr_weight
    factuality_weight: float = _DEFAULTS.factuality_weight
    judge_weight: float = _DEFAULTS.judge_weight
    normalization: str = _DEFAULTS.normalization
    min_margin: float = _DEFAULTS.min_margin
    max_pairs_per_context: int = _DEFAULTS.max_pairs_per_context
    seed: int = _DEFAULTS.seed

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"pairs strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"pairs normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.min_margin < 0 or self.max_pairs_per_context < 1:
            raise ValueError("pairs min_margin must be >= 0 and max_pairs_per_context >= 1")

    def __call__(self, candidates: pa.Table, rewards: pa.Table, critiques: pa.Table | None = None,
                 run_id: str | None = None, judgements: pa.Table | None = None) -> MinedPairs:
        rejects: list[dict] = []
        contexts = self._competitors(candidates, rewards, critiques, judgements, rejects)
        self.score(contexts)
        models = _models(rewards, critiques)
        pairs = []
        for context_id in sorted(contexts):
            pairs += self._mine(contexts[context_id], models, rejects)
        for row in pairs + rejects:
            row["run_id"] = run_id
        return MinedPairs(pa.Table.from_pylist(pairs, schema=PAIRS), pa.Table.from_pylist(rejects, schema=PAIR_REJECTS))

    def _competitors(self, candidates: pa.Table, rewards: pa.Table, critiques: pa.Table | None,
                     judgements: pa.Table | None, rejects: list[dict]) -> dict[str, list[Scored]]:
        """Replies that can compete, grouped by context; every other one becomes a reject row."""
        reward_of = dict(zip(rewards.column("candidate_id").to_pylist(), rewards.column("reward").to_pylist()))
        factuality, origin = _factuality(critiques)
        judged = judge_scores(judgements)
        contexts: dict[str, list[Scored]] = defaultdict(list)
        too_long: dict[str, dict] = {}
        for row in sorted(candidates.to_pylist(), key=lambda r: r["candidate_id"]):
            if row["finish_reason"] == PROMPT_TOO_LONG and not row.get("is_teacher"):
                too_long.setdefault(row["context_id"], row)
                continue
            problem = self._problem(row, reward_of, factuality, critiques is not None) or self._unjudged(row, judged)
            if problem:
                rejects.append(_reject(row, *problem))
                continue
            cid = row["candidate_id"]
            contexts[row["context_id"]].append(Scored(row, reward_of[cid], factuality.get(cid), origin.get(cid),
                                                      judged.get(cid, (None, None))[0]))
        rejects += [_context_reject(row, PROMPT_TOO_LONG, "the context does not fit the model's context window "
                                    "with the candidates' max_tokens: no reply was sampled", 0, None)
                    for _, row in sorted(too_long.items())]
        return {ctx: _distinct(group, rejects) for ctx, group in contexts.items()}

    def _problem(self, row: dict, reward_of: dict, factuality: dict, critiqued: bool) -> tuple[str, str] | None:
        if row["finish_reason"] == PROMPT_TOO_LONG:  # the teacher's window (the policy's are context rejects)
            return PROMPT_TOO_LONG, "the context does not fit the teacher's context window: it gave no reply"
        reward = reward_of.get(row["candidate_id"])
        if reward is None or math.isnan(reward):
            return "no_reward", "no FLR reward row for this candidate (score every candidate, revised ones too)"
        if critiqued and self.factuality_weight and factuality.get(row["candidate_id"]) is None:
            return "no_factuality", "no factuality score: not critiqued, or its claims did not parse"
        gate = reply_gate(row["reply"], row["context"])
        if gate:
            return gate, "the reply is empty" if gate == "empty_reply" else "the reply repeats the last user turn"
        return None

    def _unjudged(self, row: dict, judged: dict[str, tuple[float | None, str | None]]) -> tuple[str, str] | None:
        """Why a reply cannot compete when the judge weighs in and it has no judge score."""
        if not self.judge_weight:
            return None
        score, reason = judged.get(row["candidate_id"], (None, "not judged (is the judge stage on?)"))
        return None if score is not None else ("no_judge_score", f"no judge score: {reason}")

    def score(self, contexts: dict[str, list[Scored]]) -> None:
        """Each reply's composite score: its weighted parts, each normalised within its context."""
        flr = _normalised(contexts, lambda s: s.reward, self.normalization)
        fact = _normalised(contexts, lambda s: s.factuality, self.normalization)
        judge = _normalised(contexts, lambda s: s.judge, self.normalization)
        for group in contexts.values():
            for s in group:
                s.score = (self.flr_weight * flr[id(s)] + self.factuality_weight * fact.get(id(s), 0.0)
                           + self.judge_weight * judge.get(id(s), 0.0))

    def _mine(self, group: list[Scored], models: dict[str, str | None], rejects: list[dict]) -> list[dict]:
        ranked = sorted(group, key=lambda s: (-s.score, s.row["candidate_id"]))
        if len(ranked) < 2:
            rejects.append(_context_reject(ranked[0].row if ranked else None, "fewer_than_two_candidates",
                                           "fewer than two distinct usable replies", len(ranked), None))
            return []
        best_margin = ranked[0].score - ranked[-1].score
        chosen_rejected = self._select(ranked)
        if not chosen_rejected:
            reason = "tie" if best_margin == 0 else "under_margin"
            detail = f"best margin {best_margin:.4f} < min_margin {self.min_margin}"
            rejects.append(_context_reject(ranked[0].row, reason, detail, len(ranked), best_margin))
            return []
        return [self._pair(c, r, ranked, models) for c, r in chosen_rejected]

    def _select(self, ranked: list[Scored]) -> list[tuple[Scored, Scored]]:
        """(chosen, rejected) pairs of one context by the strategy, all at or above the margin."""
        best = ranked[0]
        if self.strategy == "best_worst":
            return [(best, ranked[-1])] if self._enough(best, ranked[-1]) else []
        if self.strategy == "best_vs_random_lower":
            lower = [s for s in ranked[1:] if self._enough(best, s)]
            rng = random.Random(stable_id("pick", self.seed, best.row["context_id"]))
            return [(best, rng.choice(lower))] if lower else []
        every = [(a, b) for i, a in enumerate(ranked) for b in ranked[i + 1:] if self._enough(a, b)]
        every.sort(key=lambda ab: (-_margin(*ab), ab[0].row["candidate_id"], ab[1].row["candidate_id"]))
        return every[: self.max_pairs_per_context]

    def _enough(self, chosen: Scored, rejected: Scored) -> bool:
        """A strictly better chosen reply, by at least `min_margin` (a tie never makes a pair)."""
        margin = _margin(chosen, rejected)
        return margin > 0 and margin >= self.min_margin

    def _pair(self, chosen: Scored, rejected: Scored, ranked: list[Scored], models: dict[str, str | None]) -> dict:
        c, r = chosen.row, rejected.row
        return {
            "pair_id": stable_id("pair", c["context_id"], c["candidate_id"], r["candidate_id"], asdict(self)),
            "prompt_id": c["context_id"], "prompt": c["context"],
            "chosen": [{"role": "assistant", "content": c["reply"]}],
            "rejected": [{"role": "assistant", "content": r["reply"]}],
            "chosen_candidate_id": c["candidate_id"], "rejected_candidate_id": r["candidate_id"],
            "chosen_revised_from": chosen.revised_from, "rejected_revised_from": rejected.revised_from,
            "score_chosen": chosen.score, "score_rejected": rejected.score,
            "chosen_reward": chosen.reward, "rejected_reward": rejected.reward,
            "chosen_factuality": chosen.factuality, "rejected_factuality": rejected.factuality,
            "chosen_judge": chosen.judge, "rejected_judge": rejected.judge,
            "margin": _margin(chosen, rejected), "chosen_win_prob": win_prob(chosen.score, rejected.score),
            "chosen_mean_win_prob": mean_win_prob(chosen, ranked),
            "rejected_mean_win_prob": mean_win_prob(rejected, ranked),
            "num_candidates": len(ranked), "strategy": self.strategy,
            "chosen_is_teacher": bool(c.get("is_teacher")), "rejected_is_teacher": bool(r.get("is_teacher")),
            "conversation_id": c["conversation_id"], "seed_id": c["seed_id"],
            "policy_model": _policy_model(chosen, ranked), **models,
        }


def win_prob(s_i: float, s_j: float) -> float:
    """SPPO's `P[i][j] = σ(s_i − s_j)`: how likely reply i beats reply j."""
    return 1.0 / (1.0 + math.exp(s_j - s_i))


def mean_win_prob(reply: Scored, ranked: list[Scored]) -> float:
    """The reply's mean win probability against every other reply of its context."""
    return fmean(win_prob(reply.score, other.score) for other in ranked if other is not reply)


def _margin(a: Scored, b: Scored) -> float:
    return a.score - b.score


def _normalised(contexts: dict[str, list[Scored]], value, how: str) -> dict[int, float]:
    """Each reply's value centred on its context's mean and scaled (see the module docstring); replies
    with no value (factuality when critiques are off) are left out."""
    centred: dict[int, float] = {}
    spread: dict[str, float] = {}
    for ctx, group in contexts.items():
        values = [(s, value(s)) for s in group if value(s) is not None]
        if not values:
            continue
        mean = fmean(v for _, v in values)
        for s, v in values:
            centred[id(s)] = v - mean if how != "none" else v
        spread[ctx] = math.sqrt(fmean((v - mean) ** 2 for _, v in values))
    if how == "none":
        return centred
    if how == "pooled":
        squares = [d * d for d in centred.values()]
        pooled = math.sqrt(fmean(squares)) if squares else 0.0
        return {k: d / pooled if pooled else 0.0 for k, d in centred.items()}
    owner = {id(s): ctx for ctx, group in contexts.items() for s in group}
    return {k: d / spread[owner[k]] if spread[owner[k]] else 0.0 for k, d in centred.items()}


def _factuality(critiques: pa.Table | None) -> tuple[dict[str, float | None], dict[str, str]]:
    """Factuality per reply id (the original's first-round score, a revision's last-round score) and
    which original each revised reply came from."""
    scores: dict[str, float | None] = {}
    origin: dict[str, str] = {}
    for row in (critiques.to_pylist() if critiques is not None else []):
        scores[row["candidate_id"]] = row["initial_score"]
        text = (row["final_response"] or "").strip()
        if text:
            rid = revised_id(row["candidate_id"], text)
            scores[rid], origin[rid] = row["final_score"], row["candidate_id"]
    return scores, origin


def _distinct(group: list[Scored], rejects: list[dict]) -> list[Scored]:
    """One reply per distinct text (whitespace and case folded); later copies become reject rows."""
    seen: dict[str, Scored] = {}
    for s in group:
        key = _norm(s.row["reply"])
        if key in seen:
            rejects.append(_reject(s.row, "duplicate_reply", f"same text as {seen[key].row['candidate_id']}"))
        else:
            seen[key] = s
    return list(seen.values())


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _reject(row: dict, reason: str, detail: str) -> dict:
    return {"prompt_id": row["context_id"], "candidate_id": row["candidate_id"], "seed_id": row["seed_id"],
            "reason": reason, "detail": detail, "num_candidates": None, "best_margin": None}


def _context_reject(row: dict | None, reason: str, detail: str, n: int, margin: float | None) -> dict:
    return {"prompt_id": row["context_id"] if row else None, "candidate_id": None,
            "seed_id": row["seed_id"] if row else None, "reason": reason, "detail": detail,
            "num_candidates": n, "best_margin": margin}


def _models(rewards: pa.Table, critiques: pa.Table | None) -> dict[str, str | None]:
    def first(table: pa.Table | None, column: str) -> str | None:
        return table.column(column)[0].as_py() if table is not None and table.num_rows else None
    return {"scorer_model": first(rewards, "scorer_model"), "critic_model": first(critiques, "critic_model")}


def _policy_model(chosen: Scored, ranked: list[Scored]) -> str:
    """The model that sampled the context's replies (a revision's original came from it too; not the teacher)."""
    originals = [s.row["model"] for s in ranked if s.revised_from is None and not s.row.get("is_teacher")]
    return originals[0] if originals else chosen.row["model"]
