"""Self-chat + candidate sampling on the built-in seeds vs. raw vLLM `generate` on the same number of
prompts and output tokens, in one run on one engine. Last line: one JSON object of the figures."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from operators.candidates import CandidateSampler, contexts  # noqa: E402
from operators.seeds import load_seeds  # noqa: E402
from operators.selfchat import SelfChat  # noqa: E402
from serving.engine import VLLMEngine  # noqa: E402


class CountingLM:
    """Wraps the engine to count requests and output tokens of the pipeline."""

    def __init__(self, lm):
        self.lm, self.name, self.requests, self.tokens = lm, lm.name, [], 0

    def chat(self, conversations, sampling):
        out = self.lm.chat(conversations, sampling)
        for conv, completions in zip(conversations, out):
            for c in completions:
                self.requests.append((conv, c.num_tokens))
                self.tokens += c.num_tokens
        return out


def raw_generate(engine: VLLMEngine, requests: list) -> float:
    """The same prompts with the same output lengths, straight into `LLM.generate`, all at once."""
    from vllm import SamplingParams

    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) for conv, _ in requests]
    params = [SamplingParams(max_tokens=max(n, 1), min_tokens=max(n, 1), ignore_eos=True, temperature=0.7, seed=k)
              for k, (_, n) in enumerate(requests)]
    start = time.perf_counter()
    engine.llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    engine = VLLMEngine()
    seeds = load_seeds().seeds.to_pylist()
    lm = CountingLM(engine)
    start = time.perf_counter()
    conversations = SelfChat(max_turns=2, max_tokens_per_turn=96, simulator_max_tokens=48)(seeds, lm)
    selfchat_s = time.perf_counter() - start
    cand_start = time.perf_counter()
    candidates = CandidateSampler(n=4, max_tokens=96)(contexts(conversations, "last"), lm)
    pipeline_s = time.perf_counter() - start
    candidates_s = time.perf_counter() - cand_start
    raw_s = raw_generate(engine, lm.requests)
    ours, raw = lm.tokens / pipeline_s, lm.tokens / raw_s
    print(f"pipeline: {lm.tokens} tokens in {pipeline_s:.1f}s = {ours:.1f} tok/s "
          f"(self-chat {selfchat_s:.1f}s, candidates {candidates_s:.1f}s, {candidates.num_rows} candidates)")
    print(f"raw vLLM generate, same {len(lm.requests)} requests and tokens: {raw_s:.1f}s = {raw:.1f} tok/s")
    print(json.dumps({"seeds": len(seeds), "conversations": conversations.num_rows, "candidates": candidates.num_rows,
                      "requests": len(lm.requests), "output_tokens": lm.tokens,
                      "pipeline_s": round(pipeline_s, 2), "raw_s": round(raw_s, 2),
                      "pipeline_tok_s": round(ours, 1), "raw_tok_s": round(raw, 1),
                      "ratio_vs_raw": round(ours / raw, 3), "engine_start_s": round(engine.start_seconds, 1)}))
    engine.close()


if __name__ == "__main__":
    main()
