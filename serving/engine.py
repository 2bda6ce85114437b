"""The in-process vLLM engine: the one place that builds `vllm.LLM` and `SamplingParams`."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from prefmill.schemas.config import EngineConfig
from prefmill.serving.models import resolve_model
from prefmill.serving.protocols import Completion, Conversation, Message, OnDone, Request, Sampling, too_long
from prefmill.serving.render import ScoringPrompt, hf_render, hf_tokenize, scoring_prompts

GPU_KV_CACHE_FRACTION = 0.85
SHUTDOWN_TIMEOUT_S = 30.0


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_kwargs(config: EngineConfig) -> dict[str, Any]:
    """vLLM `LLM(...)` arguments that are right for this device.

    On CPU: float32 (measured 78 vs 51 tok/s for bf16 on AVX-512 cores without bf16 units); an explicit
    KV-cache size (vLLM's fractional default counts against one NUMA node's memory, minus what the process
    already holds, and fails on small nodes); eager mode (graph compilation costs ~70 s at start and buys
    little on CPU); no chunked prefill (vLLM 0.32 on CPU crashes the engine with "CPU Generator does not use
    offset" when a seeded request's prompt is split across steps). On GPU: bf16 and a share of GPU memory.
    """
    gpu = on_gpu()
    memory: dict[str, Any] = (
        {"gpu_memory_utilization": config.kv_cache_fraction or GPU_KV_CACHE_FRACTION}
        if gpu
        else {"kv_cache_memory_bytes": int(config.cpu_kv_cache_gib * 2**30), "enable_chunked_prefill": False}
    )
    eager = config.enforce_eager if config.enforce_eager is not None else not gpu
    return dict(
        model=resolve_model(config.model),
        dtype=config.dtype or ("bfloat16" if gpu else "float32"),
        max_model_len=config.max_model_len,
        enforce_eager=eager,
        **memory,
        tensor_parallel_size=config.tensor_parallel_size,
        max_num_seqs=config.max_num_seqs,
        seed=config.seed,
        # the weight-loading bar only when engine logs are on (`prefmill run --verbose`)
        use_tqdm_on_load=os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper() in {"DEBUG", "INFO"},
    )


@contextlib.contextmanager
def visible_devices(devices: Sequence[int]) -> Iterator[None]:
    """While an engine starts, show its processes only the plan's GPUs (indices among those this process
    sees): vLLM's workers take the first visible GPUs and read CUDA_VISIBLE_DEVICES when they start. No
    devices (CPU, or no plan): nothing changes."""
    if not devices:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = before.split(",") if before else [str(i) for i in range(max(devices) + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[d] for d in devices)
    try:
        yield
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def cpu_cores() -> str:
    """All cores this process may use, in vLLM's bind syntax ("0-1" or "0,2,5").

    vLLM's "auto" binding keeps one core back for the frontend; on a 2-core machine that halves decode
    speed (measured 78 → 126 tok/s binding both cores).
    """
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def bind_cpu_threads(config: EngineConfig) -> None:
    """On CPU, tell the engine about to start which cores its OpenMP threads bind (`config.cpu_cores` or all)."""
    if not on_gpu():
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_cores or cpu_cores()


def sampling_params(sampling: Sampling):
    """Our `Sampling` as vLLM `SamplingParams` (with JSON-schema structured output when asked)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    structured = (
        StructuredOutputsParams(json=sampling.json_schema, disable_any_whitespace=True)
        if sampling.json_schema
        else None
    )
    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        structured_outputs=structured,
    )


def release_import_tracebacks() -> None:
    """vLLM keeps some failed optional imports as exceptions in module globals (`_torchcodec_import_exc`,
    to re-raise if audio is ever used). Their tracebacks hold every frame of the stack that first imported
    vLLM: in a flow, a task's frames, so that run's engine and context were never freed. The message stays;
    only the traceback goes."""
    for name, module in list(sys.modules.items()):
        if name == "vllm" or name.startswith("vllm."):
            for value in list(getattr(module, "__dict__", {}).values()):
                seen: list[BaseException] = []
                while isinstance(value, BaseException) and all(value is not e for e in seen):
                    seen.append(value)
                    value.__traceback__ = None  # and those of the errors it was raised from or during
                    value = value.__cause__ or value.__context__


def forget_tokenizer_caches() -> None:
    """Drop vLLM's memo of which keywords a callable takes. It is keyed on each engine's own tokenizer
    methods (`TokenizerPool.apply_chat_template` is a class made per engine), so it kept every closed
    engine's tokenizer copies alive, ~20 MiB each, in a process that opens an engine per run. Clearing a
    memo costs only its recomputation."""
    from vllm.utils import func_utils

    cached = getattr(func_utils, "_supports_kw", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


class _Caller:
    """One `stream()`/`chat()`/`score` call on a shared engine: how many of its requests are in flight, and
    the error that ended it (its `on_done` raised, or the engine failed)."""

    def __init__(self):
        self.pending = 0
        self.error: BaseException | None = None


class VLLMEngine:
    """A `StreamingLanguageModel` backed by one in-process `vllm.LLM`.

    Many threads may use one engine at once (the flow runs shards as concurrent tasks): every `stream`,
    `chat` and `score` call adds its requests to the same continuous batch, and whichever caller holds the
    engine steps it for all of them, handing each finished request to its own caller's callback. So the
    shards an engine holds form one request stream, as if they were one big shard. vLLM's engine is not
    thread-safe (its request socket, its output processor), so only the caller holding the turn touches it.
    """

    def __init__(self, config: EngineConfig = EngineConfig(), devices: Sequence[int] = ()):
        """`devices`: the GPUs the placement plan gives this engine (indices among this process's); none: vLLM's
        default device (the first GPU), or the CPU."""
        from vllm import LLM

        from prefmill.serving.orphans import OrphanWatchdog

        self.config = config
        self.name = config.model
        started = time.perf_counter()
        kwargs = engine_kwargs(config)
        bind_cpu_threads(config)
        self._watchdog = OrphanWatchdog()  # the engine's processes end with this one, even on kill -9
        with visible_devices(devices):
            self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self._request_ids = itertools.count()
        self._turn = threading.Condition()  # guards _busy and _in_flight
        self._busy = False  # a caller holds the engine (adds requests or steps it)
        self._in_flight: dict[str, tuple[Any, _Caller]] = {}
        self._incoming: list[tuple[_Caller, list]] = []  # callers' first items, added by whoever steps next
        self._local = threading.local()  # .holding: this thread holds the engine (inside a callback)
        release_import_tracebacks()

    def close(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit. vLLM's default grace is
        5 s, then SIGKILL: on a loaded CPU the engine process is killed before it unlinks its shared-memory
        queue, and the resource tracker reports a leaked segment at exit."""
        self.llm.llm_engine.engine_core.shutdown(timeout=timeout)
        self._watchdog.stop()
        forget_tokenizer_caches()
        release_import_tracebacks()  # also those of vLLM modules first imported after this engine started

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        """`sampling.n` completions per conversation; joins the engine's running batch like `stream`."""
        self._not_inside_stream("chat")
        results: list[list[Completion]] = [[] for _ in conversations]

        def done(request: Request, out: list[Completion]) -> list[Request]:
            results[request.key] = out
            return []

        self.stream([Request(i, list(c), sampling) for i, c in enumerate(conversations)], done)
        return results

    def stream(self, requests: Iterable[Request], on_done: OnDone) -> None:
        """Run a request stream in the engine's continuous batch: whenever a request finishes, its
        follow-ups from `on_done` are added before the next engine step. A request whose prompt and
        `max_tokens` do not fit the context window is answered at once with empty `PROMPT_TOO_LONG`
        completions (the rest go on). If `on_done` raises, this caller's requests still in flight are
        aborted and the error propagates; other callers of the engine are not affected."""
        self._not_inside_stream("stream")

        def work(request: Request) -> tuple[Any, Any, Callable[[Any], list]]:
            prompt = chat_prompt(self.tokenizer, request.conversation)
            if len(prompt["prompt_token_ids"]) + request.sampling.max_tokens > self.max_model_len:
                return None, None, lambda _: [work(r) for r in on_done(request, too_long(request.sampling.n))]
            params = sampling_params(request.sampling)
            return prompt, params, lambda out: [work(r) for r in on_done(request, completions(out))]

        self._run(lambda: [work(r) for r in requests])

    def _run(self, first: Callable[[], list]) -> None:
        """Queue `first()`'s work items for the shared batch and step the engine (taking turns with the other
        callers) until none of this caller's requests is left in flight. A work item is (prompt, params,
        deliver): `deliver(finished output)` returns the follow-up items; a None prompt is delivered at once.

        A caller does not need the engine to join: its items wait in `_incoming`, and whoever steps next
        adds them before its step, so a stream that keeps the engine busy cannot keep another one out."""
        caller = _Caller()
        items = first()  # prompts are rendered and tokenized here, in the caller's thread
        with self._turn:
            self._incoming.append((caller, items))
            caller.pending += 1  # the queued batch, until someone adds it
            self._turn.notify_all()
        while True:
            with self._turn:
                while self._busy and caller.pending > 0 and caller.error is None:
                    self._turn.wait()
                if caller.pending <= 0 or caller.error is not None:
                    break
                self._busy = True
                incoming, self._incoming = self._incoming, []
            self._local.holding = True
            try:
                for owner, batch in incoming:
                    try:
                        self._add(owner, batch)
                    finally:
                        owner.pending -= 1  # after adding: its thread must never see 0 while work is left
                if self._in_flight:
                    self._step()
            except BaseException as e:  # the engine itself failed: every caller waiting on it fails
                for _, owner in list(self._in_flight.values()):
                    owner.error = owner.error or e
                    owner.pending = 0
                with contextlib.suppress(Exception):  # if it still runs, free the batch slots
                    self.llm.llm_engine.abort_request(list(self._in_flight))
                self._in_flight.clear()
                caller.error = caller.error or e
            finally:
                self._local.holding = False
                with self._turn:
                    self._busy = False
                    self._turn.notify_all()
        if caller.error is not None:
            raise caller.error

    def _add(self, owner: _Caller, items: list) -> None:
        """Add `owner`'s work items (and the follow-ups of those answered at once) to the engine; an error
        in the owner's callback ends that owner only."""
        from vllm.sampling_params import RequestOutputKind

        items = list(items)
        try:
            while items and owner.error is None:
                prompt, params, deliver = items.pop(0)
                if prompt is None:
                    items.extend(deliver(None))
                    continue
                request_id = f"stream-{next(self._request_ids)}"
                params.output_kind = RequestOutputKind.FINAL_ONLY  # one output holding all n samples
                self.llm.llm_engine.add_request(request_id, prompt, params)
                self._in_flight[request_id] = (deliver, owner)
                owner.pending += 1
        except BaseException as e:
            owner.error = e
            self._abort(owner)

    def _step(self) -> None:
        """One engine step; each finished request goes to its owner's callback, whose follow-ups join."""
        for out in self.llm.llm_engine.step():
            if not out.finished or out.request_id not in self._in_flight:
                continue
            deliver, owner = self._in_flight.pop(out.request_id)
            reason = out.outputs[0].finish_reason if out.outputs else None
            if owner.error is None and reason in {"abort", "error"}:  # we never abort a live owner's requests
                owner.error = RuntimeError(f"the engine ended request {out.request_id} with '{reason}' "
                                           "(was it shut down while steps were running?)")
                self._abort(owner)
                continue
            if owner.error is None:
                try:
                    follow_ups = deliver(out)
                except BaseException as e:  # this owner's callback failed: end only that owner
                    owner.error = e
                    self._abort(owner)
                    continue
                self._add(owner, follow_ups)
            owner.pending -= 1  # after its follow-ups joined: the owner's thread reads it to know it is done

    def _abort(self, owner: _Caller) -> None:
        ids = [rid for rid, (_, o) in self._in_flight.items() if o is owner]
        for rid in ids:
            del self._in_flight[rid]
        owner.pending = 0
        if ids:
            self.llm.llm_engine.abort_request(ids)

    def _not_inside_stream(self, method: str) -> None:
        """A callback runs while its thread holds the engine: a nested call there would wait for itself."""
        if getattr(self._local, "holding", False):
            raise RuntimeError(f"VLLMEngine.{method}() called while stream() is running (from on_done?); "
                               "return follow-up Requests from on_done instead")

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Lets operators bound text in tokens (critique evidence) without a tokenizer of their own."""
        return token_counts(self.tokenizer, texts)

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        prompts = self.scoring_prompts(conversations, continuations)
        return self.score_token_ids(prompts)

    def scoring_prompts(
        self, conversations: Sequence[Conversation], continuations: Sequence[Message]
    ) -> list[ScoringPrompt]:
        return scoring_prompts(hf_render(self.tokenizer), hf_tokenize(self.tokenizer), conversations, continuations)

    def score_token_ids(self, prompts: Sequence[ScoringPrompt]) -> list[list[float]]:
        """Log-probabilities of each prompt's continuation ids, read from vLLM's prompt logprobs (in the
        shared batch, like `stream`)."""
        self._not_inside_stream("score")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        for p in prompts:
            if len(p.token_ids) >= self.max_model_len:
                raise ValueError(f"a scoring prompt of {len(p.token_ids)} tokens does not fit the context window "
                                 f"of {self.max_model_len} tokens (engine.max_model_len)")
        results: list[list[float]] = [[] for _ in prompts]

        def item(i: int, prompt: ScoringPrompt):
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)

            def deliver(out) -> list:
                results[i] = continuation_logprobs(prompt, out.prompt_logprobs)
                return []
            return TokensPrompt(prompt_token_ids=prompt.token_ids), params, deliver

        self._run(lambda: [item(i, p) for i, p in enumerate(prompts)])
        return results


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens per text, without special tokens (the `TokenCounter` capability of both engines)."""
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def chat_prompt(tokenizer, conversation: Conversation):
    """The token ids `LLM.chat` would send for this conversation (template text, no extra specials). A
    conversation that ends in an assistant turn is continued: the reply goes on from that turn's text."""
    from vllm.inputs import TokensPrompt

    prefill = bool(conversation) and conversation[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=not prefill,
                                         continue_final_message=prefill)
    return TokensPrompt(prompt_token_ids=tokenizer(text, add_special_tokens=False)["input_ids"])


def completions(output) -> list[Completion]:
    """A finished vLLM `RequestOutput` as our completions, one per sample."""
    return [Completion(o.text, len(o.token_ids), o.finish_reason or "stop") for o in output.outputs]


def continuation_logprobs(prompt: ScoringPrompt, prompt_logprobs: list[dict | None] | None) -> list[float]:
    """The continuation part of vLLM's prompt logprobs (position i holds the logprob of token i)."""
    ids = prompt.token_ids
    start = len(prompt.prefix_ids)
    if start == 0:
        raise ValueError("a continuation needs a non-empty prefix to be scored")
    return [prompt_logprobs[i][ids[i]].logprob for i in range(start, len(ids))]
