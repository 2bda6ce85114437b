"""A run's placement plan (`serving.placement`): the model roles its stages declare, the embedder, and the
devices of this machine, of the Ray cluster, or of a hypothetical inventory ("2x80GiB")."""

from __future__ import annotations

from prefmill.flows.stages import Stage, build_stages
from prefmill.operators.flr import load_followups
from prefmill.schemas.config import PipelineConfig
from prefmill.serving.placement import (
    Device,
    ModelSize,
    Plan,
    Role,
    ScorerLoad,
    cuda_devices,
    model_size,
    parse_devices,
    plan_placement,
)


def plan_for(cfg: PipelineConfig, devices: str | None = None, stages: list[Stage] | None = None) -> Plan:
    """The plan of a run of `cfg` (its `stages`, when built already) on `devices` (e.g. "2x80GiB"), or on the
    machine / Ray cluster it would run on; raises `PlacementError` when the models cannot fit. Record
    `plan.summary()` with the run."""
    inventory = parse_devices(devices) if devices is not None else machine_devices(cfg)
    section = cfg.placement
    if cfg.backend == "http":  # the server holds the chat models; only the scorer and the driver's embedder are ours
        section = section.model_copy(update={"flr_scorer": "transformers", "embedder_device": "cpu"})
    followups = load_followups(cfg.flr.followups) if cfg.flr.followups else load_followups()
    load = ScorerLoad(cfg.flr.prefix_batch * len(followups), cfg.flr.max_tokens)
    return plan_placement(run_roles(cfg, stages), inventory, spec_size, cfg.engine, section, load)


def run_roles(cfg: PipelineConfig, stages: list[Stage] | None = None) -> list[Role]:
    """Every model role of the stages `cfg` turns on (chat roles left out on backend http, and one with a
    `url`: a server holds them), then the embedder; a role named twice with one spec is listed once."""
    roles = [Role(name, role.spec, role.kind) for stage in stages or build_stages(cfg)
             for name, role in stage.roles().items()
             if not ((cfg.backend == "http" and role.kind == "chat") or role.url)]
    return list(dict.fromkeys(roles)) + [Role("embedder", cfg.models.embedder, "embedder")]


def machine_devices(cfg: PipelineConfig) -> tuple[Device, ...]:
    """The GPUs a run would use: the Ray cluster's when it joins one, else this machine's."""
    if cfg.backend == "ray" and cfg.ray.address:
        from prefmill.serving.ray_pool import cluster_devices

        return cluster_devices(cfg.ray.address)
    return cuda_devices()


def spec_size(spec: str) -> ModelSize:
    """A model spec's size from its config.json (an embedder spec resolves like the embedder does)."""
    from prefmill.serving.embedder import DEFAULT_EMBEDDER, embedder_path
    from prefmill.serving.models import resolve_model

    return model_size(embedder_path(spec) if spec == DEFAULT_EMBEDDER else resolve_model(spec))
