"""The one place a backend name is turned into models: a `LanguageModel` (`open_model`, for `prefmill chat` and
a host's engines) or a pool that runs pipeline stages next to the models (`open_pool`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from prefmill.schemas.config import EngineConfig, PoolConfig
from prefmill.serving.protocols import LanguageModel

if TYPE_CHECKING:
    from prefmill.serving.placement import Plan

BACKENDS = ("engine", "ray", "http")


def open_model(spec: str, backend: str = "engine", actors: int = 1, address: str | None = None,
               url: str | None = None, engine: EngineConfig | None = None, devices: Sequence[int] = ()
               ) -> LanguageModel:
    """A model for `spec` on `backend` (an in-process engine on the GPUs `devices`, when given); raises
    ValueError naming the bad argument."""
    config = (engine or EngineConfig()).model_copy(update={"model": spec})
    if backend == "engine":
        from prefmill.serving.engine import VLLMEngine

        return VLLMEngine(config, devices)
    if backend == "ray":
        from prefmill.serving.ray_pool import RayEnginePool

        return RayEnginePool(PoolConfig(engine=config, actors=actors, address=address))
    if backend == "http":
        if not url:
            raise ValueError("backend 'http' needs --url, e.g. http://127.0.0.1:8000/v1")
        from prefmill.serving.http_client import OpenAICompatibleClient

        return OpenAICompatibleClient(url, spec)
    raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def open_pool(backend: str, config: PoolConfig, url: str | None = None, plan: Plan | None = None) -> Any:
    """Where stages run: a pool of Ray actors holding the models (`ray`), else this process's `ModelHost`,
    whose engines are in process (`engine`) or clients of the server at `url` (`http`). With a placement
    `plan`, models take the GPUs and memory shares it gives them."""
    if backend == "ray":
        from prefmill.serving.ray_pool import RayEnginePool

        return RayEnginePool(config, log_to_driver=False, plan=plan)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    from prefmill.serving.hosts import LocalPool, ModelHost

    return LocalPool(ModelHost(config.engine, url=url if backend == "http" else None, prefix_batch=config.prefix_batch,
                               plan=plan))
