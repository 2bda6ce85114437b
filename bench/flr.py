"""Follow-up likelihood rewards: prefix-shared scoring vs. naive scoring, in one run.

16 conversations × 4 candidates × 20 follow-ups. Naive = one vLLM `prompt_logprobs` request per
(context + reply, follow-up), the production path without sharing; also the same transformers kernels
without cache reuse, for a like-for-like view. Floor = the tokens of one prefix pass per candidate plus
the follow-up tokens, timed at the naive path's measured tokens/s. Last line: one JSON object.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefmill.operators.candidates import CandidateSampler  # noqa: E402
from prefmill.operators.flr import FollowUpReward, load_followups, reply_prefix  # noqa: E402
from prefmill.operators.seeds import load_seeds  # noqa: E402
from prefmill.serving.engine import VLLMEngine  # noqa: E402
from prefmill.serving.prefix_scorer import NaiveScorer, SharedPrefixScorer  # noqa: E402
from prefmill.serving.render import hf_render, hf_tokenize, scoring_prompts  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    engine = VLLMEngine()
    seeds = load_seeds().seeds.to_pylist()[:16]
    rows = [{"context_id": s["seed_id"], "conversation_id": s["seed_id"], "seed_id": s["seed_id"],
             "context": [{"role": "user", "content": s["question"]}]} for s in seeds]
    candidates = CandidateSampler(n=4, max_tokens=128, seed=1)(rows, engine).to_pylist()
    defaults = load_followups()
    followups = tuple([f for f in defaults if f.polarity == "positive"][:10] +
                      [f for f in defaults if f.polarity == "negative"][:10])
    flr = FollowUpReward(followups)

    naive, naive_s = timed(lambda: flr(candidates, NaiveScorer(engine)))
    engine.close()
    shared_scorer = SharedPrefixScorer()
    flr(candidates[:2], shared_scorer)  # warm-up
    shared, shared_s = timed(lambda: flr(candidates, shared_scorer))
    unshared, unshared_s = timed(lambda: flr(candidates, SharedPrefixScorer(share_prefix=False)))

    tok = shared_scorer.tokenizer
    conts = [{"role": "user", "content": f.text} for f in followups]
    prefix_tokens = followup_tokens = naive_tokens = 0
    for cand in candidates:
        prompts = scoring_prompts(hf_render(tok), hf_tokenize(tok), [reply_prefix(cand)] * len(conts), conts)
        prefix_tokens += len(prompts[0].prefix_ids)
        followup_tokens += sum(len(p.continuation_ids) for p in prompts)
        naive_tokens += sum(len(p.token_ids) for p in prompts)
    floor_tokens = prefix_tokens + followup_tokens
    floor_s = floor_tokens / (naive_tokens / naive_s)

    diffs = [abs(a - b) for a, b in zip(shared.column("reward").to_pylist(), naive.column("reward").to_pylist())]
    diffs_same_kernels = [abs(a - b) for a, b in zip(shared.column("reward").to_pylist(),
                                                     unshared.column("reward").to_pylist())]
    print(f"{len(candidates)} candidates x {len(followups)} follow-ups")
    print(f"naive (vLLM prompt_logprobs): {naive_s:.1f}s for {naive_tokens} tokens")
    print(f"naive (transformers, no cache reuse): {unshared_s:.1f}s")
    print(f"prefix-shared: {shared_s:.1f}s; floor ({floor_tokens} tokens at naive tok/s): {floor_s:.1f}s")
    print(json.dumps({
        "candidates": len(candidates), "followups": len(followups),
        "naive_s": round(naive_s, 2), "naive_same_kernels_s": round(unshared_s, 2), "shared_s": round(shared_s, 2),
        "speedup": round(naive_s / shared_s, 2), "speedup_same_kernels": round(unshared_s / shared_s, 2),
        "naive_tokens": naive_tokens, "floor_tokens": floor_tokens, "floor_s": round(floor_s, 2),
        "shared_vs_floor": round(shared_s / floor_s, 2),
        "max_abs_diff": max(diffs), "max_abs_diff_same_kernels": max(diffs_same_kernels),
    }))


if __name__ == "__main__":
    main()
