"""A scripted LanguageModel for unit tests of prompt building and parsing (never the only test)."""

from __future__ import annotations

from typing import Callable, Sequence

from prefmill.serving.protocols import Completion, Conversation, Message, Sampling, too_long

Script = Callable[[Conversation, Sampling, int], str]


class ScriptedLM:
    """Answers with `script(conversation, sampling, sample_index)`; one token per word. With a
    `context_window` (in words), a request whose prompt words + max_tokens exceed it is answered as every
    backend answers one: `sampling.n` empty completions finished `PROMPT_TOO_LONG`."""

    def __init__(self, script: Script, name: str = "scripted", context_window: int | None = None):
        self.script = script
        self.name = name
        self.context_window = context_window
        self.calls: list[tuple[int, Sampling]] = []

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        self.calls.append((len(conversations), sampling))
        out = []
        for conv in conversations:
            if self._too_long(conv, sampling):
                out.append(too_long(sampling.n))
                continue
            texts = [self.script(conv, sampling, k) for k in range(sampling.n)]
            out.append([self._completion(t, sampling.max_tokens) for t in texts])
        return out

    def _too_long(self, conversation: Conversation, sampling: Sampling) -> bool:
        words = sum(len(m["content"].split()) for m in conversation)
        return self.context_window is not None and words + sampling.max_tokens > self.context_window

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        return [[-1.0] * len(c["content"].split()) for c in continuations]

    @staticmethod
    def _completion(text: str, max_tokens: int) -> Completion:
        words = text.split()
        if len(words) > max_tokens:
            return Completion(" ".join(words[:max_tokens]), max_tokens, "length")
        return Completion(text, len(words), "stop")


class StreamingScriptedLM(ScriptedLM):
    """The scripted model with `stream`: requests finish one at a time, newest first, so follow-ups
    overtake older requests (the opposite of lock-step waves). `events` logs ("add" | "done", key)."""

    def __init__(self, script: Script, name: str = "scripted", context_window: int | None = None):
        super().__init__(script, name, context_window)
        self.events: list[tuple[str, object]] = []

    def stream(self, requests, on_done) -> None:
        queue = []

        def add(batch):
            for request in batch:
                self.events.append(("add", request.key))
                queue.append(request)
        add(requests)
        while queue:
            request = queue.pop()
            self.events.append(("done", request.key))
            add(on_done(request, self.chat([request.conversation], request.sampling)[0]))
