"""The pipeline as a Prefect flow: seeds → self-chat + candidates → FLR → critiques → pairs → dedup → publish.

Seeds are split into shards; every shard × stage is a Prefect task whose result is persisted under the
config's result storage and keyed by (step fingerprint, content hash of its inputs) instead of Prefect's
default policy (which includes the run id and so never resumes). A re-run after a crash finds the
finished shards in the cache and computes only the rest; if nothing is left to compute, no model loads.
The model work runs where the models are: in process (`engine`, `http`) or on Ray actors (`ray`), see
`serving.hosts`. Publishing is the last step: one atomic snapshot holding every table, skipped when the
run id already published (the run id hashes the config and the seeds, so a re-run is recognised).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed, wait

from flows import steps as S
from operators.candidates import CandidateSampler
from operators.critiques import ClaimCritic
from operators.dedup import Deduper, DedupResult, has_pair_vectors, with_pair_vectors
from operators.flr import DEFAULT_FOLLOWUPS, FollowUpReward, load_followups
from operators.ids import stable_id
from operators.pairs import MinedPairs, PairMiner
from operators.retrieval import DocumentIndex, load_documents
from operators.rollout import Rollout
from operators.seeds import BUILTIN_SEEDS, load_seeds
from operators.selfchat import SelfChat
from schemas.config import PipelineConfig, PoolConfig, validate_pipeline_config
from schemas.tables import DEDUP_REMOVED, PAIR_EMBEDDINGS, SCHEMAS
from serving.hosts import LocalPool, ModelHost, StepRun
from storage.catalog import Catalog


@dataclass(frozen=True)
class ShardResult:
    """One shard × stage: the step's value, a content hash of it (the next stage's cache key), its cost."""

    value: Any
    digest: str
    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0
    started_at: float = 0.0  # epoch seconds when the step began (shards run at once: see `busy_seconds`)

    @classmethod
    def of(cls, value: Any, run: StepRun | None = None) -> ShardResult:
        if run is None:
            return cls(value, content_digest(value))
        return cls(value, content_digest(value), run.seconds, run.requests, run.tokens, run.started_at)


@dataclass
class StageStats:
    shards: int = 0
    cached: int = 0
    seconds: float = 0.0  # the shards' compute seconds, summed (they may overlap: shards run at once)
    requests: int = 0
    tokens: int = 0
    rows: int = 0
    spans: list[tuple[float, float]] = field(default_factory=list, repr=False)

    @property
    def busy(self) -> float:
        """Seconds during which at least one of the stage's shards was computing."""
        return busy_seconds(self.spans)


@dataclass
class RunResult:
    """What a run did, for the CLI summary, the artifacts and the tests."""

    run_id: str
    config_hash: str
    stages: dict[str, StageStats] = field(default_factory=dict)
    tables: dict[str, pa.Table] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    already_published: bool = False
    wall_seconds: float = 0.0
    stage_wall: dict[str, float] = field(default_factory=dict)
    card: str = ""


Reporter = Callable[[str, int, int], None]  # (stage, shards done, shards total)


@dataclass
class Runtime:
    """What one flow run's tasks share: where its models are. The pool opens on the first task that needs
    it (a fully cached re-run loads no model) and closes with the run."""

    cfg: PipelineConfig
    pool: Any = None
    owned: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    def get_pool(self) -> Any:
        with self.lock:
            if self.closed:  # a task still running after its run ended (interrupted) must not open a new pool
                raise RuntimeError("this pipeline run has ended; its models are closed")
            if self.pool is None:
                self.pool = self.owned = open_pool(self.cfg)
            return self.pool

    def close(self) -> None:
        """Shut down the pool this run opened and let go of it: Prefect keeps copies of a task's context
        (with this Runtime) in services that outlive the run, which must not keep the models alive."""
        with self.lock:
            owned, self.pool, self.owned, self.closed = self.owned, None, None, True
        if owned is not None:
            owned.shutdown()


# Context, not process globals: Prefect runs a flow's tasks in threads with a copy of the flow's context, so
# each run's tasks see that run's Runtime, and two runs in one process never share one.
_RUN: ContextVar[Runtime | None] = ContextVar("prefmill_run", default=None)
_LENT: ContextVar[tuple[Any, Reporter | None]] = ContextVar("prefmill_lent", default=(None, None))


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


def shard_key(_context, parameters: dict) -> str:
    """Resume key: the step's configuration and the content of its inputs, never the run id."""
    step, inputs = parameters["step"], parameters["inputs"]
    return f"prefmill-{step.name}-{step.fingerprint()}-{content_digest([i.digest for i in inputs])}"


@task(cache_key_fn=shard_key, persist_result=True, task_run_name="{step.name}-{shard}")
def shard_task(step: S.RolloutStep | S.RewardStep | S.CritiqueStep, shard: int,
               inputs: list[ShardResult]) -> ShardResult:
    """Run one stage on one shard where the models are."""
    runtime = _RUN.get()
    if runtime is None:
        raise RuntimeError("shard_task runs inside a pipeline run (run_pipeline), which provides its models")
    run = runtime.get_pool().run(step, step_rows(step, inputs))
    return ShardResult.of(run.value, run)


def step_rows(step: Any, inputs: list[ShardResult]) -> Any:
    """What a step is sent: seeds for the rollout, candidates for rewards, candidates + rewards + the
    seeds' documents for critiques."""
    if isinstance(step, S.RolloutStep):
        return inputs[0].value.to_pylist()
    rollout = inputs[0].value
    if isinstance(step, S.RewardStep):
        return rollout.candidates.to_pylist()
    seeds, rewards = inputs[1].value, inputs[2].value
    documents = {s["seed_id"]: s["documents"] or [] for s in seeds.to_pylist()}
    return S.CritiqueInput(rollout.candidates.to_pylist(), rewards.to_pylist(), documents)


@contextmanager
def attached(pool: Any = None, reporter: Reporter | None = None) -> Iterator[None]:
    """Lend the flow runs this context starts a pool (tests share one engine) and a progress reporter
    (the CLI's bars); neither can be a flow parameter, which must serialize."""
    token = _LENT.set((pool, reporter))
    try:
        yield
    finally:
        _LENT.reset(token)


@flow(name="prefmill-pipeline", log_prints=True, persist_result=False)
def pipeline(config: dict, run_key: str = "") -> RunResult:
    """Run the whole pipeline for `config` (a `PipelineConfig` as a dict).

    `run_key` tells apart runs with the same config and seeds: a deployment's runs use their scheduled
    time, so every scheduled run is a new run while a retried one resumes; ad hoc runs leave it empty, so
    running the same config again resumes (or finds it published).
    """
    from prefect.runtime import deployment, flow_run

    if not run_key and deployment.id:
        run_key = str(flow_run.scheduled_start_time)
    pool, reporter = lent()
    return run_pipeline(validate_pipeline_config(config), run_key, pool, reporter)


def lent() -> tuple[Any, Reporter | None]:
    """What `attached` lends this context. (A function, not the ContextVar itself, in the flow body: Prefect
    pickles a served flow's function by value, globals included, and a ContextVar does not pickle.)"""
    return _LENT.get()


def run_pipeline(cfg: PipelineConfig, run_key: str = "", pool: Any = None,
                 reporter: Reporter | None = None) -> RunResult:
    """The flow body. `pool` (a `LocalPool` or a `RayEnginePool`) lets tests share an engine; by default
    one is opened for `cfg.backend` on first need and closed at the end."""
    started = time.perf_counter()
    loaded = load_seeds(Path(cfg.seeds.path) if cfg.seeds.path else BUILTIN_SEEDS)
    seeds = run_seeds(cfg, loaded.seeds)
    result = RunResult(run_id(cfg, seeds, run_key), cfg.fingerprint())
    catalog = Catalog(cfg.catalog)
    published = find_published(catalog, result.run_id)
    if published:
        result.versions, result.already_published = published, True
        return result
    with pipeline_pool(cfg, pool):
        shards = run_shards(cfg, seeds, result, reporter or (lambda *_: None))
    tables = collect(shards, seeds, loaded.quarantine)
    mining_started = time.perf_counter()
    mined = mine_pairs(cfg, tables, result.run_id)
    result.stage_wall["pairs"] = time.perf_counter() - mining_started
    publish_run(cfg, catalog, tables, mined, result)
    result.wall_seconds = time.perf_counter() - started
    from flows.report import create_artifacts

    create_artifacts(result)
    return result


def run_seeds(cfg: PipelineConfig, seeds: pa.Table) -> pa.Table:
    """The seeds a run takes from its seed file (`seeds.limit` first ones, else all)."""
    return seeds.slice(0, cfg.seeds.limit) if cfg.seeds.limit else seeds


def run_id(cfg: PipelineConfig, seeds: pa.Table, run_key: str) -> str:
    """The given run id, else a hash of the config, the seeds and the run key: a re-run after a crash
    gets the same id, so its publish is recognised as done."""
    return cfg.run_id or stable_id("run", cfg.fingerprint(), content_digest(seeds), run_key)[4:]


def find_published(catalog: Catalog, run: str) -> dict[str, int]:
    if not catalog.meta_path.exists():
        return {}
    return {name: v.version for name, v in catalog.find_run(run).items()}


def build_steps(cfg: PipelineConfig) -> list[Any]:
    """The shard steps of `cfg`, in pipeline order."""
    models = cfg.models.resolved()
    s, c = cfg.selfchat, cfg.candidates
    rollout = Rollout(SelfChat(max_turns=s.max_turns, token_budget=s.token_budget,
                               max_tokens_per_turn=s.max_tokens_per_turn, simulator_max_tokens=s.simulator_max_tokens,
                               temperature=s.temperature, top_p=s.top_p, seed=s.seed),
                      CandidateSampler(n=c.n, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens,
                                       seed=c.seed), c.contexts)
    flr = FollowUpReward(load_followups(cfg.flr.followups or DEFAULT_FOLLOWUPS), cfg.flr.aggregation,
                         cfg.flr.max_tokens)
    steps: list[Any] = [S.RolloutStep(rollout, models["assistant"], models["simulator"]),
                        S.RewardStep(flr, models["scorer"])]
    k = cfg.critiques
    if k.enabled:
        critic = ClaimCritic(rounds=k.rounds, evidence_k=k.evidence_k, max_tokens=k.max_tokens, seed=k.seed,
                             max_evidence_tokens=k.max_evidence_tokens)
        index = DocumentIndex(load_documents(k.documents)) if k.documents else None
        steps.append(S.CritiqueStep(critic, flr, models["critic"], models["scorer"],
                                    k.top_k if k.select == "top_k" else None, index))
    return steps


def run_shards(cfg: PipelineConfig, seeds: pa.Table, result: RunResult, report: Reporter) -> list[dict]:
    """Submit every shard × stage (a stage's task waits for the shard's earlier stages), wait for all of
    them, and return each shard's results by stage name."""
    steps = build_steps(cfg)
    run_task = shard_task.with_options(result_storage=cfg.results_path())
    parts = [ShardResult.of(seeds.slice(i, cfg.shard_size)) for i in range(0, seeds.num_rows, cfg.shard_size)]
    futures: dict[PrefectFuture, tuple[int, str]] = {}
    shards: list[dict] = [{"seeds": p} for p in parts]
    # Stage by stage: every shard's rollout at once (one request stream on the engine), then the rewards,
    # then the critiques. A stage waits for the whole stage before it, so the scorer never competes with
    # generation for the same cores or GPU, and each engine batch holds all shards' requests.
    rollouts = [run_task.submit(steps[0], i, [part]) for i, part in enumerate(parts)]
    rewards = [run_task.submit(steps[1], i, [rollout], wait_for=rollouts) for i, rollout in enumerate(rollouts)]
    futures |= {f: (i, "rollout") for i, f in enumerate(rollouts)} | {f: (i, "rewards") for i, f in enumerate(rewards)}
    if len(steps) > 2:
        futures |= {run_task.submit(steps[2], i, [rollouts[i], part, rewards[i]], wait_for=rewards): (i, "critiques")
                    for i, part in enumerate(parts)}
    stage_started = time.perf_counter()
    try:
        collect_shards(futures, shards, result, report, len(parts), stage_started)
    except BaseException:
        # a shard failed: let the shards still running finish (and persist) before the pool closes, so no
        # engine is shut down under a running step (its replies would come back aborted)
        wait(list(futures))
        raise
    return shards


def collect_shards(futures: dict[PrefectFuture, tuple[int, str]], shards: list[dict], result: RunResult,
                   report: Reporter, total: int, stage_started: float) -> None:
    """Record each shard × stage result as it finishes; raises the first failure."""
    for future in as_completed(list(futures)):
        i, stage = futures[future]
        stats = result.stages.setdefault(stage, StageStats())
        shard = future.result()
        shards[i][stage] = shard
        stats.shards += 1
        stats.cached += future.state.name == "Cached"
        if future.state.name != "Cached":
            stats.seconds += shard.seconds
            stats.requests += shard.requests
            stats.tokens += shard.tokens
            stats.spans.append((shard.started_at, shard.started_at + shard.seconds))
        result.stage_wall[stage] = time.perf_counter() - stage_started
        report(stage, stats.shards, total)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans: time during which at least one was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def collect(shards: list[dict], seeds: pa.Table, quarantine: pa.Table) -> dict[str, pa.Table]:
    """The run's stage tables, shards concatenated; revised replies join the candidates and their rewards."""
    tables = {"seeds": seeds, "quarantine": quarantine,
              "conversations": _concat([s["rollout"].value.conversations for s in shards]),
              "candidates": _concat([s["rollout"].value.candidates for s in shards]),
              "rewards": _concat([s["rewards"].value for s in shards])}
    if all("critiques" in s for s in shards):
        critiqued = [s["critiques"].value for s in shards]
        tables["critiques"] = _concat([c.critiques for c in critiqued])
        tables["candidates"] = _concat([tables["candidates"], *(c.revised for c in critiqued)])
        tables["rewards"] = _concat([tables["rewards"], *(c.revised_rewards for c in critiqued)])
    return tables


def _concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables(tables).combine_chunks()


@task(cache_policy=NO_CACHE, persist_result=False)
def mine_pairs(cfg: PipelineConfig, tables: dict[str, pa.Table], run: str) -> MinedPairs:
    """Chosen/rejected pairs from every candidate's reward (and factuality when critiques ran)."""
    p = cfg.pairs
    critiques = tables.get("critiques")
    miner = PairMiner(strategy=p.strategy, flr_weight=p.flr_weight,
                      factuality_weight=p.factuality_weight if critiques is not None else 0.0,
                      normalization=p.normalization, min_margin=p.min_margin,
                      max_pairs_per_context=p.max_pairs_per_context, seed=p.seed)
    return miner(tables["candidates"], tables["rewards"], critiques, run_id=run)


@task(cache_policy=NO_CACHE, persist_result=False)
def dedup_pairs(cfg: PipelineConfig, catalog: Catalog, pairs: pa.Table, run: str):
    """Drop pairs that repeat each other or a pair already published in the target dataset."""
    from serving.ann import make_index
    from serving.embedder import SentenceTransformerEmbedder

    if not pairs.num_rows:  # nothing to embed: no need to load the embedder
        return DedupResult(pairs, PAIR_EMBEDDINGS.empty_table(), DEDUP_REMOVED.empty_table(), 0)
    name = f"{cfg.dataset}_embeddings"
    known = catalog.meta_path.exists() and name in {v.dataset for v in catalog.datasets()}
    published = catalog.read(name, with_version=True) if known else None  # any other catalog error surfaces
    embedder = SentenceTransformerEmbedder(cfg.models.embedder)
    if published is not None and not has_pair_vectors(published):
        published = with_pair_vectors(published, catalog.read(cfg.dataset), embedder)
    deduper = Deduper(threshold=cfg.dedup.threshold, neighbors=cfg.dedup.neighbors, on=cfg.dedup.on)
    return deduper(pairs, embedder, make_index, published, run_id=run)


def publish_run(cfg: PipelineConfig, catalog: Catalog, tables: dict[str, pa.Table], mined: MinedPairs,
                result: RunResult) -> None:
    """Dedup, then publish the pairs, their embeddings, the reports and the stage tables as one snapshot."""
    from flows.report import dataset_card

    stage_started = time.perf_counter()
    deduped = dedup_pairs(cfg, catalog, mined.pairs, result.run_id)
    result.stage_wall["dedup"] = time.perf_counter() - stage_started
    out = {**{k: v for k, v in tables.items() if k != "quarantine" or v.num_rows},
           cfg.dataset: deduped.pairs, f"{cfg.dataset}_embeddings": deduped.embeddings,
           "pair_rejects": mined.rejects, "dedup_removed": deduped.removed}
    schemas = {name: SCHEMAS[name] for name in out if name in SCHEMAS}
    schemas |= {cfg.dataset: SCHEMAS["pairs"], f"{cfg.dataset}_embeddings": SCHEMAS["pair_embeddings"]}
    result.tables = out
    result.card = dataset_card(cfg, result)
    lineage = {"run_id": result.run_id, "config": cfg.model_dump(mode="json"), "config_hash": result.config_hash,
               "models": cfg.models.resolved(), "card": result.card}
    started = time.perf_counter()
    versions = catalog.publish_many(out, lineage, schemas)
    result.stage_wall["publish"] = time.perf_counter() - started
    result.versions = {name: v.version for name, v in versions.items()}


@contextmanager
def pipeline_pool(cfg: PipelineConfig, pool: Any = None) -> Iterator[None]:
    """Make the run's pool available to its tasks; open it lazily for `cfg.backend`, close what we opened."""
    runtime = Runtime(cfg, pool)
    token = _RUN.set(runtime)
    try:
        yield
    finally:
        _RUN.reset(token)
        runtime.close()


def open_pool(cfg: PipelineConfig) -> Any:
    """The backend's pool: in-process models (`engine`, `http`) or Ray actors holding them (`ray`)."""
    engine = cfg.engine.model_copy(update={"model": cfg.models.assistant})
    if cfg.backend == "ray":
        from serving.ray_pool import RayEnginePool

        r = cfg.ray
        return RayEnginePool(PoolConfig(engine=engine, num_actors=r.actors, cpus_per_actor=r.cpus_per_actor,
                                        gpus_per_actor=r.gpus_per_actor, steps_per_actor=r.steps_per_actor,
                                        prefix_batch=cfg.flr.prefix_batch, address=r.address),
                             log_to_driver=False)
    return LocalPool(ModelHost(engine, url=cfg.url if cfg.backend == "http" else None,
                               prefix_batch=cfg.flr.prefix_batch))
