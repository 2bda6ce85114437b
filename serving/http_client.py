"""A `LanguageModel` over an OpenAI-compatible server such as `vllm serve`.

`chat` uses /v1/chat/completions (one request per conversation, sent concurrently); `score` sends token
ids to /v1/completions with vLLM's `prompt_logprobs` extension, rendered locally with the model's own
tokenizer so the ids match what the in-process engine scores.

A chat request the server refuses because it does not fit the model's context window (vLLM: 400, "This
model's maximum context length is ...") is answered as every backend answers it: `sampling.n` empty
completions finished `PROMPT_TOO_LONG`, so one long conversation does not fail the batch. Every other
error still raises. (vLLM's server shortens `max_tokens` to what is left of the window, so over HTTP only a
prompt that alone fills the window comes back `PROMPT_TOO_LONG`; a shorter one ends `length`.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any, Sequence

import httpx

from prefmill.serving.models import resolve_model
from prefmill.serving.protocols import Completion, Conversation, Message, Sampling, too_long
from prefmill.serving.render import ScoringPrompt, hf_render, hf_tokenize, scoring_prompts


class OpenAICompatibleClient:
    """Talks to `base_url` (e.g. http://127.0.0.1:8000/v1) serving `model`."""

    def __init__(self, base_url: str, model: str, tokenizer: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.name = model
        self.tokenizer_spec = tokenizer or model
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(timeout=timeout, headers=headers)

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_spec))

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        body = chat_body(self.name, sampling)
        return self._map(lambda c: self._chat_one(c, body), conversations)

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        prompts = scoring_prompts(hf_render(self.tokenizer), hf_tokenize(self.tokenizer), conversations,
                                  continuations)
        return self._map(self._score_one, prompts)

    def _chat_one(self, conversation: Conversation, body: dict[str, Any]) -> list[Completion]:
        try:
            data = self._post("/chat/completions", {**body, **continuation(conversation),
                                                    "messages": list(conversation)})
        except ContextWindowExceeded:
            return too_long(body["n"])
        choices = sorted(data["choices"], key=lambda c: c["index"])
        return [Completion(c["message"]["content"] or "", _completion_tokens(data, len(choices)),
                           c.get("finish_reason") or "stop") for c in choices]

    def _score_one(self, prompt: ScoringPrompt) -> list[float]:
        body = {"model": self.name, "prompt": prompt.token_ids, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0}
        logprobs = self._post("/completions", body)["choices"][0]["prompt_logprobs"]
        ids, start = prompt.token_ids, len(prompt.prefix_ids)
        return [logprobs[i][str(ids[i])]["logprob"] for i in range(start, len(ids))]

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(self.base_url + path, json=body)
        if response.status_code != 200:
            error = ContextWindowExceeded if exceeds_context(response) else RuntimeError
            raise error(f"{self.base_url}{path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def _map(self, fn, items: Sequence) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))


class ContextWindowExceeded(RuntimeError):
    """The server refused a request whose prompt does not fit the model's context window."""


def exceeds_context(response: httpx.Response) -> bool:
    """Whether an error answer is the OpenAI-compatible context-length refusal: a 400 whose message says
    "maximum context length" (vLLM's wording in every version, and OpenAI's)."""
    return response.status_code == 400 and "maximum context length" in response.text.lower()


def chat_body(model: str, sampling: Sampling) -> dict[str, Any]:
    """The /chat/completions request body for our `Sampling`."""
    body: dict[str, Any] = {"model": model, "n": sampling.n, "temperature": sampling.temperature,
                            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.json_schema:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": sampling.json_schema}}
    return body


def continuation(conversation: Conversation) -> dict[str, bool]:
    """vLLM's request fields that continue a conversation's final assistant turn instead of starting a new one."""
    if conversation and conversation[-1]["role"] == "assistant":
        return {"continue_final_message": True, "add_generation_prompt": False}
    return {}


def _completion_tokens(data: dict[str, Any], n: int) -> int:
    """The server reports tokens for all n choices together; an even share is the best per-choice figure."""
    return int(data.get("usage", {}).get("completion_tokens", 0)) // max(n, 1)
