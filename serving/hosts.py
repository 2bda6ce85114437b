"""Where pipeline steps run: a `ModelHost` holds the models of one process (loaded on first use, kept for
the run) and `run_step` calls a step next to them, so a shard's requests reach the engine as one stream.

A step is any picklable callable `step(rows, host) -> value` (the flow binds an operator to the models it
needs). The in-process `LocalPool` and the Ray pool (`serving.ray_pool.RayEnginePool.run`) both call
`run_step`, so the same steps run on every backend.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, Sequence

from prefmill.schemas.config import EngineConfig
from prefmill.serving.protocols import (
    Completion,
    ContinuationScorer,
    Conversation,
    Embedder,
    LanguageModel,
    Message,
    OnDone,
    Request,
    Sampling,
    ScoredPrefix,
)

if TYPE_CHECKING:
    from prefmill.serving.placement import Plan

Step = Callable[[Any, "ModelHost"], Any]


@dataclass
class Meter:
    """What the models of a host did since the last reading: requests sent and tokens generated."""

    requests: int = 0
    tokens: int = 0

    def add(self, requests: int, completions: Iterable[list[Completion]] = ()) -> None:
        self.requests += requests
        self.tokens += sum(c.num_tokens for samples in completions for c in samples)


@dataclass(frozen=True)
class StepRun:
    """A step's value and its cost: compute seconds next to the models, engine requests, generated tokens."""

    value: Any
    seconds: float
    requests: int
    tokens: int
    started_at: float = 0.0  # epoch seconds


class MeteredModel:
    """A `LanguageModel` (streaming when the wrapped one is) that counts requests and generated tokens."""

    def __init__(self, model: LanguageModel, meter: Meter):
        self.model, self.meter, self.name = model, meter, model.name
        if hasattr(model, "stream"):
            self.stream = self._stream

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        out = self.model.chat(conversations, sampling)
        self.meter.add(len(conversations), out)
        return out

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        self.meter.add(len(conversations))
        return self.model.score(conversations, continuations)

    def _stream(self, requests: Iterable[Request], on_done: OnDone) -> None:
        def counted(request: Request, completions: list[Completion]) -> Iterable[Request]:
            self.meter.add(1, [completions])
            return on_done(request, completions)

        self.model.stream(requests, counted)


class MeteredScorer:
    """A `ContinuationScorer` that counts scored (prefix, continuation) pairs as requests. Callers in several
    threads take turns (`lock`): one scorer's forward passes already use every core it has."""

    def __init__(self, scorer: ContinuationScorer, meter: Meter, lock: ContextManager | None = None):
        self.scorer, self.meter, self.name = scorer, meter, scorer.name
        self.lock = lock or threading.Lock()

    def score_continuations(self, prefixes: Sequence[Conversation], continuations: Sequence[Message],
                            max_tokens: int | None = None) -> list[ScoredPrefix]:
        self.meter.add(len(prefixes) * len(continuations))
        with self.lock:
            return self.scorer.score_continuations(prefixes, continuations, max_tokens)


class MeteredEmbedder:
    """An `Embedder` that counts embedded texts as requests. Callers in several threads take turns (`lock`), as
    a scorer's do: one encoder's forward passes already use every core it has."""

    def __init__(self, embedder: Embedder, meter: Meter, lock: ContextManager):
        self.embedder, self.meter, self.lock, self.name = embedder, meter, lock, embedder.name

    def embed(self, texts: Sequence[str]) -> Any:
        self.meter.add(len(texts))
        with self.lock:
            return self.embedder.embed(texts)


class ModelHost:
    """The models one process serves, by spec: vLLM engines for chat, prefix-sharing scorers for FLR, sentence
    embedders for dedup.

    One engine per distinct spec, so a step that uses the same spec for two roles (assistant and
    simulator) gets the same object and its requests share one continuous batch. With `url`, chat models
    are clients of that OpenAI-compatible server instead of in-process engines. Steps in several threads
    may use one host at once: each runs on its own `session()` (its own meter), an engine interleaves
    their requests in one batch, and a scorer serves one caller at a time. A placement `plan` (GPU only)
    gives each engine its GPUs and memory share, and may score FLR through an engine's prompt logprobs.
    """

    def __init__(self, engine: EngineConfig = EngineConfig(), preloaded: dict[str, LanguageModel] | None = None,
                 url: str | None = None, prefix_batch: int = 8, plan: Plan | None = None):
        self.engine_config, self.url, self.plan = engine, url, plan
        self.prefix_batch = prefix_batch  # prefixes per scorer forward pass
        self.meter = Meter()
        self._lock = threading.Lock()  # opening models
        self._models: dict[str, LanguageModel] = dict(preloaded or {})
        self._clients: dict[tuple[str, str], LanguageModel] = {}  # (spec, url) → a client of another server
        self._owned: list[Any] = []
        self._scorers: dict[str, tuple[ContinuationScorer, ContextManager]] = {}
        self._embedders: dict[str, tuple[Embedder, ContextManager]] = {}

    def chat_model(self, spec: str, meter: Meter | None = None, url: str | None = None) -> LanguageModel:
        """The chat model of `spec`: this host's (engine or its server's client), or a client of the server at
        `url` when given (a teacher served elsewhere, even under the same spec as one of ours)."""
        with self._lock:
            model = self._remote(spec, url) if url else self._model(spec)
        return MeteredModel(model, meter or self.meter)

    def _remote(self, spec: str, url: str) -> LanguageModel:
        """A client of the server at `url` serving `spec`, opened on first use (the caller holds `_lock`)."""
        from prefmill.serving.factory import open_model

        if (spec, url) not in self._clients:
            self._clients[spec, url] = open_model(spec, "http", url=url)
        return self._clients[spec, url]

    def _model(self, spec: str) -> LanguageModel:
        """The model of `spec`, opened on first use (the caller holds `_lock`)."""
        if spec not in self._models:
            self._models[spec] = self._open(spec)
        return self._models[spec]

    def _open(self, spec: str) -> LanguageModel:
        from prefmill.serving.factory import open_model

        config, devices = self._planned(spec)
        model = open_model(spec, "http" if self.url else "engine", url=self.url, engine=config, devices=devices)
        if not self.url:
            self._owned.append(model)
        return model

    def _planned(self, spec: str) -> tuple[EngineConfig, tuple[int, ...]]:
        """The engine settings the plan gives `spec` (memory share, tensor parallelism, GPUs); without a plan
        or on CPU, the host's own."""
        placed = self.plan.engine(spec) if self.plan else None
        if placed is None or not placed.devices:
            return self.engine_config, ()
        update = {"kv_cache_fraction": placed.fraction, "tensor_parallel_size": placed.tensor_parallel_size}
        return self.engine_config.model_copy(update=update), placed.devices

    def scorer(self, spec: str, meter: Meter | None = None) -> ContinuationScorer:
        with self._lock:
            if spec not in self._scorers:
                self._scorers[spec] = self._open_scorer(spec)
            scorer, lock = self._scorers[spec]
        return MeteredScorer(scorer, meter or self.meter, lock)

    def _open_scorer(self, spec: str) -> tuple[ContinuationScorer, ContextManager]:
        """Prompt logprobs of the engine serving `spec` when the plan says so (no second copy of the weights;
        callers need not take turns, their requests join the engine's batch), else the prefix-sharing
        transformers scorer on the plan's device, one caller at a time (the caller holds `_lock`)."""
        from prefmill.serving.prefix_scorer import NaiveScorer, SharedPrefixScorer

        if self.plan is not None and self.plan.scorer_via_engine(spec):
            return NaiveScorer(self._model(spec)), contextlib.nullcontext()
        device = self.plan.device_of("scorer", spec) if self.plan else None
        return SharedPrefixScorer(spec, device=device, prefix_batch=self.prefix_batch), threading.Lock()

    def embedder(self, spec: str, meter: Meter | None = None) -> Embedder:
        """The sentence embedder of `spec` on the plan's embedder device (CPU without a plan), loaded on first use
        and kept until the host closes."""
        from prefmill.serving.embedder import SentenceTransformerEmbedder

        with self._lock:
            if spec not in self._embedders:
                device = (self.plan.device_of("embedder") if self.plan else None) or "cpu"
                self._embedders[spec] = SentenceTransformerEmbedder(spec, device=device), threading.Lock()
            embedder, lock = self._embedders[spec]
        return MeteredEmbedder(embedder, meter or self.meter, lock)

    def session(self) -> HostSession:
        """A view of this host for one step: the same models, counted on a meter of its own."""
        return HostSession(self, Meter())

    def close(self) -> None:
        """Shut down the engines this host started (not preloaded ones: their owner closes them)."""
        with self._lock:  # not while another thread is still opening one
            for engine in self._owned:
                engine.close()
            owned = {id(engine) for engine in self._owned}
            self._models = {spec: m for spec, m in self._models.items() if id(m) not in owned}
            self._owned.clear()
            self._scorers.clear()  # a closed host keeps no model's memory alive for whoever still holds it
            self._embedders.clear()
            self._clients.clear()


@dataclass
class HostSession:
    """What a step sees of a `ModelHost` (`chat_model`, `scorer`, `embedder`): counts go to this session's meter only,
    so steps running at once on one host are measured apart."""

    host: ModelHost
    meter: Meter
    _chat: dict[tuple[str, str | None], LanguageModel] = field(default_factory=dict, repr=False)

    def chat_model(self, spec: str, url: str | None = None) -> LanguageModel:
        """One wrapper per (spec, server): a step asking twice for the same model (assistant and simulator) must
        get the same object, or `run_requests` sees two models and falls back from one stream to waves."""
        if (spec, url) not in self._chat:
            self._chat[spec, url] = self.host.chat_model(spec, self.meter, url)
        return self._chat[spec, url]

    def scorer(self, spec: str) -> ContinuationScorer:
        return self.host.scorer(spec, self.meter)

    def embedder(self, spec: str) -> Embedder:
        return self.host.embedder(spec, self.meter)


def run_step(step: Step, rows: Any, host: ModelHost, session: HostSession | None = None) -> StepRun:
    """Call `step(rows, session)` on a session of `host` (a new one unless given) and measure it (other
    steps may run beside it)."""
    session = session or host.session()
    started_at, started = time.time(), time.perf_counter()
    value = step(rows, session)
    seconds = time.perf_counter() - started
    return StepRun(value, seconds, session.meter.requests, session.meter.tokens, started_at)


class LocalPool:
    """The in-process backend: one `ModelHost` serving every step the flow's threads send at once (the
    engine puts concurrent shards into one continuous batch)."""

    def __init__(self, host: ModelHost):
        self.host = host

    @property
    def hosts(self) -> int:
        """Steps run on one host here (callers that split work into steps need no more threads)."""
        return 1

    def run(self, step: Step, rows: Any) -> StepRun:
        return run_step(step, rows, self.host)

    def shutdown(self) -> None:
        self.host.close()
