"""A pool of Ray actors, each hosting the models of a run, behind the `LanguageModel` protocol and `run`.

`run(step, rows)` sends a pipeline step and its shard to whichever actor is free; the actor calls the step
next to its engine (`serving.hosts.run_step`), so a shard's requests stay one continuous batch. An actor
that dies is restarted by Ray (models reload) and the step is retried on it. `chat`/`score` split the
requests into contiguous shards, one per actor, and put the results back in input order, raising if any
index is missing or duplicated.
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Sequence

import ray

from prefmill.schemas.config import EngineConfig, PoolConfig, prefmill_home
from prefmill.serving.hosts import ModelHost, Step, StepRun, run_step
from prefmill.serving.orphans import OrphanWatchdog
from prefmill.serving.placement import Device
from prefmill.serving.protocols import Completion, Conversation, Message, Sampling

if TYPE_CHECKING:
    from prefmill.serving.placement import Plan

_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}
# passed on to the actors when set in the driver: how loud vLLM is, where models live
_FORWARDED_ENV = ("VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
ACTOR_RESTARTS = 2


RAY_CONNECT_TIMEOUT_S = 5.0
_ADDRESS_HINT = ("start the cluster (`ray start --head`), check host and port (GCS port, default 6379; "
                 "ray://host:10001 for Ray Client), or leave ray.address unset for a local runtime")


class RayAddressError(ValueError):
    """A Ray address that nothing answers on: Ray itself would retry for a minute or more, then fail."""


def _check_reachable(address: str) -> None:
    """Fail fast when no process listens at `address` (host:port or ray://host:port; `auto` is not checked)."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise RayAddressError(f"Ray address {address!r} is not host:port; {_ADDRESS_HINT}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise RayAddressError(f"no Ray cluster answers at {address!r} ({exc}); {_ADDRESS_HINT}") from None


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start a local Ray runtime, or join the cluster at `address`; no-op when Ray is already up."""
    if ray.is_initialized():
        return
    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    env = {"PREFMILL_HOME": str(prefmill_home())} | {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env})
        except ConnectionError as exc:
            raise RayAddressError(f"cannot join the Ray cluster at {address!r}: {exc}; {_ADDRESS_HINT}") from None
        return
    # Ray's socket paths must stay under 108 bytes, so its temp folder lives right under /tmp
    temp_dir = os.environ.get("PREFMILL_RAY_TMP") or tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=False,
        _temp_dir=temp_dir,
        object_store_memory=256 * 2**20,
        log_to_driver=log_to_driver,
        runtime_env={"env_vars": env},
    )


def cluster_devices(address: str | None = None, gpu_memory: Any = None) -> tuple[Device, ...]:
    """The GPUs of every live node of the Ray cluster at `address`, each node's GPU memory read there by a
    one-GPU task (Ray's resources count GPUs, not their memory): `gpu_memory`, a Ray remote function giving
    the bytes of the GPU it gets (default: torch's view of it)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ensure_ray(address, log_to_driver=False)
    reader = gpu_memory or _gpu_memory
    gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) >= 1]
    memory = ray.get([reader.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                      .remote() for n in gpu_nodes])
    return tuple(Device(k, mem, node["NodeID"][:12]) for node, mem in zip(gpu_nodes, memory)
                 for k in range(int(node["Resources"]["GPU"])))


@ray.remote(num_gpus=1, num_cpus=0)
def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


class _ModelActor:
    """The models of one Ray worker process: the pool's engine is loaded at start, others on first use."""

    def __init__(self, engine_config: EngineConfig, prefix_batch: int = 8, plan: Plan | None = None):
        self.host = ModelHost(engine_config, prefix_batch=prefix_batch, plan=plan)
        self.engine = self.host.chat_model(engine_config.model)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()[:12]

    def run(self, step: Step, rows: Any) -> StepRun:
        return run_step(step, rows, self.host)

    def chat(self, indexed: list[tuple[int, Conversation]], sampling: Sampling) -> list[tuple[int, Any]]:
        results = self.engine.chat([c for _, c in indexed], sampling)
        return [(i, r) for (i, _), r in zip(indexed, results)]

    def score(self, indexed: list[tuple[int, tuple[Conversation, Message]]]) -> list[tuple[int, Any]]:
        results = self.engine.score([c for _, (c, _m) in indexed], [m for _, (_c, m) in indexed])
        return [(i, r) for (i, _), r in zip(indexed, results)]

    def ready(self) -> float:
        return self.engine.model.start_seconds

    def close(self) -> None:
        """Stop the engines' worker processes before the actor is killed, so none is left orphaned."""
        self.host.close()


class RayEnginePool:
    """A `LanguageModel` whose work is spread over `config.actors` Ray actors; with a placement `plan` (GPU)
    each actor reserves the GPUs one host of the plan uses, and places its models on them by the plan."""

    def __init__(self, config: PoolConfig = PoolConfig(), log_to_driver: bool = True, plan: Plan | None = None):
        # a local Ray runtime started here, and this pool's actors, end with this process even on kill -9 (Ray
        # stops its head processes then, not its agents; each actor's engine has a watchdog of its own)
        self._watchdog = OrphanWatchdog()
        ensure_ray(config.address, log_to_driver=log_to_driver)
        self.config = config
        self.name = config.engine.model
        # a threaded actor: its `steps_per_actor` concurrent steps share its engine's continuous batch
        gpus = plan.gpus if plan is not None and plan.gpus else config.gpus_per_actor
        actor_class = ray.remote(num_cpus=config.cpus_per_actor, num_gpus=gpus,
                                 max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS,
                                 max_concurrency=config.steps_per_actor)(_ModelActor)
        self.actors = [actor_class.remote(_actor_engine_config(config, k, gpus), config.prefix_batch, plan)
                       for k in range(config.actors)]
        self.start_seconds = ray.get([a.ready.remote() for a in self.actors])
        self._idle: queue.Queue = queue.Queue()
        for _ in range(config.steps_per_actor):  # round-robin slots: work spreads over actors first
            for actor in self.actors:
                self._idle.put(actor)

    @property
    def hosts(self) -> int:
        """The actors steps run on (callers that split work into steps at once aim at this many)."""
        return len(self.actors)

    def run(self, step: Step, rows: Any) -> StepRun:
        """Run `step(rows, host)` on the next actor with a free slot (callers in several threads share the
        pool)."""
        actor = self._idle.get()
        try:
            return ray.get(actor.run.remote(step, rows))
        finally:
            self._idle.put(actor)

    def chat(self, conversations: Sequence[Conversation], sampling: Sampling) -> list[list[Completion]]:
        return self._fan_out(list(conversations), lambda actor, shard: actor.chat.remote(shard, sampling))

    def score(self, conversations: Sequence[Conversation], continuations: Sequence[Message]) -> list[list[float]]:
        if len(conversations) != len(continuations):
            raise ValueError(f"{len(conversations)} conversations but {len(continuations)} continuations")
        pairs = list(zip(conversations, continuations))
        return self._fan_out(pairs, lambda actor, shard: actor.score.remote(shard))

    def actors_per_node(self) -> dict[str, int]:
        """Where Ray placed the actors: node id → actors (for the run summary)."""
        nodes: dict[str, int] = {}
        for node in ray.get([actor.node.remote() for actor in self.actors]):
            nodes[node] = nodes.get(node, 0) + 1
        return nodes

    def shutdown(self) -> None:
        """Close every actor's engines, then end the actors."""
        ray.get([actor.close.remote() for actor in self.actors])
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        self._watchdog.stop()

    def _fan_out(self, items: list, call: Callable) -> list:
        shards = split_evenly(list(enumerate(items)), len(self.actors))
        refs = [call(actor, shard) for actor, shard in zip(self.actors, shards) if shard]
        return in_input_order([pair for part in ray.get(refs) for pair in part], len(items))


def _actor_engine_config(config: PoolConfig, index: int, gpus: float) -> EngineConfig:
    """On a local CPU runtime, give each actor its own cores so engines do not fight over one."""
    if config.address or gpus or config.engine.cpu_cores:
        return config.engine
    cores = sorted(os.sched_getaffinity(0))
    mine = split_evenly(cores, config.actors)[index] or cores
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
