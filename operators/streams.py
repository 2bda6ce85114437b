"""Running a stream of chat requests whose follow-ups depend on earlier results (self-chat turns,
candidates of a context that has just appeared).

With one model that can `stream` (the vLLM engines), every follow-up joins the engine's running batch
as soon as the request before it finishes. Otherwise (several models, a Ray pool, an HTTP client, a
scripted test model) requests run in waves: one `chat` call per (model, sampling) of the wave, then the
follow-ups of the whole wave form the next one. Both give every request the same seed, so only batch
composition differs.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

from prefmill.serving.protocols import LanguageModel, OnDone, Request, Sampling


def run_requests(models: Mapping[str, LanguageModel], requests: Iterable[Request], on_done: OnDone) -> None:
    """Run `requests` and every follow-up `on_done` returns, each on `models[request.model]`."""
    requests = list(requests)
    for request in requests:
        _model_of(models, request)
    distinct = {id(m): m for m in models.values()}
    if len(distinct) == 1:
        [model] = distinct.values()
        if hasattr(model, "stream"):
            model.stream(requests, _checked(models, on_done))
            return
    run_in_waves(models, requests, on_done)


def run_in_waves(models: Mapping[str, LanguageModel], requests: Iterable[Request], on_done: OnDone) -> None:
    """The lock-step driver: a wave's requests are batched per (model, sampling), in request order."""
    wave = list(requests)
    while wave:
        groups: dict[tuple[str, Sampling, str], list[Request]] = {}
        for request in wave:
            _model_of(models, request)
            groups.setdefault(_batch_key(request), []).append(request)
        wave = []
        for (name, _, _), group in groups.items():
            results = models[name].chat([r.conversation for r in group], group[0].sampling)
            for request, completions in zip(group, results, strict=True):
                wave.extend(on_done(request, completions))


def _batch_key(request: Request) -> tuple[str, Sampling, str]:
    """Requests that may share one `chat` call. `Sampling` equality leaves out `json_schema` (a dict is not
    hashable), so the schema joins the key as canonical JSON: equal schemas batch, different ones never do."""
    return request.model, request.sampling, json.dumps(request.sampling.json_schema, sort_keys=True)


def _checked(models: Mapping[str, LanguageModel], on_done: OnDone) -> OnDone:
    def checked(request: Request, completions) -> list[Request]:
        follow_ups = list(on_done(request, completions))
        for follow_up in follow_ups:
            _model_of(models, follow_up)
        return follow_ups
    return checked


def _model_of(models: Mapping[str, LanguageModel], request: Request) -> LanguageModel:
    if request.model not in models:
        raise KeyError(f"request {request.key!r} names model {request.model!r}; have {sorted(models)}")
    return models[request.model]
