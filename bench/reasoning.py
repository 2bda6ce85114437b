"""The gold-anchored sources on generated arithmetic, side by side with raw vLLM in one run on one engine.
Last line: one JSON object of the figures.

- ratio_vs_raw: IRPO's sampling through `SolutionSampler` (requests, then every answer verified) in output
  tokens/s, against raw `LLM.generate` given the same prompts, sampling and output lengths (`ignore_eos`),
  alternated `--repeats` times (median and spread): goal ≥ 0.9.
- verifier: answers checked per second, and the verifier's share of the stage's wall: goal < 5%.
- pairs per question and the share of questions with a pair (IRPO), with the model's pass rate.
- Step-DPO: rollout and rectification requests, tokens and seconds per located step.

    .venv/bin/python bench/reasoning.py [--questions 16] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.selfchat import CountingLM  # noqa: E402
from prefmill.operators.reasoning import IRPOPairs, SolutionSampler  # noqa: E402
from prefmill.operators.steps import StepDPO  # noqa: E402
from prefmill.operators.verify import verify  # noqa: E402
from prefmill.serving.engine import VLLMEngine, chat_prompt  # noqa: E402

INSTRUCTION = 'Solve it step by step, one step per line, and end with a line "Final answer: <number>".'


def problems(n: int, seed: int = 0) -> list[dict]:
    """`n` one-digit sums and products (what the embedded 135M model sometimes gets right), their gold answers
    computed here, checked as `math` (math-verify: the costliest verifier)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        op, value = ("+", a + b) if i % 2 == 0 else ("*", a * b)
        rows.append({"seed_id": f"q{i}", "question": f"What is {a} {op} {b}?", "final_answer": str(value),
                     "answer_type": "math"})
    return rows


def raw_seconds(engine: VLLMEngine, requests: list) -> float:
    """The counted requests straight into `LLM.generate`, all at once, with their output lengths forced."""
    from vllm import SamplingParams

    prompts = [chat_prompt(engine.tokenizer, conv) for conv, *_ in requests]
    params = [SamplingParams(max_tokens=max(n, 1), min_tokens=max(n, 1), ignore_eos=True, temperature=s.temperature,
                             top_p=s.top_p, seed=None if s.seed is None else s.seed + k) for _, s, k, n in requests]
    start = time.perf_counter()
    engine.llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def stage_once(engine: VLLMEngine, sampler: SolutionSampler, questions: list[dict]):
    lm = CountingLM(engine, streaming=False)
    start = time.perf_counter()
    solutions = sampler(questions, lm)
    return solutions, lm, time.perf_counter() - start


def verifier_seconds(solutions) -> float:
    start = time.perf_counter()
    for row in solutions.to_pylist():
        verify(row["solution"], row["final_answer"], row["answer_type"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 questions, 4 samples, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.samples, args.repeats = 8, 4, 2
    engine = VLLMEngine()
    questions = problems(args.questions)
    sampler = SolutionSampler(samples=args.samples, max_tokens=64, instruction=INSTRUCTION)
    ratios, stage_walls = [], []
    for _ in range(args.repeats):  # A then B, alternated
        solutions, lm, stage_s = stage_once(engine, sampler, questions)
        raw_s = raw_seconds(engine, lm.requests)
        ratios.append((lm.tokens / stage_s) / (lm.tokens / raw_s))
        stage_walls.append(stage_s)
    verify_s = verifier_seconds(solutions)
    pairs = IRPOPairs()(solutions)
    paired = len(set(pairs.pairs.column("seed_id").to_pylist()))
    step_lm = CountingLM(engine, streaming=False)
    start = time.perf_counter()
    steps = StepDPO(rollouts=4, max_rollouts=16, rectify_samples=4, max_tokens=48)(questions, solutions, step_lm)
    step_s = time.perf_counter() - start
    reasons = steps.rejects.column("reason").to_pylist()
    located = steps.pairs.num_rows + reasons.count("rectify_failed")
    correct = sum(r["is_correct"] is True for r in solutions.to_pylist())
    print(f"IRPO sampling: {lm.tokens} tokens, stage {statistics.median(stage_walls):.1f}s; ratio vs raw "
          f"{statistics.median(ratios):.3f} (runs {[round(r, 3) for r in ratios]})")
    print(f"verifier: {solutions.num_rows} answers in {verify_s:.3f}s; pairs {pairs.pairs.num_rows} for "
          f"{paired}/{len(questions)} questions; Step-DPO {steps.pairs.num_rows} pairs, {located} steps located "
          f"with {len(step_lm.requests)} sampled continuations in {step_s:.1f}s")
    print(json.dumps({
        "questions": len(questions), "samples": args.samples, "solutions": solutions.num_rows,
        "pass_rate": round(correct / solutions.num_rows, 3), "output_tokens": lm.tokens,
        "ratio_vs_raw": round(statistics.median(ratios), 3), "ratio_runs": [round(r, 3) for r in ratios],
        "ratio_spread": round(max(ratios) - min(ratios), 3), "stage_s": round(statistics.median(stage_walls), 2),
        "verifier_answers_per_s": round(solutions.num_rows / verify_s, 1),
        "verifier_share_of_stage": round(verify_s / statistics.median(stage_walls), 4),
        "irpo_pairs": pairs.pairs.num_rows, "pairs_per_question": round(pairs.pairs.num_rows / len(questions), 3),
        "share_of_questions_with_pair": round(paired / len(questions), 3),
        "step_dpo_pairs": steps.pairs.num_rows, "steps_located": located,
        "step_continuations": len(step_lm.requests), "step_tokens": step_lm.tokens,
        "step_seconds_per_located": round(step_s / located, 2) if located else None,
        "step_tokens_per_located": round(step_lm.tokens / located, 1) if located else None,
        "engine_start_s": round(engine.start_seconds, 1)}))
    engine.close()


if __name__ == "__main__":
    main()
