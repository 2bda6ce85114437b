"""Branched rollouts (REFUEL) through `Rollout` (self-chat, candidates and branches as one request stream on
`VLLMEngine.stream`) vs raw vLLM `generate` on the same token workload: the same prompts, sampling and output
lengths, all submitted at once. Last line: one JSON object of the figures.

The branches depend on their prefix: a branch at turn h starts once the conversation's user turn h exists
(beside the conversation's own future), so its requests form a chain after the prefix's and the stream's
last requests run in a thinning batch. What that dependency chain costs is read as the share of the run's
wall time after the last conversation's last request, when only branches run (`tail_share`), and (without
--quick) as the same rollout without branching against its own raw twin. A and B alternate over
the repeats; the figures are medians with their spread (min..max). Then the rubric judge's calls/s on the
rollout's candidates (`judge_calls_s`, and the share of its grades that parsed).

    OMP_NUM_THREADS=1 .venv/bin/python bench/branching.py --quick   # 8 seeds, short turns, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.selfchat import CountingLM, raw_generate  # noqa: E402
from prefmill.operators.branching import Branching  # noqa: E402
from prefmill.operators.candidates import CandidateSampler  # noqa: E402
from prefmill.operators.judge import RubricJudge, load_rubrics  # noqa: E402
from prefmill.operators.rollout import Rollout  # noqa: E402
from prefmill.operators.seeds import load_seeds  # noqa: E402
from prefmill.operators.selfchat import SelfChat  # noqa: E402
from prefmill.schemas.config import JudgeSection  # noqa: E402
from prefmill.serving.engine import VLLMEngine  # noqa: E402


def rollout(branching: Branching | None, quick: bool) -> Rollout:
    tokens = 32 if quick else 96
    selfchat = SelfChat(max_turns=2, max_tokens_per_turn=tokens, simulator_max_tokens=tokens // 2)
    return Rollout(selfchat, CandidateSampler(n=2, max_tokens=tokens), "last", branching)


class TimedLM(CountingLM):
    """Counts like `CountingLM` and notes when each request finished and whether a branch made it."""

    def __init__(self, lm, offset: int):
        super().__init__(lm, streaming=True)
        self.offset, self.finished = offset, []

    def _count(self, conversation, sampling, completions):
        super()._count(conversation, sampling, completions)
        self.finished.append((time.perf_counter(), sampling.seed is not None and sampling.seed >= self.offset))


def timed_rollout(engine: VLLMEngine, run: Rollout, seeds: list[dict]) -> tuple[TimedLM, float, float, object]:
    """The rollout on the engine's request stream: the counted requests, its seconds, the seconds after the
    last request that was not a branch's, and its tables."""
    lm = TimedLM(engine, run_offset(run))
    start = time.perf_counter()
    out = run(seeds, lm)
    end = time.perf_counter()
    last_original = max(t for t, branch in lm.finished if not branch)
    return lm, end - start, end - last_original, out


def measure(engine: VLLMEngine, run: Rollout, seeds: list[dict]) -> dict:
    """One alternation: the rollout (A), then raw vLLM on its requests (B)."""
    lm, seconds, tail, out = timed_rollout(engine, run, seeds)
    raw_seconds = raw_generate(engine, lm.requests)
    return {"tokens": lm.tokens, "requests": len(lm.requests), "seconds": seconds, "raw_seconds": raw_seconds,
            "ratio": raw_seconds / seconds, "branches": out.branches.num_rows if out.branches is not None else 0,
            "branch_requests": sum(branch for _, branch in lm.finished), "tail_share": tail / seconds}


def judge_rate(engine: VLLMEngine, seeds: list[dict], quick: bool) -> dict:
    """Rubric-judge calls per second on the engine: the rollout's candidates, each graded on the default
    aspects (helpfulness alone with --quick) in one batched call, and the share whose grade parsed."""
    candidates = rollout(None, quick)(seeds, engine).candidates.to_pylist()
    judge = RubricJudge(load_rubrics(None), aspects=("helpfulness",) if quick else tuple(JudgeSection().aspects))
    start = time.perf_counter()
    grades = judge(candidates, engine).column("score").to_pylist()
    seconds = time.perf_counter() - start
    return {"judge_calls": len(grades), "judge_calls_s": round(len(grades) / seconds, 2),
            "judge_parsed_share": round(sum(g is not None for g in grades) / len(grades), 3)}


def run_offset(run: Rollout) -> int:
    return run.branching.seed_offset if run.branching else 1 << 62


def summary(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 seeds, short turns, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="the first N built-in seeds (default: 8 quick, all)")
    parser.add_argument("--plain", action="store_true", help="with --quick, also the rollout without branching")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    seeds = load_seeds().seeds.to_pylist()[: args.seeds or (8 if args.quick else None)]
    engine = VLLMEngine()
    branched, plain = rollout(Branching(turns="uniform"), args.quick), rollout(None, args.quick)
    a, b = [], []
    for _ in range(repeats):
        a.append(measure(engine, branched, seeds))
        if args.plain or not args.quick:
            b.append(measure(engine, plain, seeds))
    tok_s = [r["tokens"] / r["seconds"] for r in a]
    raw_tok_s = [r["tokens"] / r["raw_seconds"] for r in a]
    ratio, tail = summary(a, "ratio"), summary(a, "tail_share")
    plain_ratio = summary(b, "ratio")["median"] if b else None
    judged = judge_rate(engine, seeds, args.quick)
    print(f"branched rollout: {a[0]['tokens']} tokens, {a[0]['requests']} requests ({a[0]['branch_requests']} of "
          f"branches, {a[0]['branches']} branches); {statistics.median(tok_s):.1f} tok/s vs raw "
          f"{statistics.median(raw_tok_s):.1f} tok/s: ratio {ratio['median']} ({ratio['min']}..{ratio['max']})")
    print(f"branch-only tail: {tail['median']:.1%} of the wall ({tail['min']:.1%}..{tail['max']:.1%}); same rollout "
          f"without branching: ratio {plain_ratio}")
    print(f"rubric judge: {judged['judge_calls']} calls, {judged['judge_calls_s']} calls/s, "
          f"{judged['judge_parsed_share']:.0%} parsed")
    print(json.dumps({"seeds": len(seeds), "repeats": repeats, "quick": args.quick, "branches": a[0]["branches"],
                      "requests": a[0]["requests"], "branch_requests": a[0]["branch_requests"],
                      "output_tokens": a[0]["tokens"], "pipeline_tok_s": round(statistics.median(tok_s), 1),
                      "raw_tok_s": round(statistics.median(raw_tok_s), 1), "ratio_vs_raw": ratio["median"],
                      "ratio_min": ratio["min"], "ratio_max": ratio["max"],
                      "tail_share": tail["median"], "ratio_without_branching": plain_ratio,
                      **judged, "engine_start_s": round(engine.start_seconds, 1)}))
    engine.close()


if __name__ == "__main__":
    main()
