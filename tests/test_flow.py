"""The pipeline flow end to end: real vLLM, real Ray, a real (temporary) Prefect API, real DuckLake.

The same test runs on the in-process engine, on Ray actors and on a `prefmill serve` server (backend http);
the resume test fails a run in a later stage and shows the re-run computes only what was not finished
(counted in engine requests).
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pyarrow as pa
import pytest

from prefmill.operators.flr import load_followups
from prefmill.operators.seeds import BUILTIN_SEEDS
from prefmill.schemas.config import PipelineConfig, load_pipeline_config
from prefmill.schemas.tables import PAIRS
from prefmill.serving.hosts import LocalPool, ModelHost
from prefmill.serving.placement import Plan
from prefmill.storage.catalog import Catalog

pytestmark = pytest.mark.slow

TINY = ["seeds.limit=2", "shard_size=1", "selfchat.max_turns=1", "selfchat.max_tokens_per_turn=48",
        "candidates.n=2", "candidates.max_tokens=48"]


def tiny_config(tmp_path, *extra: str) -> PipelineConfig:
    return load_pipeline_config(None, [*TINY, f'catalog="{tmp_path / "catalog"}"',
                                       f'result_storage="{tmp_path / "results"}"', *extra])


def run(cfg: PipelineConfig, pool):
    from prefmill.flows.pipeline import pipeline_flow

    return pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))


@pytest.fixture(scope="module")
def local_pool(engine):
    return LocalPool(ModelHost(preloaded={"smollm2-135m": engine}))


def backend_pool(backend: str, request) -> tuple[object, list[str]]:
    """The pool a backend's run uses and its config overrides: the session's engine, the module's Ray actors,
    or (http) none given, so the run opens its own: a client of the session's `prefmill serve` (its FLR
    scorer runs in the run's process)."""
    if backend == "http":
        return None, [f'url="{request.getfixturevalue("http_server")}/v1"']
    return request.getfixturevalue({"engine": "local_pool", "ray": "ray_pool"}[backend]), []


@pytest.mark.parametrize("backend", ["engine", "ray", "http"])
def test_the_pipeline_publishes_every_table_in_one_snapshot(backend, tmp_path, request):
    pool, extra = backend_pool(backend, request)
    cfg = tiny_config(tmp_path, f"backend={backend}", *extra, "critiques.rounds=0", "critiques.top_k=1",
                      "critiques.max_tokens=96", "dedup.actor_embed_min_pairs=0")
    result = run(cfg, pool)

    assert not result.already_published
    semantic = result.tables["dedup_removed"].column("rule").to_pylist().count("semantic")
    assert result.embedding["on"] == ("actors" if backend == "ray" else "driver")  # ray: at any size here
    assert result.embedding["texts"] == 2 * (result.tables["pairs"].num_rows + semantic)  # prompt and reply
    assert set(result.versions) >= {"seeds", "conversations", "candidates", "rewards", "critiques", "pairs",
                                    "pairs_embeddings", "pair_rejects", "dedup_removed"}
    assert len(set(result.versions.values())) == 1  # one snapshot
    assert {s: (r.shards, r.cached) for s, r in result.stages.items()} == {
        "rollout": (2, 0), "rewards": (2, 0), "critiques": (2, 0)}
    assert result.stages["rollout"].tokens > 0 and result.stages["rewards"].requests > 0
    rollout = result.stages["rollout"]  # the two shards' rollouts ran at once, in one batch of the engine
    assert rollout.busy < 0.85 * rollout.seconds, (rollout.busy, rollout.seconds)
    catalog = Catalog(cfg.catalog)
    tables = {name: catalog.read(name) for name in result.versions}
    assert tables["seeds"].num_rows == tables["conversations"].num_rows == 2
    assert tables["rewards"].num_rows == tables["candidates"].num_rows >= 4
    assert tables["critiques"].num_rows == 2  # top 1 of each of the 2 contexts
    assert set(tables["pairs"].column("run_id").to_pylist()) <= {result.run_id}
    assert tables["pairs"].num_rows == tables["pairs_embeddings"].num_rows
    assert tables["pairs"].num_rows + tables["pair_rejects"].num_rows > 0
    lineage = catalog.versions("pairs")[-1].lineage
    assert lineage["config_hash"] == cfg.fingerprint() and lineage["run_id"] == result.run_id
    assert lineage["card"].startswith("# pairs")
    assert set(catalog.find_run(result.run_id)) == set(result.versions)

    again = run(cfg, pool)  # same config and seeds: the same run, already published
    assert again.already_published and again.versions == result.versions
    assert catalog.versions("pairs")[-1].version == result.versions["pairs"]


def pair_rows() -> pa.Table:
    """Pairs of 12 seed questions and their first document, plus an exact copy of one and a reworded copy of two
    others (one word of question and answer changed, a lower margin: the originals win)."""
    seeds = [json.loads(line) for line in BUILTIN_SEEDS.read_text().splitlines()][:12]
    rows = [(s["question"], s["documents"][0], f"ctx-{k}", 1.0 + k / 100) for k, s in enumerate(seeds)]
    rows.append((seeds[3]["question"], seeds[3]["documents"][0], "copy-3", 0.5))
    rows += [(s["question"].replace("?", " really?"), s["documents"][0].replace(". ", ". Indeed, ", 1), f"edit-{k}",
              0.5) for k, s in ((5, seeds[5]), (8, seeds[8]))]
    return pa.Table.from_pylist([{name: None for name in PAIRS.names} | {
        "pair_id": f"pair-{pid}", "prompt_id": pid, "prompt": [{"role": "user", "content": q}],
        "chosen": [{"role": "assistant", "content": a}], "rejected": [{"role": "assistant", "content": "No idea."}],
        "margin": margin, "strategy": "best_worst"} for q, a, pid, margin in rows], schema=PAIRS)


def test_a_big_ray_run_dedups_on_its_actors_with_the_drivers_removals(tmp_path, ray_pool):
    """From `dedup.actor_embed_min_pairs` pairs up, a ray run embeds for dedup on its actors (a resumed run opens
    its pool for that only when it embeds); below it or on another backend, on the driver; the removals are the
    same."""
    from prefmill.flows.pipeline import RunModels, dedup_embedder, dedup_pairs

    pairs, plan = pair_rows(), Plan((), ())
    cfg = tiny_config(tmp_path, "backend=ray", f"dedup.actor_embed_min_pairs={pairs.num_rows}")
    catalog = Catalog(cfg.catalog)
    with RunModels(cfg, ray_pool) as models:
        on_actors, below = (dedup_embedder(cfg, models, plan, n) for n in (pairs.num_rows, pairs.num_rows - 1))
        from_actors = dedup_pairs.fn(cfg, catalog, pairs, "r1", on_actors)
        assert dedup_embedder(cfg.model_copy(update={"backend": "engine"}), models, plan, 10**6).where == "driver"
    from_driver = dedup_pairs.fn(cfg, catalog, pairs, "r1", below)
    resumed = RunModels(cfg)  # every stage cached: no pool yet; it opens on the first texts, not before
    assert dedup_embedder(cfg, resumed, plan, 10**6).where == "actors" and resumed.owned is None

    assert (on_actors.summary()["on"], below.summary()["on"]) == ("actors", "driver")
    assert on_actors.texts == below.texts == 2 * (pairs.num_rows - 1)  # the exact copy is never embedded
    removals = [{r["removed_pair_id"]: (r["duplicate_of"], r["rule"]) for r in d.removed.to_pylist()}
                for d in (from_actors, from_driver)]
    assert removals[0] == removals[1] and sorted(removals[0]) == ["pair-copy-3", "pair-edit-5", "pair-edit-8"]
    similarities = [d.removed.column("similarity").to_pylist() for d in (from_actors, from_driver)]
    assert similarities[0] == pytest.approx(similarities[1], abs=1e-5)
    vectors = [np.array(d.embeddings.column("prompt_vector").to_pylist()) for d in (from_actors, from_driver)]
    assert np.allclose(*vectors, atol=1e-5)


class FailingPool:
    """Fails the rewards step of the second shard it sees, like a crash in the middle of a run."""

    def __init__(self, pool):
        self.pool, self.rewards_seen = pool, 0

    def run(self, step, rows):
        if step.name == "rewards":
            self.rewards_seen += 1
            if self.rewards_seen == 2:
                raise RuntimeError("injected crash")
        return self.pool.run(step, rows)


def test_a_rerun_after_a_crash_computes_only_the_unfinished_shards(tmp_path, local_pool):
    cfg = tiny_config(tmp_path, "critiques.enabled=false")
    with pytest.raises(RuntimeError, match="injected crash"):
        run(cfg, FailingPool(local_pool))
    assert not Catalog(cfg.catalog).exists() or not Catalog(cfg.catalog).datasets()

    resumed = run(cfg, local_pool)
    stages = resumed.stages
    assert (stages["rollout"].shards, stages["rollout"].cached) == (2, 2)
    assert stages["rollout"].requests == 0
    assert (stages["rewards"].shards, stages["rewards"].cached) == (2, 1)
    # only the unfinished shard was scored again: its 2 candidates (1 context × n=2), every follow-up
    assert stages["rewards"].requests == 2 * len(load_followups())
    assert resumed.versions["pairs"] >= 1


class SlowSiblingPool:
    """The first shard's rollout fails at once; the other shard's is still running for a while."""

    def __init__(self):
        self.running = 0
        self.lock = threading.Lock()

    def run(self, step, rows):
        if rows["seeds"]["seed_id"][0].as_py() == self.first:
            raise RuntimeError("injected crash")
        with self.lock:
            self.running += 1
        time.sleep(3)
        with self.lock:
            self.running -= 1
        raise RuntimeError("sibling done")

    def shutdown(self):
        self.running_at_shutdown = self.running


def test_a_failed_shard_waits_for_its_running_siblings_before_the_pool_closes(tmp_path, monkeypatch):
    """Otherwise the run's pool (and its engine) would be shut down under a step still generating."""
    import prefmill.flows.pipeline as pipeline_module
    from prefmill.operators.seeds import load_seeds

    cfg = tiny_config(tmp_path)
    pool = SlowSiblingPool()
    pool.first = load_seeds().seeds.column("seed_id")[0].as_py()
    monkeypatch.setattr(pipeline_module, "open_pool", lambda _cfg, _plan: pool)  # the run opens (and closes) it
    with pytest.raises(RuntimeError, match="injected crash"):
        run(cfg, None)
    assert pool.running_at_shutdown == 0
