"""Scheduled deployments of the pipeline flow, and listing them.

Two ways, both taking the validated config as the deployment's `config` parameter:
- served (`serve`): this process registers the deployment and runs its scheduled and triggered runs, each
  in a subprocess, until stopped. Nothing else to start.
- a work pool (`deploy_to_pool`): the deployment points at this checkout (`from_source`) and a process work
  pool; any `prefect worker start --pool P` on a machine with the checkout runs it.
Each run of a deployment gets a run id from its scheduled time (see `flows.pipeline.pipeline`), so every
scheduled run publishes a new version, deduplicated against the ones before it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectAlreadyExists

from prefmill.flows.pipeline import pipeline
from prefmill.schemas.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/pipeline.py:pipeline"


def serve(name: str, cron: str, cfg: PipelineConfig) -> None:
    """Register deployment `name` on `cron` and run its flow runs from this process (blocks)."""
    pipeline.serve(name=name, cron=cron, parameters={"config": cfg.model_dump(mode="json")},
                   description=f"prefmill pipeline → dataset {cfg.dataset!r}", print_starting_message=True)


def deploy_to_pool(name: str, cron: str, cfg: PipelineConfig, pool: str) -> str:
    """Register deployment `name` on `cron` in process work pool `pool` (created when missing); returns its id."""
    asyncio.run(_ensure_process_pool(pool))
    flow = pipeline.from_source(source=str(REPO), entrypoint=ENTRYPOINT)
    deployment_id = flow.deploy(name=name, work_pool_name=pool, cron=cron,
                                parameters={"config": cfg.model_dump(mode="json")},
                                description=f"prefmill pipeline → dataset {cfg.dataset!r}", print_next_steps=False)
    return str(deployment_id)


async def _ensure_process_pool(pool: str) -> None:
    async with get_client() as client:
        try:
            await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass


def list_deployments() -> list[dict]:
    """Every deployment of the pipeline flow: name, schedules, work pool, status, last runs."""
    return asyncio.run(_list())


async def _list() -> list[dict]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        deployments = await client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[pipeline.name])))
        out = []
        for d in deployments:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[d.id])),
                sort=FlowRunSort.START_TIME_DESC, limit=3)
            out.append({"name": f"{pipeline.name}/{d.name}", "id": str(d.id),
                        "schedules": [getattr(s.schedule, "cron", None) or str(s.schedule) for s in d.schedules],
                        "work_pool": d.work_pool_name or "(served)", "status": str(d.status.value if d.status else ""),
                        "last_runs": [f"{r.state_name} {r.start_time:%Y-%m-%d %H:%M}" if r.start_time
                                      else r.state_name for r in runs]})
        return out
