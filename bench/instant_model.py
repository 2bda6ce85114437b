"""Models that answer at once, so `bench/pipeline.py --fake-model` measures the pipeline's orchestration alone
(Prefect tasks, shard store, scheduling), not generation."""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from typing import Iterable, Sequence

from prefmill.serving.hosts import ModelHost
from prefmill.serving.protocols import Completion, Conversation, Message, OnDone, Request, Sampling, ScoredPrefix

REPLY = "Light scatters off the air, and short wavelengths scatter the most."


def logprobs(message: Message) -> list[float]:
    """One log-probability per word: every continuation equally likely, so no candidate outranks another."""
    return [-1.0] * len(message["content"].split())


class InstantModel:
    """A streaming `LanguageModel` whose every reply is `REPLY`, returned at once."""

    def __init__(self, name: str):
        self.name = name

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        reply = Completion(REPLY, len(REPLY.split()), "stop")
        return [[reply] * sampling.n for _ in conversations]

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        return [logprobs(c) for c in continuations]

    def stream(self, requests: Iterable[Request], on_done: OnDone) -> None:
        waiting = deque(requests)
        while waiting:
            request = waiting.popleft()
            waiting.extend(on_done(request, self.chat([request.conversation], request.sampling)[0]))


class InstantScorer:
    """A `ContinuationScorer` that gives every continuation the same log-probabilities at once."""

    def __init__(self, name: str):
        self.name = name

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        return [ScoredPrefix([logprobs(c) for c in continuations]) for _ in prefixes]


class InstantHost(ModelHost):
    """A `ModelHost` whose chat models and scorers are all instant (nothing is loaded)."""

    def _open(self, spec: str) -> InstantModel:
        return InstantModel(spec)

    def _open_scorer(self, spec: str) -> tuple[InstantScorer, nullcontext]:
        """The scorer and what its callers hold while scoring: nothing, they need not take turns."""
        return InstantScorer(spec), nullcontext()
