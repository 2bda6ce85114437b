"""An asynchronous vLLM engine: requests are submitted one conversation at a time and run in the engine's
continuous batch with whatever else is in flight.

`stream` runs a request stream on it (a conversation's next turn starts as soon as its last one ends),
like `VLLMEngine.stream` does on the synchronous engine; here the frontend runs on an event loop, which
on a 2-core CPU competes with the engine for cores (measured slower there). The engine lives on its own
event loop in a background thread; `chat`, `stream` and `score` are synchronous methods that run their
work on that loop and wait for it, so they also work when the caller's thread has a loop running (a Prefect
async task, a notebook).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Iterable, Sequence

from prefmill.schemas.config import EngineConfig
from prefmill.serving.engine import (
    bind_cpu_threads,
    chat_prompt,
    completions,
    continuation_logprobs,
    engine_kwargs,
    sampling_params,
    token_counts,
)
from prefmill.serving.protocols import Completion, Conversation, Message, OnDone, Request, Sampling, too_long
from prefmill.serving.render import hf_render, hf_tokenize, scoring_prompts


class AsyncVLLMEngine:
    """A `StreamingLanguageModel` and `TokenCounter` with an extra `async achat(conversation, sampling)` for one
    request."""

    def __init__(self, config: EngineConfig = EngineConfig()):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from prefmill.serving.orphans import OrphanWatchdog

        self.config = config
        self.name = config.model
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prefmill-async-engine", daemon=True)
        self._thread.start()
        started = time.perf_counter()
        bind_cpu_threads(config)
        args = AsyncEngineArgs(**engine_kwargs(config), disable_log_stats=True)
        self._watchdog = OrphanWatchdog()  # the engine's processes end with this one, even on kill -9
        self.llm = self._run(self._build(AsyncLLM, args))
        self.start_seconds = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.model_config.max_model_len

    async def _build(self, cls, args):
        return cls.from_engine_args(args)

    def close(self) -> None:
        self.llm.shutdown()
        self._watchdog.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def achat(self, conversation: Conversation, sampling: Sampling) -> list[Completion]:
        """`sampling.n` completions of one conversation; awaitable from any event loop."""
        future = asyncio.run_coroutine_threadsafe(self._generate(self._prompt(conversation), sampling), self._loop)
        return await asyncio.wrap_future(future)

    def _prompt(self, conversation: Conversation):
        return chat_prompt(self.tokenizer, conversation)

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        async def everything():
            return await asyncio.gather(*(self._generate(self._prompt(c), sampling) for c in conversations))
        return self._run(everything())

    def stream(self, requests: Iterable[Request], on_done: OnDone) -> None:
        """Each request runs as its own engine request; a finished one's follow-ups start at once. The driver
        runs on the engine's loop, so `on_done` does too: it must return follow-ups, not call the engine."""
        async def everything():
            tasks: dict[asyncio.Future, Request] = {}

            def add(batch: Iterable[Request]) -> None:
                for request in batch:
                    tasks[asyncio.ensure_future(self._generate(self._prompt(request.conversation),
                                                               request.sampling))] = request

            add(requests)
            try:
                while tasks:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        add(on_done(tasks.pop(task), task.result()))
            finally:
                for task in tasks:
                    task.cancel()
        self._run(everything())

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """The `TokenCounter` capability: tokens per text, without special tokens."""
        return token_counts(self.tokenizer, texts)

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = scoring_prompts(hf_render(self.tokenizer), hf_tokenize(self.tokenizer), conversations,
                                  continuations)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

        async def one(p):
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=p.token_ids), params,
                                               f"score-{next(self._ids)}"):
                final = out
            return continuation_logprobs(p, final.prompt_logprobs)

        async def everything():
            return await asyncio.gather(*(one(p) for p in prompts))
        return self._run(everything())

    async def _generate(self, prompt, sampling: Sampling) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        if len(prompt["prompt_token_ids"]) + sampling.max_tokens > self.max_model_len:
            return too_long(sampling.n)  # answered per request, like the sync engine: the batch goes on
        params = sampling_params(sampling)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output holding all n samples
        final = None
        async for out in self.llm.generate(prompt, params, f"chat-{next(self._ids)}"):
            final = out
        return completions(final)

    def _run(self, coroutine):
        """Run `coroutine` on the engine's loop and wait for it. Works whether or not the caller's thread has
        a loop running (never `asyncio.run` there); if the wait is interrupted, the work is cancelled."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("AsyncVLLMEngine called from its own event loop (from on_done inside stream()?); "
                               "return follow-up Requests from on_done, or await achat() from async code")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
