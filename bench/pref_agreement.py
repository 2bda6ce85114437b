"""External check of the scores: how often each prefers the reply people chose, on public preference pairs.

Data: the `bigbench` sdist on PyPI (1.0.0; BIG-bench is Apache-2.0, the sdist's metadata says "UNKNOWN")
ships BIG-bench's `hhh_alignment` task (`bigbench/benchmark_tasks/hhh_alignment/{helpful,honest,harmless,
other}/task.json`): 221 pairs over 102 conversations, each a conversation that ends in a human turn and two
assistant replies, one of them marked better (target score 1 vs 0). The conversations, replies and choices
were written by people (Anthropic's HHH evaluations, Askell et al. 2021): the task's own description says
the chosen reply is the one "the vast majority of people would agree" is more helpful, honest and harmless
"on careful reflection", and that many pairs are split from a ranking of three or four replies. No model
made the labels. The sdist (358 MB) is fetched once with `pip download --no-deps` into
$PREFMILL_HOME/cache (it is not installed, nor copied into this repo); only the four task files are read.

What is scored: exactly what `prefmill evaluate` scores (`flows/evaluate.py`, this bench is its caller on
these pairs): the follow-up likelihood reward (FLR), the rubric judge (the mean of its helpfulness,
harmlessness and honesty scores) and the composite with the config's weights (by default here
`pairs.flr_weight = 1`, `pairs.judge_weight = 1`; `--set` changes them), all on the embedded SmolLM2-135M
unless the config names other models. These pairs have no source documents for the claim critic, so the
factuality part is skipped (weight 0). A pair agrees when score(chosen) > score(rejected); equal scores are
ties (not agreement). Also reported: the "longer reply wins" baseline (characters), the 50% chance line and
each HHH subset. Pairs share conversations (and chosen replies), so besides the Wilson interval (which treats
the pairs as independent) a bootstrap over conversations gives `boot_low`/`boot_high`.

    python bench/pref_agreement.py [--limit 221] [--seed 0] [--boot 2000] [--set pairs.flr_weight=1 ...]

On shared cores set OMP_NUM_THREADS=1: with torch's default threads a 3-pair run here was 5x slower.

Last line: one JSON object with `parts` (flr, factuality, judge, composite, longer: agreement, counts,
intervals), `subsets` (the same per HHH subset), `n`, `seconds`, `dataset` and `labels`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._fetch import fetch_dist  # noqa: E402
from prefmill.flows.evaluate import LabelledPair, report, score_labelled  # noqa: E402
from prefmill.flows.pipeline import open_pool  # noqa: E402
from prefmill.operators.ids import stable_id  # noqa: E402
from prefmill.operators.pairs import PairMiner  # noqa: E402
from prefmill.schemas.config import load_pipeline_config, settings  # noqa: E402

SDIST = "bigbench-1.0.0.tar.gz"
TASK_DIR = "bigbench-1.0.0/bigbench/benchmark_tasks/hhh_alignment/"
SUBSETS = ("harmless", "helpful", "honest", "other")
TURN = re.compile(r"\n\n(Human|Assistant):")
ROLES = {"Human": "user", "Assistant": "assistant"}
DEFAULTS = ("judge.enabled=true", "pairs.flr_weight=1", "pairs.judge_weight=1")  # every part; --set overrides


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


def labelled(pairs: list[dict]) -> list[LabelledPair]:
    """The HHH pairs in `prefmill evaluate`'s form (each pair's subset kept)."""
    return [LabelledPair(k, p["context"], p["chosen"], p["rejected"], subset=p["subset"])
            for k, p in enumerate(pairs, 1)]


def show_progress(part: str, done: int, total: int) -> None:
    print(f"{part}: scored {done}/{total} replies", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=221, help="pairs to score (a seeded sample; 221 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples for the interval")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="config override, e.g. pairs.judge_weight=2 (repeatable)")
    args = parser.parse_args()
    cfg = load_pipeline_config(None, [*DEFAULTS, *args.overrides])
    pairs = load_pairs(fetch_dist("bigbench==1.0.0", SDIST))
    total = len(pairs)
    if args.limit < total:
        pairs = random.Random(args.seed).sample(pairs, args.limit)
    chosen = labelled(pairs)
    pool = open_pool(cfg)
    try:
        start = time.perf_counter()
        values = score_labelled(cfg, chosen, pool, show_progress)
        seconds = time.perf_counter() - start
    finally:
        pool.shutdown()
    print_report(cfg, chosen, values, seconds, total, args)


def print_report(cfg, pairs: list[LabelledPair], values: dict, seconds: float, total: int, args) -> None:
    miner = PairMiner(**settings(PairMiner, cfg.pairs))
    figures = {"dataset": "BIG-bench hhh_alignment (bigbench==1.0.0 sdist on PyPI)", "labels": "human",
               "models": {k: v for k, v in cfg.models.resolved().items() if k in ("scorer", "judge")},
               "n": len(pairs), "pairs_available": total,
               **report(pairs, values, miner, args.boot, args.seed),
               "subsets": {s: report(group, values, miner, args.boot, args.seed)["parts"]
                           for s in SUBSETS if (group := [p for p in pairs if p.subset == s])},
               "seconds": round(seconds, 1), "seconds_per_pair": round(seconds / len(pairs), 2)}
    parts = figures["parts"]
    print(f"{len(pairs)} human-labelled pairs ({figures['prompts']} conversations, {figures['replies']} distinct "
          f"replies) scored in {seconds:.0f}s")
    for name, part in parts.items():
        if "skipped" in part:
            print(f"{name:>10}: {part['skipped']}")
            continue
        print(f"{name:>10}: {part['agreement']} (Wilson {part['wilson_low']}-{part['wilson_high']}, bootstrap "
              f"{part['boot_low']}-{part['boot_high']}; {part['ties']} ties, {part['missing']} missing)")
    print("composite weights:", parts["composite"]["weights"], "chance 0.5")
    print("by subset:", {s: {k: v.get("agreement") for k, v in sub.items()} for s, sub in figures["subsets"].items()})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
