"""Pydantic configs shared by every layer, and where prefmill keeps its files."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODEL = "smollm2-135m"


def prefmill_home() -> Path:
    """`$PREFMILL_HOME`, else `~/.cache/prefmill`: models, the default catalog and run state live here."""
    return Path(os.environ.get("PREFMILL_HOME") or Path.home() / ".cache" / "prefmill").expanduser()


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """An advisory lock between processes on `path` (shared or exclusive), released on exit."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class EngineConfig(BaseModel):
    """How to start one vLLM engine. `None` fields get the right value for the device (CPU or GPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = DEFAULT_MODEL
    dtype: str | None = Field(default=None, description="None: float32 on CPU (no bf16 units here), bfloat16 on GPU")
    max_model_len: int = 4096
    kv_cache_fraction: float | None = Field(default=None, description="share of GPU memory the engine may take")
    cpu_kv_cache_gib: float = Field(default=1.0, description="KV-cache size on CPU, in GiB")
    cpu_cores: str | None = Field(default=None, description="cores the CPU engine binds, e.g. '0-1'; None: all")
    enforce_eager: bool | None = Field(default=None, description="skip graph compilation; True on CPU")
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    seed: int = 0


class PoolConfig(BaseModel):
    """A pool of Ray actors, each hosting one engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    engine: EngineConfig = EngineConfig()
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    address: str | None = Field(default=None, description="a Ray cluster address; None starts a local runtime")


def config_hash(config: BaseModel | dict) -> str:
    """A short stable hash of a config, for lineage and resume keys."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
