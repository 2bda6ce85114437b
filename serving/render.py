"""Turn (conversation, continuation) into the token ids that `score()` reads.

The continuation is rendered as the next chat turn. Its content is tokenized on its own and appended
to the tokenized prefix (the chat template up to where the content starts), so every backend (vLLM,
the HTTP client, a transformers reference) scores exactly the same ids, and all continuations after
the same conversation share one token prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from prefmill.serving.protocols import Conversation, Message

_SENTINEL = "\x00PREFMILL-CONTENT\x00"

RenderChat = Callable[[list[Message]], str]
Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class ScoringPrompt:
    prefix_ids: list[int]
    continuation_ids: list[int]

    @property
    def token_ids(self) -> list[int]:
        return self.prefix_ids + self.continuation_ids


def truncate_left(prefix_ids: list[int], longest_continuation: int, max_tokens: int | None) -> tuple[list[int], int]:
    """Cut tokens from the left of a prefix so prefix + the longest continuation fit in `max_tokens`."""
    if max_tokens is None or len(prefix_ids) + longest_continuation <= max_tokens:
        return prefix_ids, 0
    keep = max(max_tokens - longest_continuation, 1)
    return prefix_ids[-keep:], len(prefix_ids) - keep


def continuation_prefix(render: RenderChat, conversation: Conversation, role: str) -> str:
    """The rendered chat up to where the content of the next `role` turn begins."""
    text = render([*conversation, Message(role=role, content=_SENTINEL)])
    prefix, found, _ = text.partition(_SENTINEL)
    if not found:
        raise ValueError("the chat template dropped the message content; cannot locate the continuation")
    return prefix


def scoring_prompts(
    render: RenderChat, tokenize: Tokenize, conversations: Sequence[Conversation], continuations: Sequence[Message]
) -> list[ScoringPrompt]:
    """Token ids for each pair; equal prefixes are rendered and tokenized once."""
    if len(conversations) != len(continuations):
        raise ValueError(f"{len(conversations)} conversations but {len(continuations)} continuations")
    cache: dict[str, list[int]] = {}
    prompts = []
    for conversation, continuation in zip(conversations, continuations):
        prefix = continuation_prefix(render, conversation, continuation["role"])
        if prefix not in cache:
            cache[prefix] = tokenize(prefix)
        prompts.append(ScoringPrompt(cache[prefix], tokenize(continuation["content"])))
    return prompts


def hf_render(tokenizer) -> RenderChat:
    """A renderer from a Hugging Face tokenizer's chat template."""
    return lambda messages: tokenizer.apply_chat_template(list(messages), tokenize=False)


def hf_tokenize(tokenizer) -> Tokenize:
    return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
