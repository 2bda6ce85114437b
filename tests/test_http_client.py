"""The OpenAI-compatible client against a real `vllm serve` process on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import httpx
import pytest

from schemas.config import EngineConfig
from serving.http_client import OpenAICompatibleClient
from serving.protocols import Sampling
from serving.server import server_command

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    cmd = server_command(EngineConfig(model=model_path), port=port)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, f"vllm serve exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        else:
            pytest.fail(f"vllm serve did not come up:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_chat_over_http_gives_n_replies_and_reproduces(server, model_path):
    client = OpenAICompatibleClient(server + "/v1", model_path)
    conversations = [[{"role": "user", "content": "Name a fruit."}], [{"role": "user", "content": "Name a tree."}]]
    sampling = Sampling(n=3, seed=4, max_tokens=20, temperature=1.0)
    first = client.chat(conversations, sampling)
    assert [len(r) for r in first] == [3, 3]
    assert all(c.text and c.finish_reason in {"stop", "length"} for r in first for c in r)
    assert [[c.text for c in r] for r in client.chat(conversations, sampling)] == [[c.text for c in r] for r in first]


def test_score_over_http_matches_the_in_process_engine(server, model_path, engine):
    client = OpenAICompatibleClient(server + "/v1", model_path)
    conversations = [[{"role": "user", "content": "What is the capital of France?"}]] * 2
    continuations = [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks, that helps!"}]
    for got, want in zip(client.score(conversations, continuations), engine.score(conversations, continuations)):
        assert len(got) == len(want)
        assert got == pytest.approx(want, abs=1e-3)


def test_server_errors_are_reported_with_status(server):
    client = OpenAICompatibleClient(server + "/v1", "no-such-model", tokenizer="smollm2-135m")
    with pytest.raises(RuntimeError, match="answered 404"):
        client.chat([[{"role": "user", "content": "hi"}]], Sampling(max_tokens=4))
