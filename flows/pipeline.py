"""The pipeline as a Prefect flow: the config's stages over shards of seeds, then pairs → dedup → publish.

The flow body is the stage list built from the config (`flows.stages.build_stages`), run stage by stage:
every shard of a stage at once (one continuous batch on the engine), then the next stage, so the FLR scorer
never competes with generation for the device. Each stage × shard is a Prefect task run; its result is kept
in prefmill's own content-addressed store (`storage.shards.ShardStore`), keyed by the stage's fingerprint
and the digests of the tables it consumes, never a run id: a re-run after a crash computes only unfinished
shards, and one with nothing left to compute loads no model. The model work runs where the models are: in
process (`engine`, `http`) or on Ray actors (`ray`), see `serving.hosts`. Pairs, dedup and publish follow as
tasks of their own; publishing is one atomic snapshot, skipped when the run id already published (the run
id hashes the config and the seeds, so a re-run is recognised).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
from prefect import Flow, flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed, wait

from prefmill.flows.placement import plan_for
from prefmill.flows.report import create_artifacts, dataset_card
from prefmill.flows.results import RunResult, StageStats
from prefmill.flows.stages import Stage, build_stages, seed_quarantine
from prefmill.operators.dedup import Deduper, DedupResult, has_pair_vectors, with_pair_vectors
from prefmill.operators.ids import stable_id
from prefmill.operators.pairs import MinedPairs, PairMiner
from prefmill.operators.seeds import BUILTIN_SEEDS, load_seeds
from prefmill.schemas.config import PipelineConfig, PoolConfig, settings, validate_pipeline_config
from prefmill.schemas.tables import DEDUP_REMOVED, PAIR_EMBEDDINGS, PAIR_REJECTS, PAIRS, SCHEMAS
from prefmill.serving.factory import open_pool as serving_pool
from prefmill.serving.hosts import StepRun
from prefmill.serving.models import model_identity
from prefmill.serving.placement import Plan
from prefmill.serving.protocols import Embedder
from prefmill.storage.catalog import Catalog
from prefmill.storage.shards import ShardStore, StoredShard

FLOW_NAME = "prefmill-pipeline"
Reporter = Callable[[str, int, int], None]  # (stage, shards done, shards total)


def no_report(stage: str, done: int, total: int) -> None:
    """The reporter of a run nobody watches."""


@dataclass(frozen=True)
class ShardResult:
    """One stage × shard: the tables it produced, their content digests, what it cost, whether it was stored."""

    tables: dict[str, pa.Table]
    digests: dict[str, str]
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    started_at: float = 0.0  # epoch seconds when the step began (shards run at once: see `busy_seconds`)
    cached: bool = False

    @classmethod
    def computed(cls, run: StepRun) -> ShardResult:
        digests = {name: content_digest(table) for name, table in run.value.items()}
        return cls(run.value, digests, run.seconds, run.requests, run.tokens, run.started_at)

    @classmethod
    def stored(cls, shard: StoredShard) -> ShardResult:
        return cls(shard.tables, shard.meta["digests"], cached=True)

    def to_store(self) -> StoredShard:
        return StoredShard(self.tables, {"digests": self.digests, "seconds": self.seconds})


class Shard:
    """One shard's tables as the stages produce them (a later stage may refine an earlier one's table)."""

    def __init__(self, seeds: pa.Table):
        self.tables = {"seeds": seeds}
        self.digests = {"seeds": content_digest(seeds)}

    def inputs(self, stage: Stage) -> dict[str, pa.Table]:
        return {name: self.tables[name] for name in stage.consumes}

    def key(self, stage: Stage, fingerprint: str) -> str:
        """The resume key: the stage's fingerprint and the content of what it consumes, never the run id."""
        return f"{stage.name}-{fingerprint}-{content_digest([self.digests[n] for n in stage.consumes])}"

    def take(self, result: ShardResult) -> None:
        self.tables |= result.tables
        self.digests |= result.digests


class RunModels:
    """The run's models: the lent pool, else one opened for the config's backend on first need (a fully
    cached re-run loads none) and shut down when the run ends. A plain object handed to every task as an
    argument, so runs in one process never share one."""

    def __init__(self, cfg: PipelineConfig, lent: Any = None, plan: Plan | None = None):
        self.cfg, self.lent, self.plan, self.owned, self.closed = cfg, lent, plan, None, False
        self.lock = threading.Lock()

    def pool(self) -> Any:
        with self.lock:
            if self.closed:  # a task still running after its run ended (interrupted) must not open a new pool
                raise RuntimeError("this pipeline run has ended; its models are closed")
            if self.lent is None and self.owned is None:
                self.owned = open_pool(self.cfg, self.plan)
            return self.lent if self.lent is not None else self.owned

    def __enter__(self) -> RunModels:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Shut the owned pool down (a lent one is its lender's); no pool opens after this."""
        with self.lock:
            owned, self.owned, self.lent, self.closed = self.owned, None, None, True
        if owned is not None:
            owned.shutdown()


def content_digest(value: Any) -> str:
    """A stable hash of tables, lists of rows, or dataclasses of them."""
    return hashlib.sha256(json.dumps(_plain(value), sort_keys=True, default=str).encode()).hexdigest()[:24]


def _plain(value: Any) -> Any:
    if isinstance(value, pa.Table):
        return value.to_pylist()
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="{stage.name}-{shard}")
def stage_task(stage: Stage, shard: int, inputs: dict[str, pa.Table], key: str, models: RunModels,
               store: ShardStore) -> ShardResult:
    """Run one stage on one shard where the models are, unless its result is in the store already."""
    stored = store.get(key)
    if stored is not None:
        return ShardResult.stored(stored)
    result = ShardResult.computed(models.pool().run(stage, inputs))
    store.put(key, result.to_store())
    return result


def pipeline_flow(pool: Any = None, reporter: Reporter = no_report) -> Flow:
    """The pipeline flow, with its model work on `pool` (tests share one engine; None: a pool opened for the
    config's backend) and its progress sent to `reporter`. Both are arguments of this function, not flow
    parameters (those must serialize)."""

    @flow(name=FLOW_NAME, log_prints=True, persist_result=False)
    def pipeline(config: dict, run_key: str = "") -> RunResult:
        """Run the whole pipeline for `config` (a `PipelineConfig` as a dict).

        `run_key` tells apart runs with the same config and seeds: a deployment's runs use their scheduled
        time, so every scheduled run is a new run while a retried one resumes; ad hoc runs leave it empty,
        so running the same config again resumes (or finds it published).
        """
        from prefect.runtime import deployment, flow_run

        if not run_key and deployment.id:
            run_key = str(flow_run.scheduled_start_time)
        return run_pipeline(validate_pipeline_config(config), run_key, pool, reporter)

    return pipeline


pipeline = pipeline_flow()  # the flow deployments serve


def run_pipeline(cfg: PipelineConfig, run_key: str = "", pool: Any = None, reporter: Reporter = no_report
                 ) -> RunResult:
    """The flow body: the config's stages over every shard, then pairs, dedup and publish."""
    started = time.perf_counter()
    loaded = load_seeds(Path(cfg.seeds.path) if cfg.seeds.path else BUILTIN_SEEDS)
    seeds = run_seeds(cfg, loaded.seeds)
    result = RunResult(run_id(cfg, seeds, run_key), cfg.fingerprint())
    catalog = Catalog(cfg.catalog)
    result.versions = find_published(catalog, result.run_id)
    if result.versions:
        result.already_published = True
        return result
    stages = build_stages(cfg)
    quarantine = pa.concat_tables([loaded.quarantine, seed_quarantine(stages, seeds)])
    plan = plan_for(cfg, stages=stages)  # before any model loads: an impossible placement fails here
    result.placement = plan.summary()
    result.model_ids = model_identities(cfg, stages)
    with RunModels(cfg, pool, plan) as models:  # open until dedup when a big ray run embeds on the actors
        shards = run_stages(stages, shard_seeds(cfg, seeds), models, ShardStore(cfg.results_path()), result,
                            reporter)
        tables = collect(shards, seeds, quarantine)
        mined = timed(result, "pairs", all_pairs, cfg, stages, tables, result.run_id,
                      result.model_ids[cfg.models.assistant])
        embedder = dedup_embedder(cfg, models, plan, mined.pairs.num_rows)
        if embedder.where == "driver":
            models.close()  # a dedup in this process needs none of the run's models
        deduped = timed(result, "dedup", dedup_pairs, cfg, catalog, mined.pairs, result.run_id, embedder)
    result.embedding = embedder.summary()
    result.tables = published_tables(cfg, stages, tables, mined, deduped)
    result.card = dataset_card(cfg, result)
    result.versions = timed(result, "publish", publish, cfg, catalog, result)
    result.wall_seconds = time.perf_counter() - started
    create_artifacts(result)
    return result


def run_seeds(cfg: PipelineConfig, seeds: pa.Table) -> pa.Table:
    """The seeds a run takes from its seed file (`seeds.limit` first ones, else all)."""
    return seeds.slice(0, cfg.seeds.limit) if cfg.seeds.limit else seeds


def shard_seeds(cfg: PipelineConfig, seeds: pa.Table) -> list[Shard]:
    size = shard_size(cfg, seeds.num_rows)
    return [Shard(seeds.slice(i, size)) for i in range(0, seeds.num_rows, size)]


AUTO_SHARD_SIZES = (4, 64)  # at 64 seeds a shard, a stage task's ~18 ms is < 2 ms a seed (docs/benchmarks.md)
SHARDS_PER_ACTOR = 4  # enough for a slow shard not to idle an actor


def shard_size(cfg: PipelineConfig, seeds: int) -> int:
    """`cfg.shard_size`, or for `auto` the run's seeds split into `SHARDS_PER_ACTOR` shards per actor, within
    `AUTO_SHARD_SIZES`: small runs keep small shards (fine-grained resume), big ones few tasks."""
    if cfg.shard_size != "auto":
        return cfg.shard_size
    actors = cfg.ray.actors if cfg.backend == "ray" else 1
    smallest, largest = AUTO_SHARD_SIZES
    return max(smallest, min(largest, math.ceil(seeds / (SHARDS_PER_ACTOR * actors))))


def run_id(cfg: PipelineConfig, seeds: pa.Table, run_key: str) -> str:
    """The given run id, else a hash of the config, the seeds and the run key: a re-run after a crash
    gets the same id, so its publish is recognised as done."""
    return cfg.run_id or stable_id("run", cfg.fingerprint(), content_digest(seeds), run_key)[4:]


def find_published(catalog: Catalog, run: str) -> dict[str, int]:
    if not catalog.exists():
        return {}
    return {name: v.version for name, v in catalog.find_run(run).items()}


def timed(result: RunResult, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, its wall seconds recorded as `stage`'s."""
    started = time.perf_counter()
    value = fn(*args)
    result.stage_wall[stage] = time.perf_counter() - started
    return value


def model_identities(cfg: PipelineConfig, stages: list[Stage]) -> dict[str, str]:
    """Each model the run uses (the policy always) by spec → its identity: the spec and a hash of its files; a
    model only served elsewhere (a role with a `url`: its files are not ours to read) is `spec@remote`."""
    roles = [role for stage in stages for role in stage.roles().values()]
    local = {cfg.models.assistant} | {role.spec for role in roles if not role.url}
    remote = {role.spec for role in roles if role.url} - local
    return {spec: model_identity(spec) if spec in local else f"{spec}@remote" for spec in sorted(local | remote)}


def run_stages(stages: list[Stage], shards: list[Shard], models: RunModels, store: ShardStore,
               result: RunResult, report: Reporter) -> list[Shard]:
    """Every stage over every shard, stage by stage (all of a stage's shards at once)."""
    for stage in stages:
        models_used = [result.model_ids[role.spec] for role in stage.roles().values()]
        fingerprint = content_digest([stage.fingerprint(), models_used])  # new weights under one spec: recompute
        futures = {stage_task.submit(stage, i, shard.inputs(stage), shard.key(stage, fingerprint), models, store): i
                   for i, shard in enumerate(shards)}
        timed(result, stage.name, collect_stage, stage.name, futures, shards, result, report)
    return shards


def collect_stage(stage: str, futures: dict[PrefectFuture, int], shards: list[Shard], result: RunResult,
                  report: Reporter) -> None:
    """Take each shard's result as it finishes; on a failure, let the running siblings finish (so no engine is
    shut down under a running step, whose replies would come back aborted), then raise it."""
    stats = result.stages.setdefault(stage, StageStats())
    try:
        for future in as_completed(list(futures)):
            shard = future.result()
            shards[futures[future]].take(shard)
            count(stats, shard)
            report(stage, stats.shards, len(futures))
    except BaseException:
        wait(list(futures))
        raise


def count(stats: StageStats, shard: ShardResult) -> None:
    stats.shards += 1
    stats.cached += shard.cached
    if not shard.cached:
        stats.seconds += shard.seconds
        stats.requests += shard.requests
        stats.tokens += shard.tokens
        stats.spans.append((shard.started_at, shard.started_at + shard.seconds))


def collect(shards: list[Shard], seeds: pa.Table, quarantine: pa.Table) -> dict[str, pa.Table]:
    """The run's tables: each one's final form in every shard, concatenated."""
    names = dict.fromkeys(name for shard in shards for name in shard.tables)
    tables = {name: pa.concat_tables([s.tables[name] for s in shards]).combine_chunks() for name in names}
    return tables | {"seeds": seeds, "quarantine": quarantine}


@task(cache_policy=NO_CACHE, persist_result=False)
def all_pairs(cfg: PipelineConfig, stages: list[Stage], tables: dict[str, pa.Table], run: str, policy: str
              ) -> MinedPairs:
    """Every source's pairs and reject rows as one table each, tagged with the run, its iteration and the
    policy's identity (spec + a hash of its files), so rounds of SPIN/IRPO can be told apart by SQL."""
    parts = [mine_pairs(cfg, tables)] if "candidates" in tables else []
    parts += [MinedPairs(*(tables[name] for name in s.pair_tables)) for s in stages if s.pair_tables]
    tags = {"run_id": run, "iteration": cfg.iteration, "policy_id": policy}
    pairs = pa.concat_tables([PAIRS.empty_table(), *(p.pairs for p in parts)])
    rejects = pa.concat_tables([PAIR_REJECTS.empty_table(), *(p.rejects for p in parts)])
    return MinedPairs(with_values(pairs, tags), with_values(rejects, {"run_id": run}))


def mine_pairs(cfg: PipelineConfig, tables: dict[str, pa.Table]) -> MinedPairs:
    """Self-chat's chosen/rejected pairs from every candidate's reward (and factuality when critiques ran, the
    judge's score when the judge ran)."""
    critiques = tables.get("critiques")
    miner = PairMiner(**settings(PairMiner, cfg.pairs) | ({} if critiques is not None else {"factuality_weight": 0.0}))
    mined = miner(tables["candidates"], tables["rewards"], critiques, judgements=tables.get("judgements"))
    return MinedPairs(with_values(mined.pairs, {"source": "selfchat"}),
                      with_values(mined.rejects, {"source": "selfchat"}))


def with_values(table: pa.Table, values: dict[str, Any]) -> pa.Table:
    """`table` with each named column set to one value in every row."""
    for name, value in values.items():
        column = pa.array([value] * table.num_rows, table.schema.field(name).type)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


class DedupEmbedder:
    """The run's dedup `Embedder`, opened on its first texts (a run without pairs loads none): on the Ray actors
    or in this process (`where`); counts the texts it embedded and their seconds for the run summary."""

    def __init__(self, name: str, where: str, opener: Callable[[], Embedder]):
        self.name, self.where, self.opener, self.embedder = name, where, opener, None
        self.texts, self.seconds = 0, 0.0

    def embed(self, texts: Sequence[str]) -> Any:
        started = time.perf_counter()
        self.embedder = self.embedder or self.opener()
        vectors = self.embedder.embed(texts)
        self.texts, self.seconds = self.texts + len(texts), self.seconds + time.perf_counter() - started
        return vectors

    def summary(self) -> dict:
        return {"on": self.where, "texts": self.texts, "seconds": round(self.seconds, 1)}


def dedup_embedder(cfg: PipelineConfig, models: RunModels, plan: Plan, pairs: int) -> DedupEmbedder:
    """On the Ray actors (on the plan's embedder device there) for a ray run of at least
    `dedup.actor_embed_min_pairs` pairs: a resumed run whose stages were all cached opens its pool on the
    first texts, so it embeds where the first attempt did (a driver's CPU would be hours at that size, and
    its vectors may differ in the last digits). Else in this process: on the plan's device with backend
    engine, on CPU otherwise (a ray plan's devices are the actors', and a Ray driver may have no GPU)."""
    from prefmill.serving.embedder import PoolEmbedder, SentenceTransformerEmbedder

    spec = cfg.models.embedder
    if cfg.backend == "ray" and pairs >= cfg.dedup.actor_embed_min_pairs:
        return DedupEmbedder(spec, "actors", lambda: PoolEmbedder(models.pool(), spec))
    device = (plan.device_of("embedder") if cfg.backend == "engine" else None) or "cpu"
    return DedupEmbedder(spec, "driver", lambda: SentenceTransformerEmbedder(spec, device=device))


@task(cache_policy=NO_CACHE, persist_result=False)
def dedup_pairs(cfg: PipelineConfig, catalog: Catalog, pairs: pa.Table, run: str, embedder: Embedder | None = None
                ) -> DedupResult:
    """Drop pairs that repeat each other or a pair already published in the target dataset, embedding with
    `embedder` (the run's `dedup_embedder`; None: the config's embedder in this process, on CPU)."""
    from prefmill.serving.ann import make_index
    from prefmill.serving.embedder import SentenceTransformerEmbedder

    if not pairs.num_rows:  # nothing to embed: no need to load the embedder
        return DedupResult(pairs, PAIR_EMBEDDINGS.empty_table(), DEDUP_REMOVED.empty_table(), 0)
    name = f"{cfg.dataset}_embeddings"
    known = catalog.exists() and name in {v.dataset for v in catalog.datasets()}
    published = catalog.read(name, with_version=True) if known else None  # any other catalog error surfaces
    embedder = embedder or SentenceTransformerEmbedder(cfg.models.embedder)
    if published is not None and not has_pair_vectors(published):
        published = with_pair_vectors(published, catalog.read(cfg.dataset), embedder)
    return Deduper(**settings(Deduper, cfg.dedup))(pairs, embedder, make_index, published, run_id=run)


def published_tables(cfg: PipelineConfig, stages: list[Stage], tables: dict[str, pa.Table], mined: MinedPairs,
                     deduped: DedupResult) -> dict[str, pa.Table]:
    """What a run publishes: the stage tables (a source's pairs and rejects join the pairs dataset and the
    reject report instead), the pairs, their embeddings and the reject and dedup reports."""
    merged = {name for s in stages for name in (s.pair_tables or ())}
    return {**{k: v for k, v in tables.items() if k not in merged and (k != "quarantine" or v.num_rows)},
            cfg.dataset: deduped.pairs, f"{cfg.dataset}_embeddings": deduped.embeddings,
            "pair_rejects": mined.rejects, "dedup_removed": deduped.removed}


@task(cache_policy=NO_CACHE, persist_result=False)
def publish(cfg: PipelineConfig, catalog: Catalog, result: RunResult) -> dict[str, int]:
    """The run's tables as one snapshot, with its lineage and card; returns each dataset's new version."""
    schemas = {name: SCHEMAS[name] for name in result.tables if name in SCHEMAS}
    schemas |= {cfg.dataset: SCHEMAS["pairs"], f"{cfg.dataset}_embeddings": SCHEMAS["pair_embeddings"]}
    lineage = {"run_id": result.run_id, "config": cfg.model_dump(mode="json"), "config_hash": result.config_hash,
               "models": cfg.models.resolved(), "model_ids": result.model_ids, "iteration": cfg.iteration,
               "placement": result.placement, "card": result.card}
    versions = catalog.publish_many(result.tables, lineage, schemas)
    return {name: v.version for name, v in versions.items()}


def open_pool(cfg: PipelineConfig, plan: Plan | None = None) -> Any:
    """The backend's pool: in-process models (`engine`, `http`) or Ray actors holding them (`ray`), each model
    on the device and with the memory share `plan` gives it."""
    engine = cfg.engine.model_copy(update={"model": cfg.models.assistant})
    config = PoolConfig(**cfg.ray.model_dump(), engine=engine, prefix_batch=cfg.flr.prefix_batch)
    return serving_pool(cfg.backend, config, cfg.url, plan=plan)
