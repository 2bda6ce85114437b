"""Claim critiques on the built-in seeds: claims judged per minute and the share of structured-output
calls whose output did not parse. Responses are the engine's own answers to the seed questions; evidence
is each seed's source passage plus BM25 retrieval over all passages. Last line: one JSON object."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefmill.operators.candidates import CandidateSampler  # noqa: E402
from prefmill.operators.critiques import ClaimCritic  # noqa: E402
from prefmill.operators.retrieval import DocumentIndex  # noqa: E402
from prefmill.operators.seeds import load_seeds  # noqa: E402
from prefmill.serving.engine import VLLMEngine  # noqa: E402

NUM_SEEDS = 16


def main() -> None:
    engine = VLLMEngine()
    seeds = load_seeds().seeds.to_pylist()
    rows = [{"context_id": s["seed_id"], "conversation_id": s["seed_id"], "seed_id": s["seed_id"],
             "context": [{"role": "user", "content": s["question"]}]} for s in seeds[:NUM_SEEDS]]
    candidates = CandidateSampler(n=1, max_tokens=96, seed=2)(rows, engine).to_pylist()
    index = DocumentIndex([d for s in seeds for d in s["documents"]])
    critic = ClaimCritic(rounds=1)
    start = time.perf_counter()
    table = critic(candidates, engine, {s["seed_id"]: s["documents"] for s in seeds}, index)
    seconds = time.perf_counter() - start
    result = table.to_pylist()
    claims = sum(len(r["claims"]) for row in result for r in row["rounds"])
    calls = sum(row["num_calls"] for row in result)
    failures = sum(row["num_parse_failures"] for row in result)
    verdicts: dict[str, int] = {}
    for row in result:
        for r in row["rounds"]:
            for c in r["claims"]:
                verdicts[str(c["verdict"])] = verdicts.get(str(c["verdict"]), 0) + 1
    revised = sum(len(row["rounds"]) > 1 for row in result)
    print(f"{len(result)} responses, {claims} claims judged in {seconds:.1f}s; {failures}/{calls} calls unparsed")
    print(f"verdicts: {verdicts}; responses revised: {revised}")
    print(json.dumps({"responses": len(result), "claims": claims, "seconds": round(seconds, 1),
                      "claims_per_minute": round(claims / seconds * 60, 1),
                      "critiques_per_minute": round(len(result) / seconds * 60, 2),
                      "structured_calls": calls, "parse_failures": failures,
                      "parse_failure_rate": round(failures / max(calls, 1), 4), "verdicts": verdicts,
                      "revised": revised}))
    engine.close()


if __name__ == "__main__":
    main()
