"""A pool of Ray actors, each hosting one vLLM engine, behind the `LanguageModel` protocol.

Requests are split into contiguous shards, one per actor; every actor returns (index, result) pairs and
the pool puts them back in input order, raising if any index is missing or duplicated.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import ray

from schemas.config import EngineConfig, PoolConfig, prefmill_home
from serving.protocols import Completion, Conversation, Message, Sampling

_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local Ray runtime, or join the cluster at `address`; no-op when Ray is already up."""
    if ray.is_initialized():
        return
    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    if address:
        ray.init(address=address)
        return
    # Ray's socket paths must stay under 108 bytes, so its temp folder lives right under /tmp
    temp_dir = os.environ.get("PREFMILL_RAY_TMP") or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=temp_dir,
        object_store_memory=256 * 2**20,
        runtime_env={"env_vars": {"PREFMILL_HOME": str(prefmill_home())}},
    )


class _EngineActor:
    """One engine inside a Ray worker process."""

    def __init__(self, engine_config):
        from serving.engine import VLLMEngine

        self.engine = VLLMEngine(engine_config)

    def chat(self, indexed: list[tuple[int, Conversation]], sampling: Sampling) -> list[tuple[int, Any]]:
        results = self.engine.chat([c for _, c in indexed], sampling)
        return [(i, r) for (i, _), r in zip(indexed, results)]

    def score(self, indexed: list[tuple[int, tuple[Conversation, Message]]]) -> list[tuple[int, Any]]:
        results = self.engine.score([c for _, (c, _m) in indexed], [m for _, (_c, m) in indexed])
        return [(i, r) for (i, _), r in zip(indexed, results)]

    def ready(self) -> float:
        return self.engine.start_seconds


class RayEnginePool:
    """A `LanguageModel` whose work is spread over `config.num_actors` Ray actors."""

    def __init__(self, config: PoolConfig = PoolConfig()):
        ensure_ray(config.address)
        self.config = config
        self.name = config.engine.model
        actor_class = ray.remote(num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor)(_EngineActor)
        self.actors = [actor_class.remote(_actor_engine_config(config, k)) for k in range(config.num_actors)]
        self.start_seconds = ray.get([a.ready.remote() for a in self.actors])

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        return self._fan_out(list(conversations), lambda actor, shard: actor.chat.remote(shard, sampling))

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        if len(conversations) != len(continuations):
            raise ValueError(f"{len(conversations)} conversations but {len(continuations)} continuations")
        pairs = list(zip(conversations, continuations))
        return self._fan_out(pairs, lambda actor, shard: actor.score.remote(shard))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _fan_out(self, items: list, call: Callable) -> list:
        shards = split_evenly(list(enumerate(items)), len(self.actors))
        refs = [call(actor, shard) for actor, shard in zip(self.actors, shards) if shard]
        return in_input_order([pair for part in ray.get(refs) for pair in part], len(items))


def _actor_engine_config(config: PoolConfig, index: int) -> EngineConfig:
    """On a local CPU runtime, give each actor its own cores so engines do not fight over one."""
    if config.address or config.gpus_per_actor or config.engine.cpu_cores:
        return config.engine
    cores = sorted(os.sched_getaffinity(0))
    mine = split_evenly(cores, config.num_actors)[index] or cores
    return config.engine.model_copy(update={"cpu_cores": ",".join(map(str, mine))})


def split_evenly(items: list, parts: int) -> list[list]:
    """`parts` contiguous shards whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    shards, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        shards.append(items[start:end])
        start = end
    return shards


def in_input_order(pairs: list[tuple[int, Any]], expected: int) -> list:
    """Results keyed by input index, in order; a missing or duplicated index raises."""
    results: dict[int, Any] = {}
    for index, value in pairs:
        if index in results:
            raise RuntimeError(f"duplicated result for input {index}")
        results[index] = value
    missing = sorted(set(range(expected)) - results.keys())
    if missing or len(results) != expected:
        raise RuntimeError(f"missing results for inputs {missing[:10]} (got {len(results)} of {expected})")
    return [results[i] for i in range(expected)]
