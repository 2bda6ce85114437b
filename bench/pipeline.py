"""The demo pipeline as a Prefect flow: wall time per stage, generation speed against raw vLLM, and the
orchestration overhead. Last line: one JSON object of the figures.

- demo_wall_s: engine start + the flow call (Prefect API start, every stage, publish), demo config.
- ratio_vs_raw: the rollout stage's generated tokens / the seconds during which at least one rollout shard
  was running (shards run at once, in one batch of the engine, beside the other stages' steps), against
  raw `LLM.generate` given the same requests (prompts, temperature, top-p, seeds) and output lengths
  (`ignore_eos`) all at once. Raw gets every request of the run in one batch, which a self-chat cannot:
  turn 2 waits for turn 1. With few seeds that dependency chain, not the flow, bounds the ratio; run
  with `--set seeds.limit=48` to see the flow on a batch that fills the engine.
- overhead_ratio: flow wall (inside the flow) ÷ the stages' own compute (the time at least one shard step
  was running next to the models, plus pair mining, dedup, publish): what Prefect tasks, result
  persistence and scheduling add.
- `--seeds N --fake-model`: N distinct seeds on models that answer at once (bench/instant_model.py); the flow's
  wall (without pairs, dedup, publish) minus the same steps called directly is orchestration: seconds per 1k
  seeds and ms per stage task.
- `--embed-texts N`: dedup's embedding of N texts in this process against on the `ray.actors` Ray actors of a
  big ray run (`PoolEmbedder`, `dedup.actor_embed_min_pairs`): texts/s, first call (embedder load) and warm.
Results go to a fresh catalog and result storage, so nothing is served from an earlier run's cache.

    .venv/bin/python bench/pipeline.py [--set key=value ...]
    .venv/bin/python bench/pipeline.py --seeds 10000 --fake-model [--set shard_size=64]
    OMP_NUM_THREADS=1 .venv/bin/python bench/pipeline.py --embed-texts 4000 --set ray.actors=2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefmill.flows.runner import configure_environment  # noqa: E402

configure_environment(verbose=False)

from bench.instant_model import InstantHost  # noqa: E402
from bench.selfchat import CountingLM, raw_generate  # noqa: E402
from prefmill.flows.pipeline import pipeline_flow, run_seeds, shard_seeds, shard_size  # noqa: E402
from prefmill.flows.report import stage_rows  # noqa: E402
from prefmill.flows.results import busy_seconds  # noqa: E402
from prefmill.flows.stages import build_stages  # noqa: E402
from prefmill.operators.seeds import BUILTIN_SEEDS, load_seeds  # noqa: E402
from prefmill.schemas.config import load_pipeline_config  # noqa: E402
from prefmill.serving.engine import VLLMEngine  # noqa: E402
from prefmill.serving.hosts import HostSession, LocalPool, Meter, ModelHost, run_step  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "flows" / "configs" / "demo.toml"


@dataclass
class RecordingSession(HostSession):
    """A step's view of the host that records its chat requests (prompt, sampling, sample, tokens) for the
    raw replay; steps run at once, so each records on its own session."""

    records: list = field(default_factory=list)

    def chat_model(self, spec: str):
        if spec not in self._chat:  # one wrapper per spec (see HostSession): the rollout must stream
            lm = CountingLM(self.host.chat_model(spec, self.meter), streaming=True)
            lm.requests = self.records
            self._chat[spec] = lm
        return self._chat[spec]


class StagePool(LocalPool):
    """The in-process pool (steps run at once, as in a real run), keeping each stage's requests."""

    def __init__(self, host: ModelHost):
        super().__init__(host)
        self.requests: dict[str, list] = {}
        self._lock = threading.Lock()

    def run(self, step, rows):
        session = RecordingSession(self.host, Meter())
        done = run_step(step, rows, self.host, session)
        with self._lock:
            self.requests.setdefault(step.name, []).extend(session.records)
        return done


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--seeds", type=int, default=0, metavar="N", help="N distinct seeds (built-in ones, numbered)")
    parser.add_argument("--fake-model", action="store_true", help="models that answer at once: orchestration only")
    parser.add_argument("--embed-texts", type=int, default=0, metavar="N",
                        help="dedup's embedding of N texts: this process vs the Ray actors")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    work = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    seeds = [f'seeds.path="{seed_file(args.seeds, work)}"', f"seeds.limit={args.seeds}"] if args.seeds else []
    cfg = load_pipeline_config(DEMO, [f'catalog="{work / "catalog"}"', f'result_storage="{work / "results"}"',
                                      *seeds, *args.set])
    if args.embed_texts:
        print(json.dumps(embedding(cfg, args.embed_texts)))
        return
    print(json.dumps(orchestration(cfg) if args.fake_model else demo(cfg)))


def seed_file(n: int, folder: Path) -> Path:
    """`n` distinct seeds: the built-in ones over and over, each question numbered."""
    builtin = [json.loads(line) for line in BUILTIN_SEEDS.read_text().splitlines()]
    numbered = (s | {"question": f"{s['question']} (#{k})"} for k, s in enumerate(builtin[k % len(builtin)]
                                                                                 for k in range(n)))
    path = folder / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in numbered))
    return path


def embedding(cfg, n: int) -> dict:
    """Texts/s of dedup's embedder on `n` numbered seed texts: in this process, then on the config's Ray actors
    (their engines started first, not timed); each side's first call loads its embedder, the second is warm."""
    from prefmill.flows.pipeline import open_pool
    from prefmill.serving.embedder import PoolEmbedder, SentenceTransformerEmbedder

    builtin = [json.loads(line) for line in BUILTIN_SEEDS.read_text().splitlines()]
    texts = [f"{builtin[k % len(builtin)]['documents'][0]} (#{k})" for k in range(n)]
    driver = timed_embeds(lambda: SentenceTransformerEmbedder(cfg.models.embedder), texts)
    pool = open_pool(cfg.model_copy(update={"backend": "ray"}))
    try:
        actors = timed_embeds(lambda: PoolEmbedder(pool, cfg.models.embedder), texts)
    finally:
        pool.shutdown()
    out = {"texts": n, "actors": pool.config.actors, "driver": driver, "on_actors": actors,
           "cpus": os.cpu_count(), "omp_threads": os.environ.get("OMP_NUM_THREADS"), "load_1min": os.getloadavg()[0]}
    print(f"{n} texts: driver {driver['warm_texts_per_s']} texts/s warm, {pool.config.actors} actors "
          f"{actors['warm_texts_per_s']} texts/s warm")
    return out


def timed_embeds(opener, texts: list[str]) -> dict:
    """An embedder's first call (opening it included) and a second, warm one, over `texts`."""
    started = time.perf_counter()
    embedder = opener()
    embedder.embed(texts)
    first = time.perf_counter() - started
    started = time.perf_counter()
    embedder.embed(texts)
    warm = time.perf_counter() - started
    return {"first_s": round(first, 2), "warm_s": round(warm, 2), "warm_texts_per_s": round(len(texts) / warm, 1)}


def stage_compute(result) -> float:
    """Seconds of the stages' own work: the time at least one shard step was running (shards run at once, so
    not their sum), plus pair mining, dedup and publish."""
    return busy_seconds([span for s in result.stages.values() for span in s.spans]) + sum(
        result.stage_wall.get(k, 0.0) for k in ("pairs", "dedup", "publish"))


def orchestration(cfg) -> dict:
    """The flow on instant models against the same steps called directly, shard after shard (no Prefect, no
    shard store): the difference is orchestration. Inside the flow, and all in (the temporary Prefect API's
    start and its event backlog). Pair mining, dedup and publish are left out of both."""
    pool = LocalPool(InstantHost(prefix_batch=cfg.flr.prefix_batch))
    flow_started = time.perf_counter()
    result = pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))
    flow_call = time.perf_counter() - flow_started
    tail = sum(result.stage_wall.get(k, 0.0) for k in ("pairs", "dedup", "publish"))
    direct, seeds = direct_seconds(cfg, pool), result.tables["seeds"].num_rows
    tasks = sum(s.shards for s in result.stages.values())
    inside = result.wall_seconds - tail - direct
    size = shard_size(cfg, seeds)
    print(f"{seeds} seeds, shard_size {size}: {tasks} stage tasks; flow call {flow_call:.1f} s, inside "
          f"the flow {result.wall_seconds:.1f} s (pairs, dedup, publish {tail:.1f} s), steps called directly "
          f"{direct:.1f} s")
    return {"seeds": seeds, "shard_size": size, "stage_tasks": tasks, "flow_call_s": round(flow_call, 2),
            "flow_wall_s": round(result.wall_seconds, 2), "pairs_dedup_publish_s": round(tail, 2),
            "direct_steps_s": round(direct, 2), "orchestration_s": round(inside, 2),
            "orchestration_s_per_1k_seeds": round(inside / seeds * 1000, 2),
            "orchestration_ms_per_task": round(inside / max(1, tasks) * 1000, 2),
            "all_in_s_per_1k_seeds": round((flow_call - tail - direct) / seeds * 1000, 2),
            "cpus": os.cpu_count(), "load_1min": os.getloadavg()[0]}


def direct_seconds(cfg, pool: LocalPool) -> float:
    """The config's stages' steps called one after another on every shard, without the flow: the work itself."""
    shards = shard_seeds(cfg, run_seeds(cfg, load_seeds(cfg.seeds.path or BUILTIN_SEEDS).seeds))
    started = time.perf_counter()
    for stage in build_stages(cfg):
        for shard in shards:
            shard.tables |= pool.run(stage, shard.inputs(stage)).value
    return time.perf_counter() - started


def demo(cfg) -> dict:
    """The config on the embedded model: stage times, rollout speed against raw vLLM, the overhead ratio."""
    started = time.perf_counter()
    engine = VLLMEngine(cfg.engine.model_copy(update={"model": cfg.models.assistant}))
    pool = StagePool(ModelHost(preloaded={cfg.models.assistant: engine}, prefix_batch=cfg.flr.prefix_batch))
    flow_started = time.perf_counter()
    result = pipeline_flow(pool=pool)(cfg.model_dump(mode="json"))
    flow_call_s = time.perf_counter() - flow_started
    demo_wall = time.perf_counter() - started
    rollout = result.stages["rollout"]
    raw_s = raw_generate(engine, pool.requests["rollout"])
    raw_tokens = sum(n for *_, n in pool.requests["rollout"])
    ours, raw = rollout.tokens / rollout.busy, raw_tokens / raw_s
    compute = stage_compute(result)
    for row in stage_rows(result):
        print(f"{row['stage']:<10} {row['compute_s']:>7.1f} s compute  {row['wall_s']:>7.1f} s wall  "
              f"{row['requests']:>6} requests  {row['tokens']:>7} tokens  {row['tokens_per_s'] or '–'} tok/s")
    for stage in ("pairs", "dedup", "publish"):
        print(f"{stage:<10} {result.stage_wall.get(stage, 0.0):>7.1f} s")
    print(f"engine start {engine.start_seconds:.1f} s; flow call {flow_call_s:.1f} s (inside the flow "
          f"{result.wall_seconds:.1f} s); stage compute {compute:.1f} s")
    print(f"rollout {rollout.tokens} tokens: flow {ours:.1f} tok/s vs raw vLLM {raw:.1f} tok/s "
          f"({len(pool.requests['rollout'])} requests, {raw_s:.1f} s)")
    engine.close()
    return ({"seeds": result.tables["seeds"].num_rows, "pairs": result.tables[cfg.dataset].num_rows,
                      "engine_start_s": round(engine.start_seconds, 1), "flow_call_s": round(flow_call_s, 1),
                      "flow_wall_s": round(result.wall_seconds, 1), "stage_compute_s": round(compute, 1),
                      "rollout_tok_s": round(ours, 1), "raw_tok_s": round(raw, 1),
                      "demo_wall_s": round(demo_wall, 1), "ratio_vs_raw": round(ours / raw, 3),
                      "overhead_ratio": round(result.wall_seconds / compute, 3), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
