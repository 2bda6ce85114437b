"""The lock-step request driver: requests are batched per (model, sampling), the JSON schema included."""

from __future__ import annotations

import json

from prefmill.operators.streams import run_in_waves, run_requests
from prefmill.serving.protocols import Request, Sampling
from tests.fakes import ScriptedLM


def schema_title(conv, sampling, k) -> str:
    return json.dumps(sampling.json_schema)


def test_requests_that_differ_only_in_their_schema_each_get_their_own():
    schemas = [{"title": "a", "type": "object"}, {"title": "b", "type": "object"}, None]
    lm = ScriptedLM(schema_title)
    requests = [Request(k, [{"role": "user", "content": f"q{k}"}], Sampling(seed=1, json_schema=s))
                for k, s in enumerate(schemas)]
    answers: dict[int, str] = {}
    run_requests({"default": lm}, requests, lambda r, c: answers.__setitem__(r.key, c[0].text) or [])
    assert answers == {k: json.dumps(s) for k, s in enumerate(schemas)}
    assert sorted(json.dumps(s.json_schema) for _, s in lm.calls) == sorted(json.dumps(s) for s in schemas)


def test_equal_schemas_written_differently_share_one_batch():
    lm = ScriptedLM(schema_title)
    first = {"type": "object", "properties": {"x": {"type": "string"}}}
    same = {"properties": {"x": {"type": "string"}}, "type": "object"}
    requests = [Request(k, [{"role": "user", "content": "q"}], Sampling(json_schema=s)) for k, s in
                enumerate([first, same])]
    run_in_waves({"default": lm}, requests, lambda r, c: [])
    assert [n for n, _ in lm.calls] == [2]


def test_follow_ups_keep_their_own_schema_across_waves():
    lm = ScriptedLM(schema_title)
    seen: list[tuple[int, str]] = []

    def on_done(request, completions):
        seen.append((request.key, completions[0].text))
        if request.key < 2:
            schema = {"title": f"next{request.key}"}
            return [Request(request.key + 10, request.conversation, Sampling(json_schema=schema))]
        return []
    requests = [Request(k, [{"role": "user", "content": "q"}], Sampling(json_schema={"title": f"first{k}"}))
                for k in range(3)]
    run_in_waves({"default": lm}, requests, on_done)
    assert dict(seen) == {0: '{"title": "first0"}', 1: '{"title": "first1"}', 2: '{"title": "first2"}',
                          10: '{"title": "next0"}', 11: '{"title": "next1"}'}
