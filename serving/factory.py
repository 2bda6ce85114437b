"""Open a `LanguageModel` by backend name: in-process engine, Ray actor pool, or an HTTP server."""

from __future__ import annotations

from prefmill.schemas.config import EngineConfig, PoolConfig
from prefmill.serving.protocols import LanguageModel

BACKENDS = ("engine", "ray", "http")


def open_model(spec: str, backend: str = "engine", actors: int = 1, address: str | None = None,
               url: str | None = None, engine: EngineConfig | None = None) -> LanguageModel:
    """A model for `spec` on `backend`; raises ValueError naming the bad argument."""
    config = (engine or EngineConfig()).model_copy(update={"model": spec})
    if backend == "engine":
        from prefmill.serving.engine import VLLMEngine

        return VLLMEngine(config)
    if backend == "ray":
        from prefmill.serving.ray_pool import RayEnginePool

        return RayEnginePool(PoolConfig(engine=config, num_actors=actors, address=address))
    if backend == "http":
        if not url:
            raise ValueError("backend 'http' needs --url, e.g. http://127.0.0.1:8000/v1")
        from prefmill.serving.http_client import OpenAICompatibleClient

        return OpenAICompatibleClient(url, spec)
    raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
