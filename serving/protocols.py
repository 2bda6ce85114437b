"""The two protocols the operators program against, and the plain data they exchange.

Nothing here imports ray or vllm, so `operators/` may import this module (and only this one) from
serving/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, TypedDict


class Message(TypedDict):
    role: str
    content: str


Conversation = list[Message]


@dataclass(frozen=True)
class Sampling:
    """How to sample: the knobs every backend understands."""

    n: int = 1
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: dict[str, Any] | None = field(default=None, hash=False, compare=False)


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str


class LanguageModel(Protocol):
    """A chat model that can sample replies and score given continuations."""

    name: str

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        """`sampling.n` completions per conversation, in input order."""
        ...

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation's content, appended as the next turn."""
        ...


class AsyncLanguageModel(LanguageModel, Protocol):
    """A `LanguageModel` that also takes one conversation at a time, for flows that chain calls per
    conversation (the engine batches whatever is in flight)."""

    async def achat(self, conversation: Conversation, sampling: Sampling) -> list[Completion]:
        ...


@dataclass(frozen=True)
class ScoredPrefix:
    """Per-token log-probabilities of each continuation after one prefix, and how many prefix tokens
    were cut from the left to fit the model's context."""

    logprobs: list[list[float]]
    truncated_tokens: int = 0


class ContinuationScorer(Protocol):
    """Scores the same continuations after many prefixes (what follow-up likelihood rewards need)."""

    name: str

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        """For each prefix, the logprobs of every continuation appended as the next turn."""
        ...


class Embedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str]) -> Any:
        """A float32 array of shape (len(texts), dim), L2-normalised."""
        ...
