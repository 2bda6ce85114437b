"""The OpenAI-compatible client against a real `prefmill serve` process on 127.0.0.1 (conftest's
`http_server`), and against a scripted local server for the error answers (which must not wait for a model
to load)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prefmill.serving.http_client import OpenAICompatibleClient
from prefmill.serving.protocols import PROMPT_TOO_LONG, Completion, Sampling

# what vLLM's server answers a prompt over the window, as it words it now (0.32) and as it used to (0.9)
TOO_LONG_NOW = {"error": {"message": "This model's maximum context length is 4096 tokens. However, your prompt "
                                     "contains 5012 input tokens, which exceeds this limit even without any output "
                                     "tokens. Please reduce the length of the input prompt.",
                          "type": "BadRequestError", "param": "input_tokens", "code": 400}}
TOO_LONG_OLD = {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you "
                "requested 2100 tokens (2000 in the messages, 100 in the completion). Please reduce the length "
                "of the messages or completion.", "type": "BadRequestError", "param": None, "code": 400}
OTHER_400 = {"error": {"message": "temperature must be non-negative, got -1.0.", "type": "BadRequestError",
                       "param": "temperature", "code": 400}}
ANSWERS = {"too long now": (400, TOO_LONG_NOW), "too long old": (400, TOO_LONG_OLD), "bad": (400, OTHER_400),
           "broken": (500, {"error": {"message": "maximum context length", "code": 500}})}


class ScriptedServer(BaseHTTPRequestHandler):
    """/v1/chat/completions: the error of `ANSWERS` named by the last message, else n short replies."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, answer = ANSWERS.get(body["messages"][-1]["content"], (200, None))
        if answer is None:
            answer = {"choices": [{"index": k, "message": {"content": f"reply {k}"}, "finish_reason": "stop"}
                                  for k in range(body["n"])], "usage": {"completion_tokens": 2 * body["n"]}}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scripted_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def ask(text: str) -> list:
    return [{"role": "user", "content": text}]


def test_a_prompt_over_the_context_window_is_answered_prompt_too_long_and_the_batch_goes_on(scripted_server):
    client = OpenAICompatibleClient(scripted_server, "m", concurrency=2)
    out = client.chat([ask("hi"), ask("too long now"), ask("too long old"), ask("hello")], Sampling(n=2))
    assert out[0] == out[3] == [Completion("reply 0", 2, "stop"), Completion("reply 1", 2, "stop")]
    assert out[1] == out[2] == [Completion("", 0, PROMPT_TOO_LONG)] * 2


@pytest.mark.parametrize("text, status", [("bad", 400), ("broken", 500)])
def test_every_other_error_still_fails_with_its_status(scripted_server, text, status):
    client = OpenAICompatibleClient(scripted_server, "m")
    with pytest.raises(RuntimeError, match=f"answered {status}"):
        client.chat([ask("hi"), ask(text)], Sampling())


@pytest.mark.slow
def test_chat_over_http_gives_n_replies_and_reproduces(http_server):
    client = OpenAICompatibleClient(http_server + "/v1", "smollm2-135m")  # served under its spec too
    conversations = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Name a tree."}]]
    sampling = Sampling(n=3, seed=4, max_tokens=20, temperature=1.0)
    first = client.chat(conversations, sampling)
    assert [len(r) for r in first] == [3, 3]
    assert all(c.text and c.finish_reason in {"stop", "length"} for r in first for c in r)
    assert [[c.text for c in r] for r in client.chat(conversations, sampling)] == [[c.text for c in r] for r in first]


@pytest.mark.slow
def test_score_over_http_matches_the_in_process_engine(http_server, model_path, engine):
    client = OpenAICompatibleClient(http_server + "/v1", model_path)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}]] * 2
    continuations = [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks, that helps!"}]
    got, want = client.score(conversations, continuations), engine.score(conversations, continuations)
    assert len(want) == 2 and all(want)
    for got_row, want_row in zip(got, want, strict=True):
        assert len(got_row) == len(want_row)
        assert got_row == pytest.approx(want_row, abs=1e-3)


@pytest.mark.slow
def test_server_errors_are_reported_with_status(http_server):
    client = OpenAICompatibleClient(http_server + "/v1", "no-such-model", tokenizer="smollm2-135m")
    with pytest.raises(RuntimeError, match="answered 404"):
        client.chat([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=4))


@pytest.mark.slow
def test_a_prompt_over_the_real_servers_window_is_prompt_too_long(http_server, model_path):
    client = OpenAICompatibleClient(http_server + "/v1", model_path)
    too_long = "1234567890" * 500  # 5,000 digit tokens, over the default 4,096-token window
    short, long = client.chat([ask("Name a fruit."), ask(too_long)], Sampling(n=2, seed=1, max_tokens=8))
    assert all(c.text for c in short) and long == [Completion("", 0, PROMPT_TOO_LONG)] * 2
