"""The two protocols the operators program against, and the plain data they exchange.

Nothing here imports ray or vllm, so `operators/` may import this module (and only this one) from
serving/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Protocol, Sequence, TypedDict


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


# The finish reason of a request whose prompt (plus its max_tokens) does not fit the model's context window:
# every backend answers it with empty completions instead of failing the batch, so the operator can end
# that conversation or reject that candidate with this reason while the rest of the batch goes on.
PROMPT_TOO_LONG = "prompt_too_long"


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    finish_reason: str


def too_long(n: int) -> list[Completion]:
    """Every backend's answer to a request that does not fit the context window: `n` empty completions."""
    return [Completion("", 0, PROMPT_TOO_LONG) for _ in range(n)]


class LanguageModel(Protocol):
    """A chat model that can sample replies and score given continuations."""

    name: str

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        """`sampling.n` completions per conversation, in input order."""
        ...

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        """Per-token log-probabilities of each continuation's content, appended as the next turn."""
        ...


class TokenCounter(Protocol):
    """An optional capability of a `LanguageModel`: how many tokens its tokenizer makes of each text (no
    special tokens). Operators find it with `getattr(lm, "count_tokens", None)` and, without it, fall back
    to an upper bound (UTF-8 bytes)."""

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        ...


@dataclass(frozen=True)
class Request:
    """One chat request of a request stream. `key` is the caller's handle; `model` names which of the
    caller's models serves it (self-chat has an assistant and a simulator)."""

    key: Hashable
    conversation: Conversation
    sampling: Sampling
    model: str = "default"


OnDone = Callable[[Request, list[Completion]], Iterable[Request]]


class StreamingLanguageModel(LanguageModel, Protocol):
    """A `LanguageModel` that runs a request stream in one continuous batch: a request's follow-ups join
    the running batch the moment it finishes, instead of waiting for the slowest request of a wave."""

    def stream(self, requests: Iterable[Request], on_done: OnDone) -> None:
        """Run `requests`; each finished one's completions go to `on_done`, and the requests it returns
        are added at once. Returns when nothing is left in flight."""
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
