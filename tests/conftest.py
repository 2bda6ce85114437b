"""One vLLM engine, one `prefmill serve` server and one Ray runtime per test session; everything else is per
test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFMILL_HOME", str(REPO / ".prefmill"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# flows run in tests talk to a temporary Prefect API with its own database, not the user's ~/.prefect
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="pm-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def model_path() -> str:
    from prefmill.serving.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def engine(model_path):
    from prefmill.serving.engine import VLLMEngine

    engine = VLLMEngine()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def make_ray_pool(model_path):
    """Opens `RayEnginePool(config, plan=None)`s for one test module, each Ray runtime in a short temp folder under
    /tmp (Ray's socket paths must stay under 108 bytes: pytest's deep tmp_path is too long); at the end of
    the module they are shut down with Ray and their folders removed."""
    import ray

    from prefmill.serving.ray_pool import RayEnginePool

    opened = []

    def make(config, plan=None):
        temp = tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp")
        os.environ["PREFMILL_RAY_TMP"] = temp
        opened.append((RayEnginePool(config, plan=plan), temp))
        return opened[-1][0]
    yield make
    for pool, _ in opened:
        pool.shutdown()
    if opened:
        ray.shutdown()
    for _, temp in opened:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_pool(make_ray_pool):
    """Module-scoped so its two engines are gone before later modules start theirs (vLLM on CPU binds
    memory to NUMA node 0, which is smaller than the machine's RAM)."""
    from prefmill.schemas.config import PoolConfig

    return make_ray_pool(PoolConfig(actors=2))


@pytest.fixture(scope="session")
def hf_model(model_path):
    """The same weights in transformers, float32, for hand computations."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="session")
def embedder():
    from prefmill.serving.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder()


@pytest.fixture(scope="session")
def http_server(model_path, tmp_path_factory):
    """`prefmill serve` of the embedded model on a free port of 127.0.0.1 (for the http backend's tests):
    its base URL, once it answers /health. Stopped at the end of the session."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("prefmill-serve") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("prefmill")), "serve", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, f"prefmill serve exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail(f"prefmill serve did not come up:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
