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
Results go to a fresh catalog and result storage, so nothing is served from an earlier run's cache.

    .venv/bin/python bench/pipeline.py [--set key=value ...]
"""

from __future__ import annotations

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

from bench.selfchat import CountingLM, raw_generate  # noqa: E402
from prefmill.flows.pipeline import pipeline_flow  # noqa: E402
from prefmill.flows.report import stage_rows  # noqa: E402
from prefmill.flows.results import busy_seconds  # noqa: E402
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


def main() -> None:
    overrides = [value for flag, value in zip(sys.argv[1:], sys.argv[2:]) if flag == "--set"]
    work = Path(tempfile.mkdtemp(prefix="pm-bench-"))
    cfg = load_pipeline_config(DEMO, [f'catalog="{work / "catalog"}"', f'result_storage="{work / "results"}"',
                                      *overrides])
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
    # shards run at once: stage compute is the time at least one shard step was running, not their sum
    compute = busy_seconds([span for s in result.stages.values() for span in s.spans]) + sum(
        result.stage_wall.get(k, 0.0) for k in ("pairs", "dedup", "publish"))
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
    print(json.dumps({"seeds": result.tables["seeds"].num_rows, "pairs": result.tables[cfg.dataset].num_rows,
                      "engine_start_s": round(engine.start_seconds, 1), "flow_call_s": round(flow_call_s, 1),
                      "flow_wall_s": round(result.wall_seconds, 1), "stage_compute_s": round(compute, 1),
                      "rollout_tok_s": round(ours, 1), "raw_tok_s": round(raw, 1),
                      "demo_wall_s": round(demo_wall, 1), "ratio_vs_raw": round(ours / raw, 3),
                      "overhead_ratio": round(result.wall_seconds / compute, 3), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
