"""Candidate replies: for each context (a conversation prefix ending in a user turn) sample n replies.

Sample k of a context uses seed `seed + k` (vLLM gives each of the n samples of a seeded request its
own seed this way), recorded per row. Replies identical to an earlier sample of the same context
(after whitespace and case folding) are flagged `is_duplicate`. A context that does not fit the model's
context window with `max_tokens` gets its n rows all the same: empty replies finished `PROMPT_TOO_LONG`, so
the context is on record and pair mining rejects it with that reason. An optional teacher (DNO) adds one
reply per context from another model, flagged `is_teacher`, which pair mining ranks like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pyarrow as pa

from prefmill.operators.ids import stable_id
from prefmill.schemas.config import CandidatesSection
from prefmill.schemas.tables import CANDIDATES
from prefmill.serving.protocols import PROMPT_TOO_LONG, Completion, LanguageModel, Sampling


def contexts(conversations: pa.Table, which: str = "all") -> list[dict]:
    """Context rows from conversations: every prefix ending in a user turn (`all`) or only the last."""
    if which not in {"all", "last"}:
        raise ValueError(f"contexts must be 'all' or 'last', got {which!r}")
    return [context_row(conv["conversation_id"], conv["seed_id"], conv["messages"], end)
            for conv in conversations.to_pylist() for end in context_ends(conv["messages"], which)]


def context_ends(messages: list[dict], which: str) -> list[int]:
    """Indices of the user turns that end a context: every one (`all`) or only the last."""
    ends = [k for k, m in enumerate(messages) if m["role"] == "user"]
    return ends if which == "all" else ends[-1:]


def context_row(conversation_id: str, seed_id: str, messages: list[dict], end: int) -> dict:
    """The context made of `messages[: end + 1]` (which must end in a user turn)."""
    if messages[end]["role"] != "user":
        role = messages[end]["role"]
        raise ValueError(f"a context ends in a user turn; message {end} of {conversation_id} is {role}")
    return {"context_id": stable_id("ctx", conversation_id, end), "conversation_id": conversation_id,
            "seed_id": seed_id, "context": list(messages[: end + 1])}


_DEFAULTS = CandidatesSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class CandidateSampler:
    n: int = _DEFAULTS.n
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    max_tokens: int = _DEFAULTS.max_tokens
    seed: int = _DEFAULTS.seed

    def __call__(self, context_rows: list[dict], lm: LanguageModel) -> pa.Table:
        """n candidate replies per context, as a `candidates` table."""
        replies = lm.chat([row["context"] for row in context_rows], self.sampling) if context_rows else []
        rows = [row for ctx, samples in zip(context_rows, replies, strict=True)
                for row in self.rows(ctx, samples, lm.name)]
        return pa.Table.from_pylist(rows, schema=CANDIDATES)

    @property
    def sampling(self) -> Sampling:
        return Sampling(n=self.n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                        seed=self.seed)

    @property
    def teacher_sampling(self) -> Sampling:
        """The teacher's one reply per context: the candidates' sampling, with the seed after the policy's n."""
        return Sampling(n=1, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                        seed=self.seed + self.n)

    def teacher_row(self, ctx: dict, reply: Completion, model: str, policy_replies: list[str]) -> dict:
        """The `candidates` row of the teacher's reply to a context (DNO), flagged `is_teacher`; a copy of one of
        the policy's replies is flagged `is_duplicate`."""
        duplicate = _fold(reply.text) in {_fold(text) for text in policy_replies}
        row = self._row(ctx, self.n, reply, duplicate and reply.finish_reason != PROMPT_TOO_LONG, model)
        return row | {"candidate_id": stable_id("teacher", ctx["context_id"], asdict(self), model),
                      "is_teacher": True}

    def rows(self, ctx: dict, samples: list[Completion], model: str) -> list[dict]:
        """The `candidates` rows of one context's samples, later copies of a reply flagged."""
        rows, seen = [], set()
        for k, reply in enumerate(samples):
            key = _fold(reply.text)
            rows.append(self._row(ctx, k, reply, key in seen and reply.finish_reason != PROMPT_TOO_LONG, model))
            seen.add(key)
        return rows

    def _row(self, ctx: dict, k: int, reply, duplicate: bool, model: str) -> dict:
        return {
            "candidate_id": stable_id("cand", ctx["context_id"], asdict(self), k, model),
            "context_id": ctx["context_id"], "conversation_id": ctx["conversation_id"], "seed_id": ctx["seed_id"],
            "context": ctx["context"], "reply": reply.text, "sample_index": k, "sampling_seed": self.seed + k,
            "num_tokens": reply.num_tokens, "finish_reason": reply.finish_reason, "is_duplicate": duplicate,
            "model": model, "is_teacher": False,
        }


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()
