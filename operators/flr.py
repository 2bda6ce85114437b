"""Follow-up likelihood rewards (FLR, "Aligning Language Models Using Follow-up Likelihood as Reward
Signal", 2024).

A reply is good when a satisfied user follow-up is likely after it and a dissatisfied one unlikely:
reward = mean over positive follow-ups of their score − the same over negative ones, where a follow-up's
score is the mean (or sum) of its per-token log-probabilities as the next user turn after context + reply.
Per-aspect rewards (understanding, relevance, …) are kept beside the total. A candidate that was never
sampled (its context did not fit the model's context window, finish reason `PROMPT_TOO_LONG`) has no reply
to score and gets no reward row; pair mining rejects its context with that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Sequence

import pyarrow as pa

from prefmill.schemas.config import FLRSection
from prefmill.schemas.tables import REWARDS
from prefmill.serving.protocols import PROMPT_TOO_LONG, ContinuationScorer, Message, ScoredPrefix

DEFAULT_FOLLOWUPS = Path(__file__).with_name("data") / "followups.json"
AGGREGATIONS = ("mean", "sum")


@dataclass(frozen=True)
class FollowUp:
    aspect: str
    polarity: str  # "positive" | "negative"
    text: str


class FollowUpFileError(ValueError):
    """A follow-up set file that cannot be read or has the wrong shape."""


_SHAPE = '{"aspect": {"positive": ["..."], "negative": ["..."]}}'


def load_followups(path: Path | str = DEFAULT_FOLLOWUPS) -> tuple[FollowUp, ...]:
    """Follow-ups from a JSON file shaped {aspect: {"positive": [...], "negative": [...]}}."""
    path = Path(path)
    out = []
    for aspect, sets in _read_object(path).items():
        if aspect.startswith("_"):
            continue
        if not isinstance(sets, dict) or set(sets) - {"positive", "negative"}:
            raise FollowUpFileError(f"{path}: aspect '{aspect}' must map to {{'positive': [...], 'negative': [...]}}")
        for polarity in ("positive", "negative"):
            texts = sets.get(polarity, [])
            if not isinstance(texts, list):
                raise FollowUpFileError(f"{path}: aspect '{aspect}' {polarity} must be a list of texts, "
                                        f"got {type(texts).__name__}")
            for text in texts:
                if not isinstance(text, str) or not text.strip():
                    raise FollowUpFileError(f"{path}: aspect '{aspect}' has an empty or non-text {polarity} "
                                            f"follow-up ({text!r}); every follow-up is a non-empty text")
                out.append(FollowUp(aspect, polarity, text.strip()))
    if not any(f.polarity == "positive" for f in out) or not any(f.polarity == "negative" for f in out):
        raise FollowUpFileError(f"{path}: needs at least one positive and one negative follow-up, shaped {_SHAPE}")
    return tuple(out)


def _read_object(path: Path) -> dict:
    """The file's top-level JSON object, or a `FollowUpFileError` naming the file, line and the shape."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise FollowUpFileError(f"{path}: cannot read the follow-up file ({exc}); set flr.followups to a "
                                "JSON file, or leave it unset for the built-in set") from None
    except json.JSONDecodeError as exc:
        raise FollowUpFileError(f"{path}:{exc.lineno}: bad JSON at column {exc.colno}: {exc.msg}; "
                                f"expected {_SHAPE}") from None
    if not isinstance(data, dict):
        raise FollowUpFileError(f"{path}: expected a JSON object {_SHAPE}, got {type(data).__name__}")
    return data


_DEFAULTS = FLRSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class FollowUpReward:
    """Scores candidate replies. `__call__(candidates, scorer)` → a `rewards` table."""

    followups: tuple[FollowUp, ...] = field(default_factory=load_followups)
    aggregation: str = _DEFAULTS.aggregation
    max_tokens: int | None = _DEFAULTS.max_tokens

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    def __call__(self, candidates: list[dict], scorer: ContinuationScorer) -> pa.Table:
        candidates = [c for c in candidates if c.get("finish_reason") != PROMPT_TOO_LONG]
        if not candidates:
            return REWARDS.empty_table()
        prefixes = [reply_prefix(c) for c in candidates]
        continuations = [Message(role="user", content=f.text) for f in self.followups]
        scored = scorer.score_continuations(prefixes, continuations, self.max_tokens)
        rows = [self.reward_row(c, s, scorer.name) for c, s in zip(candidates, scored, strict=True)]
        return pa.Table.from_pylist(rows, schema=REWARDS)

    def reward_row(self, candidate: dict, scored: ScoredPrefix, scorer_name: str) -> dict:
        per_followup = [self._aggregate(lp) for lp in scored.logprobs]
        aspects = [self._aspect(a, per_followup) for a in dict.fromkeys(f.aspect for f in self.followups)]
        return {
            "candidate_id": candidate["candidate_id"], "context_id": candidate["context_id"],
            "reward": _difference(self.followups, per_followup),
            "aspects": aspects, "aggregation": self.aggregation,
            "truncated_tokens": scored.truncated_tokens, "scorer_model": scorer_name,
        }

    def _aggregate(self, logprobs: Sequence[float]) -> float:
        if not logprobs:
            raise ValueError("a follow-up scored to no tokens")
        return fmean(logprobs) if self.aggregation == "mean" else float(sum(logprobs))

    def _aspect(self, aspect: str, per_followup: list[float]) -> dict:
        pos = [s for f, s in zip(self.followups, per_followup) if f.aspect == aspect and f.polarity == "positive"]
        neg = [s for f, s in zip(self.followups, per_followup) if f.aspect == aspect and f.polarity == "negative"]
        positive, negative = (fmean(pos) if pos else None), (fmean(neg) if neg else None)
        score = positive - negative if positive is not None and negative is not None else None
        return {"aspect": aspect, "positive": positive, "negative": negative, "score": score}


def reply_prefix(candidate: dict) -> list[Message]:
    """The conversation a follow-up is scored after: the context plus the candidate reply."""
    return [*candidate["context"], Message(role="assistant", content=candidate["reply"])]


def _difference(followups: Sequence[FollowUp], per_followup: list[float]) -> float:
    pos = [s for f, s in zip(followups, per_followup) if f.polarity == "positive"]
    neg = [s for f, s in zip(followups, per_followup) if f.polarity == "negative"]
    return fmean(pos) - fmean(neg)
