"""Self-chat and candidate sampling as one request stream.

Run one after the other, candidate sampling waits for the slowest conversation and self-chat's later
turns run in small batches (only as many requests as there are conversations). Here the candidates of a
context are requested the moment that context is known: for the last context of a conversation, as soon
as its final user turn exists, so they run alongside the final assistant reply to the same prompt (which
the engine's prefix cache shares) and keep the batch full. Same seeds, same rows as running
`SelfChat` and then `CandidateSampler` on `contexts(conversations, which)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa

from prefmill.operators.branching import Branching
from prefmill.operators.candidates import CandidateSampler, context_ends, context_row
from prefmill.operators.selfchat import Dialogues, Progress, SelfChat
from prefmill.operators.streams import run_requests
from prefmill.schemas.config import CandidatesSection
from prefmill.schemas.tables import CANDIDATES
from prefmill.serving.protocols import Completion, LanguageModel, Request


@dataclass(frozen=True)
class RolloutTables:
    conversations: pa.Table
    candidates: pa.Table
    branches: pa.Table | None = None  # with branching on (REFUEL)


@dataclass(frozen=True)
class Rollout:
    selfchat: SelfChat = field(default_factory=SelfChat)
    sampler: CandidateSampler = field(default_factory=CandidateSampler)
    contexts: str = CandidatesSection().contexts
    branching: Branching | None = None  # branch the conversations (REFUEL) in the same request stream

    def __post_init__(self):
        if self.contexts not in {"all", "last"}:
            raise ValueError(f"contexts must be 'all' or 'last', got {self.contexts!r}")

    def __call__(self, seeds: list[dict], assistant: LanguageModel, simulator: LanguageModel | None = None,
                 progress: Progress | None = None, teacher: LanguageModel | None = None) -> RolloutTables:
        """Conversations (one per seed) and the candidates of their contexts; candidates come from the
        assistant model, plus one per context from the `teacher` when there is one."""
        simulator = simulator or assistant
        dialogues = Dialogues(self.selfchat, seeds, progress, (assistant.name, simulator.name))
        asked: set[tuple[int, int]] = set()
        rows: dict[tuple[int, int], list[dict]] = {}

        def on_done(request: Request, completions: list[Completion]) -> list[Request]:
            kind, i, end = request.key
            if kind == "candidates":
                rows[i, end] = self.sampler.rows(self._context(dialogues, i, end), completions, assistant.name)
                return []
            return self._turn_done(dialogues, request, completions, asked)

        first = dialogues.first_requests()
        first += [r for i in range(len(seeds)) for r in self._candidate_requests(dialogues, i, asked)]
        first += [r for i in range(len(seeds)) for r in self._branch_requests(dialogues, i)]
        run_requests({"assistant": assistant, "simulator": simulator}, first, on_done)
        if teacher is not None:
            self._add_teacher(dialogues, rows, teacher)
        candidates = [row for key in sorted(rows) for row in rows[key]]
        return RolloutTables(dialogues.table(),
                             pa.Table.from_pylist(candidates, schema=CANDIDATES), self._branches(dialogues))

    def _candidate_requests(self, dialogues: Dialogues, i: int, asked: set[tuple[int, int]]) -> Iterator[Request]:
        """Requests for conversation i's contexts that are known now and were not asked for yet."""
        if self.contexts == "last" and not dialogues.last_context_known(i):
            return
        messages = dialogues.messages(i)
        for end in context_ends(messages, self.contexts):
            if (i, end) not in asked:
                asked.add((i, end))
                yield Request(("candidates", i, end), list(messages[: end + 1]), self.sampler.sampling, "assistant")

    def _add_teacher(self, dialogues: Dialogues, rows: dict[tuple[int, int], list[dict]], teacher: LanguageModel
                     ) -> None:
        """The teacher's reply to every context, in one batch after self-chat: it is another model (often a
        server), whose requests would break the assistant's single request stream into waves."""
        keys = sorted(rows)
        contexts = [self._context(dialogues, i, end) for i, end in keys]
        replies = teacher.chat([ctx["context"] for ctx in contexts], self.sampler.teacher_sampling) if keys else []
        for key, ctx, [reply] in zip(keys, contexts, replies, strict=True):
            policy = [row["reply"] for row in rows[key]]
            rows[key].append(self.sampler.teacher_row(ctx, reply, teacher.name, policy))

    @staticmethod
    def _context(dialogues: Dialogues, i: int, end: int) -> dict:
        return context_row(dialogues.conversation_id(i), dialogues.seed_id(i), dialogues.messages(i), end)

    def _turn_done(self, dialogues: Dialogues, request: Request, completions: list[Completion],
                   asked: set[tuple[int, int]]) -> list[Request]:
        """A self-chat turn's follow-ups: the conversation's next turn, the candidates of a context it made known
        and the branches whose prefix it completed; a branch gets only its own next turn (no candidates)."""
        i = request.key[1]
        follow_ups = dialogues.take(request, completions)
        if dialogues.is_branch(i):
            return follow_ups
        return [*follow_ups, *self._branch_requests(dialogues, i), *self._candidate_requests(dialogues, i, asked)]

    def _branch_requests(self, dialogues: Dialogues, i: int) -> list[Request]:
        return self.branching.requests(dialogues, i) if self.branching else []

    def _branches(self, dialogues: Dialogues) -> pa.Table | None:
        return self.branching.table(dialogues) if self.branching else None
