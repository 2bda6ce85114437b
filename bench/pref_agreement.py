"""External check of the reward: how often it prefers the reply people chose, on public preference pairs.

Data: the `bigbench` sdist on PyPI (1.0.0; BIG-bench is Apache-2.0, the sdist's metadata says "UNKNOWN")
ships BIG-bench's `hhh_alignment` task (`bigbench/benchmark_tasks/hhh_alignment/{helpful,honest,harmless,
other}/task.json`): 221 pairs over 102 conversations, each a conversation that ends in a human turn and two
assistant replies, one of them marked better (target score 1 vs 0). The conversations, replies and choices
were written by people (Anthropic's HHH evaluations, Askell et al. 2021): the task's own description says
the chosen reply is the one "the vast majority of people would agree" is more helpful, honest and harmless
"on careful reflection", and that many pairs are split from a ranking of three or four replies. No model
made the labels. The sdist (358 MB) is fetched once with `pip download --no-deps` into
$PREFMILL_HOME/cache (it is not installed, nor copied into this repo); only the four task files are read.

What is scored: prefmill's composite score is the follow-up likelihood reward (FLR) and a factuality score,
each normalised within the context, then weighted (`operators/pairs.py`). Within one context each of its
normalisations (`pooled`, `context`, `none`) is a shift and a positive scale, so it keeps the FLR order of
the replies; and these pairs have no source documents for the claim critic to check against, so the
factuality part is left out (weight 0). The agreement here is therefore the FLR part's: `FollowUpReward`
with `SharedPrefixScorer` on the embedded SmolLM2-135M, exactly as the pipeline runs it, on every distinct
(conversation, reply). A pair agrees when reward(chosen) > reward(rejected);
equal rewards are ties (not agreement). Also reported: each FLR aspect's score the same way, the "longer
reply wins" baseline (characters) and the 50% chance line. Pairs share conversations (and chosen replies),
so besides the Wilson interval (which treats the pairs as independent) a bootstrap over conversations gives
`ci_low`/`ci_high`.

    python bench/pref_agreement.py [--limit 221] [--seed 0] [--boot 2000]

On shared cores set OMP_NUM_THREADS=1: with torch's default threads a 3-pair run here was 5x slower.

Last line: one JSON object with `agreement`, `ci_low`, `ci_high`, `longer_wins`, `n`, `ties`, per-aspect
and per-subset agreements, `dataset` and `labels`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._fetch import fetch_dist  # noqa: E402
from prefmill.operators.flr import FollowUpReward  # noqa: E402
from prefmill.operators.ids import stable_id  # noqa: E402
from prefmill.serving.prefix_scorer import SharedPrefixScorer  # noqa: E402

SDIST = "bigbench-1.0.0.tar.gz"
TASK_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/"
SUBSETS = ("harmless", "helpful", "honest", "other")
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}


def read_tasks(sdist: Path) -> dict[str, list[dict]]:
    """The examples of the four HHH subsets, read straight from the sdist."""
    wanted = {TASK_DIR + f"{subset}/task.json": subset for subset in SUBSETS}
    tasks: dict[str, list[dict]] = {}
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            if member.name in wanted:
                tasks[wanted[member.name]] = json.load(archive.extractfile(member))["examples"]
                if len(tasks) == len(wanted):
                    break
    missing = set(SUBSETS) - set(tasks)
    if missing:
        raise RuntimeError(f"{sdist}: no hhh_alignment task for {sorted(missing)}")
    return tasks


def conversation(text: str) -> list[dict]:
    """An HHH input ("<human turn>\\n\\nAssistant: …\\n\\nHuman: …") as chat messages ending in the user."""
    parts = TURN.split(text)
    roles = ["Human", *parts[1::2]]
    messages = [{"role": ROLES[r], "content": c.strip()} for r, c in zip(roles, parts[0::2], strict=True)]
    if messages[-1]["role"] != "user":
        raise ValueError(f"conversation does not end in a human turn: {text[-80:]!r}")
    return messages


def load_pairs(sdist: Path) -> list[dict]:
    pairs = []
    for subset, examples in read_tasks(sdist).items():
        for example in examples:
            ranked = sorted(example["target_scores"].items(), key=lambda kv: kv[1], reverse=True)
            (chosen, top), (rejected, low) = ranked
            if top <= low:
                raise ValueError(f"{subset}: an example without a better reply")
            context = conversation(example["input"])
            pairs.append({"subset": subset, "context_id": stable_id("ctx", context), "context": context,
                          "chosen": chosen.strip(), "rejected": rejected.strip()})
    return pairs


def candidates(pairs: list[dict]) -> list[dict]:
    """Each distinct (conversation, reply) once, in the shape `FollowUpReward` takes."""
    out = {}
    for pair in pairs:
        for reply in (pair["chosen"], pair["rejected"]):
            cid = stable_id("cand", pair["context_id"], reply)
            out[cid] = {"candidate_id": cid, "context_id": pair["context_id"], "context": pair["context"],
                        "reply": reply}
    return list(out.values())


def score(cands: list[dict], chunk: int = 16) -> tuple[dict[str, dict], float]:
    """Reward rows by candidate id, and the seconds the scoring took (after a one-candidate warm-up)."""
    scorer, flr = SharedPrefixScorer(), FollowUpReward()
    flr(cands[:1], scorer)
    start, rows = time.perf_counter(), []
    for i in range(0, len(cands), chunk):
        rows += flr(cands[i:i + chunk], scorer).to_pylist()
        print(f"scored {len(rows)}/{len(cands)} replies, {time.perf_counter() - start:.0f}s", file=sys.stderr)
    return {row["candidate_id"]: row for row in rows}, time.perf_counter() - start


def outcome(chosen: float | None, rejected: float | None) -> str:
    if chosen is None or rejected is None:
        return "missing"
    return "agree" if chosen > rejected else "tie" if chosen == rejected else "disagree"


def judge(pair: dict, rewards: dict[str, dict]) -> dict[str, str]:
    """Per pair: the outcome for the total reward, each aspect, and the longer-reply baseline."""
    rows = [rewards[stable_id("cand", pair["context_id"], pair[side])] for side in ("chosen", "rejected")]
    out = {"reward": outcome(rows[0]["reward"], rows[1]["reward"]),
           "longer": outcome(len(pair["chosen"]), len(pair["rejected"]))}
    aspects = [{a["aspect"]: a["score"] for a in row["aspects"]} for row in rows]
    for aspect in aspects[0]:
        out[f"aspect:{aspect}"] = outcome(aspects[0][aspect], aspects[1].get(aspect))
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def cluster_bootstrap(hits: list[bool], clusters: list[str], boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the hit rate, resampling whole conversations."""
    groups: dict[str, list[bool]] = {}
    for hit, cluster in zip(hits, clusters, strict=True):
        groups.setdefault(cluster, []).append(hit)
    keys, rng, rates = list(groups), random.Random(seed), []
    for _ in range(boot):
        drawn = [groups[rng.choice(keys)] for _ in keys]
        rates.append(sum(map(sum, drawn)) / sum(map(len, drawn)))
    rates.sort()
    return rates[int(0.025 * boot)], rates[min(boot - 1, int(0.975 * boot))]


def rate(outcomes: list[str]) -> float:
    return round(outcomes.count("agree") / len(outcomes), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=221, help="pairs to score (a seeded sample; 221 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the interval")
    args = parser.parse_args()
    pairs = load_pairs(fetch_dist("bigbench==1.0.0", SDIST))
    total = len(pairs)
    if args.limit < total:
        pairs = random.Random(args.seed).sample(pairs, args.limit)
    cands = candidates(pairs)
    rewards, seconds = score(cands)
    verdicts = [judge(pair, rewards) for pair in pairs]
    report(pairs, verdicts, seconds, len(cands), total, args)


def report(pairs: list[dict], verdicts: list[dict], seconds: float, replies: int, total: int, args) -> None:
    n, reward = len(pairs), [v["reward"] for v in verdicts]
    hits = [o == "agree" for o in reward]
    low, high = cluster_bootstrap(hits, [p["context_id"] for p in pairs], args.boot, args.seed)
    wlow, whigh = wilson(sum(hits), n)
    aspects = sorted(k.split(":", 1)[1] for k in verdicts[0] if k.startswith("aspect:"))
    subsets = {s: [v["reward"] for p, v in zip(pairs, verdicts) if p["subset"] == s] for s in SUBSETS}
    figures = {
        "dataset": "BIG-bench hhh_alignment (bigbench==1.0.0 sdist on PyPI)", "labels": "human",
        "scorer": "FollowUpReward + SharedPrefixScorer, smollm2-135m", "factuality_weight": 0.0,
        "n": n, "pairs_available": total, "conversations": len({p["context_id"] for p in pairs}),
        "replies_scored": replies, "agreement": rate(reward), "ties": reward.count("tie"),
        "ci_low": round(low, 3), "ci_high": round(high, 3), "ci": "95% bootstrap over conversations",
        "wilson_low": round(wlow, 3), "wilson_high": round(whigh, 3),
        "longer_wins": rate([v["longer"] for v in verdicts]),
        "longer_ties": [v["longer"] for v in verdicts].count("tie"), "chance": 0.5,
        "aspects": {a: rate([v[f"aspect:{a}"] for v in verdicts]) for a in aspects},
        "subsets": {s: {"n": len(o), "agreement": rate(o)} for s, o in subsets.items() if o},
        "longer_by_subset": {s: rate([v["longer"] for p, v in zip(pairs, verdicts) if p["subset"] == s])
                             for s in SUBSETS if subsets[s]},
        "score_seconds": round(seconds, 1), "seconds_per_pair": round(seconds / n, 2),
        "seconds_per_reply": round(seconds / replies, 2),
    }
    print(f"{n} human-labelled pairs ({figures['conversations']} conversations, {replies} distinct replies) "
          f"scored in {seconds:.0f}s ({figures['seconds_per_pair']} s/pair)")
    print(f"FLR prefers the human-chosen reply in {figures['agreement']:.3f} (95% CI {low:.3f}-{high:.3f}; "
          f"{figures['ties']} ties) vs longer-reply-wins {figures['longer_wins']:.3f} vs chance 0.5")
    print("by aspect:", figures["aspects"])
    print("by subset:", {s: v["agreement"] for s, v in figures["subsets"].items()},
          "longer:", figures["longer_by_subset"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
