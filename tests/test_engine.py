"""The real vLLM engine on the real embedded model."""

from __future__ import annotations

import json

import pytest
import torch

from prefmill.serving.protocols import Completion, Sampling

QUESTION = [{"role": "user", "content": "Name three uses of copper."}]


def test_n_samples_are_distinct(engine):
    [replies] = engine.chat([QUESTION], Sampling(n=4, seed=11, max_tokens=32, temperature=1.0))
    assert len(replies) == 4
    assert len({r.text for r in replies}) >= 3
    assert all(r.num_tokens > 0 and r.finish_reason in {"stop", "length"} for r in replies)


def test_fixed_seed_reproduces_and_other_seed_differs(engine):
    sampling = Sampling(n=2, seed=5, max_tokens=32, temperature=1.0)
    first = engine.chat([QUESTION], sampling)
    assert engine.chat([QUESTION], sampling) == first
    other = engine.chat([QUESTION], Sampling(n=2, seed=6, max_tokens=32, temperature=1.0))
    assert [c.text for c in other[0]] != [c.text for c in first[0]]


def test_results_come_back_in_input_order(engine):
    conversations = [[{"role": "user", "content": f"Repeat exactly: token{i}"}] for i in range(6)]
    single = [engine.chat([c], Sampling(seed=1, max_tokens=12, temperature=0.0))[0] for c in conversations]
    assert engine.chat(conversations, Sampling(seed=1, max_tokens=12, temperature=0.0)) == single


def test_structured_output_follows_the_json_schema(engine):
    schema = {"type": "object", "properties": {"claims": {"type": "array", "items": {"type": "string"}}},
              "required": ["claims"], "additionalProperties": False}
    [[reply]] = engine.chat([QUESTION], Sampling(seed=3, max_tokens=96, json_schema=schema))
    if reply.finish_reason == "stop":
        data = json.loads(reply.text)
        assert set(data) == {"claims"} and all(isinstance(c, str) for c in data["claims"])
    else:
        assert reply.text.lstrip().startswith('{"claims":')


def test_score_matches_a_hand_computation_with_transformers(engine, hf_model):
    model, tokenizer = hf_model
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    continuation = {"role": "assistant", "content": "The capital of France is Paris."}
    [logprobs] = engine.score([conversation], [continuation])

    prefix = tokenizer.apply_chat_template([*conversation, {"role": "assistant", "content": ""}], tokenize=False)
    prefix = prefix[: prefix.rindex("<|im_end|>")]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    content_ids = tokenizer(continuation["content"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix_ids + content_ids])
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)[0]
    expected = [logits[len(prefix_ids) + k - 1, t].item() for k, t in enumerate(content_ids)]

    assert len(logprobs) == len(content_ids)
    diffs = [abs(a - b) for a, b in zip(logprobs, expected)]
    # both compute in float32 on CPU (different kernels): per-token agreement to rounding noise
    assert max(diffs) < 0.02, diffs
    assert abs(sum(logprobs) - sum(expected)) < 0.05


def test_score_of_a_likely_reply_beats_an_unlikely_one(engine):
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    good, bad = engine.score([conversation] * 2, [
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "assistant", "content": "Purple elephants compile the ocean."},
    ])
    assert sum(good) / len(good) > sum(bad) / len(bad)


def test_empty_continuation_scores_to_no_tokens(engine):
    assert engine.score([QUESTION], [{"role": "assistant", "content": ""}]) == [[]]


def test_bad_model_spec_gives_a_clear_error(tmp_path):
    from prefmill.serving.models import ModelSpecError, resolve_model

    with pytest.raises(ModelSpecError, match="neither an embedded model"):
        resolve_model("no such model!")
    with pytest.raises(ModelSpecError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="neither an embedded model"):
        resolve_model("./missing-folder")
    assert resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"


def test_a_large_seeded_batch_of_long_prompts_does_not_kill_the_engine(engine):
    """Regression: with chunked prefill, vLLM 0.32 on CPU died with 'CPU Generator does not use offset'."""
    long = "Summarise this: " + "word " * 700
    replies = engine.chat([[{"role": "user", "content": long + str(i)}] for i in range(24)],
                          Sampling(n=2, seed=3, max_tokens=4))
    assert [len(r) for r in replies] == [2] * 24


def test_count_tokens_is_the_tokenizers_count_without_special_tokens(engine, hf_model):
    _, tokenizer = hf_model
    texts = ["Why is the sky blue?", "", "Rayleigh scattering grows with the inverse fourth power of wavelength."]
    assert engine.count_tokens(texts) == [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert engine.count_tokens([]) == []


def _turns(engine, seeds: list[int], errors: dict | None = None) -> dict:
    """A small two-step request stream per seed (a reply, then a follow-up on it), run with `stream`."""
    from prefmill.serving.protocols import Request

    out: dict = {}

    def on_done(request, completions):
        seed, turn = request.key
        out[request.key] = completions[0].text
        if errors is not None and turn == 0 and seed in errors:
            raise errors[seed]
        if turn == 0:
            conversation = [*request.conversation, {"role": "assistant", "content": completions[0].text},
                            {"role": "user", "content": "Say it shorter."}]
            return [Request((seed, 1), conversation, Sampling(seed=seed, max_tokens=8))]
        return []

    engine.stream([Request((s, 0), [{"role": "user", "content": f"Count to {s}."}], Sampling(seed=s, max_tokens=8))
                   for s in seeds], on_done)
    return out


def test_streams_from_many_threads_share_the_engine_and_match_running_alone(engine):
    """Concurrent shards on one engine: every caller gets exactly its own results, equal to a lone run."""
    from concurrent.futures import ThreadPoolExecutor

    alone = [_turns(engine, [s, s + 10]) for s in range(1, 5)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: _turns(engine, [s, s + 10]), range(1, 5)))
    assert together == alone
    assert all(len(r) == 4 for r in together)


def test_a_failing_caller_does_not_stop_the_others(engine):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        failing = pool.submit(_turns, engine, [1, 2], {1: ValueError("caller bug")})
        fine = pool.submit(_turns, engine, [3, 4])
        with pytest.raises(ValueError, match="caller bug"):
            failing.result()
        assert len(fine.result()) == 4
    assert len(_turns(engine, [5])) == 2  # the engine still serves after an aborted caller


def test_a_prompt_over_the_context_window_is_answered_prompt_too_long_and_the_batch_goes_on(engine):
    from prefmill.serving.protocols import PROMPT_TOO_LONG

    too_long = [{"role": "user", "content": "word " * (engine.max_model_len + 10)}]
    fits_only_without_max_tokens = [{"role": "user", "content": "word " * (engine.max_model_len - 60)}]
    replies = engine.chat([QUESTION, too_long, fits_only_without_max_tokens, QUESTION],
                          Sampling(n=2, seed=4, max_tokens=64))
    assert replies[1] == replies[2] == [Completion("", 0, PROMPT_TOO_LONG)] * 2
    assert replies[0] == replies[3] and all(c.num_tokens > 0 for c in replies[0])


def test_calling_the_engine_from_a_callback_is_refused_not_a_deadlock(engine):
    from prefmill.serving.protocols import Request

    def on_done(request, completions):
        engine.chat([QUESTION], Sampling(max_tokens=4))
        return []

    with pytest.raises(RuntimeError, match="on_done"):
        engine.stream([Request(0, QUESTION, Sampling(max_tokens=4))], on_done)
    assert len(engine.chat([QUESTION], Sampling(max_tokens=4))[0]) == 1


def test_a_caller_joins_a_busy_engine_at_once_instead_of_waiting_for_the_running_stream(engine):
    """Fairness: a short request sent while another thread's long stream runs finishes first (it joins
    the running batch; it is not queued behind the whole stream)."""
    import threading
    import time

    from prefmill.serving.protocols import Request

    done: dict[str, float] = {}

    def long_chain():
        def on_done(request, completions):
            if request.key < 5:
                return [Request(request.key + 1, QUESTION, Sampling(seed=request.key, max_tokens=24))]
            return []
        engine.stream([Request(0, QUESTION, Sampling(seed=0, max_tokens=24))], on_done)
        done["long"] = time.perf_counter()

    thread = threading.Thread(target=long_chain)
    thread.start()
    deadline = time.monotonic() + 60
    while not engine._in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.chat([QUESTION], Sampling(seed=9, max_tokens=4))
    done["short"] = time.perf_counter()
    thread.join()
    assert done["short"] < done["long"]


def test_concurrent_chat_calls_each_get_every_result(engine, monkeypatch):
    """Callers in several threads, each batch added by whichever thread steps: every caller gets all its
    results (adding a request is slowed down to widen the moment a batch is queued but not yet added)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    add_request = engine.llm.llm_engine.add_request

    def slow_add(*args, **kwargs):
        time.sleep(0.02)
        return add_request(*args, **kwargs)

    monkeypatch.setattr(engine.llm.llm_engine, "add_request", slow_add)

    def call(k: int):
        conversations = [[{"role": "user", "content": f"Say {k}-{i}."}] for i in range(3)]
        return engine.chat(conversations, Sampling(n=2, seed=k, max_tokens=6))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            results = list(pool.map(call, range(4)))
            assert all(len(r) == 3 and all(len(samples) == 2 for samples in r) for r in results)


def test_a_stream_returns_only_when_its_follow_ups_are_done_while_other_callers_come_and_go(engine):
    """A stream whose slow callbacks keep it with nothing in flight for moments returns only after its
    last follow-up, while other callers keep arriving (and waking it)."""
    import threading
    import time

    from prefmill.serving.protocols import Request

    calls: list[int] = []

    def on_done(request, completions):
        calls.append(request.key)
        time.sleep(0.05)  # a callback that takes a while (rendering, parsing, tokenizing follow-ups)
        return [Request(request.key + 1, QUESTION, Sampling(seed=1, max_tokens=2))] if request.key < 6 else []

    stop = threading.Event()

    def others():
        while not stop.is_set():
            engine.chat([QUESTION], Sampling(seed=2, max_tokens=2))

    threads = [threading.Thread(target=others) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        engine.stream([Request(0, QUESTION, Sampling(seed=1, max_tokens=2))], on_done)
        assert calls == list(range(7))
    finally:
        stop.set()
        for t in threads:
            t.join()


def test_a_closed_engine_leaves_no_tokenizer_behind(model_path):
    """A long-lived process (`flow.serve`, the soak) opens an engine per run: once one is closed and
    dropped, its tokenizer and vLLM's copies of it (~20 MiB each) must go too, all but the one vLLM caches
    per model path (the next engine reuses it). Two holders kept them:
    vLLM's `_supports_kw` memo, keyed on each engine's own `TokenizerPool.apply_chat_template`, and a
    failed optional import's traceback holding the frames (and `self`) of whoever first imported vLLM."""
    import gc
    import weakref

    from prefmill.serving.engine import VLLMEngine

    def tokenizers() -> int:
        gc.collect()
        return sum(type(o).__name__.startswith(("CachedTokenizer", "TokenizerPool")) for o in gc.get_objects())

    from vllm.tokenizers.registry import cached_get_tokenizer  # vLLM's tokenizer per model path: kept, bounded

    before, cached = tokenizers(), cached_get_tokenizer.cache_info().currsize
    engine = VLLMEngine()
    engine.chat([QUESTION], Sampling(seed=1, max_tokens=4))
    engine.score([QUESTION], [{"role": "assistant", "content": "Wires."}])
    assert tokenizers() > before
    tokenizer = weakref.ref(engine.tokenizer)
    engine.close()
    del engine
    assert tokenizers() == before + cached_get_tokenizer.cache_info().currsize - cached  # collects first
    assert tokenizer() is None
