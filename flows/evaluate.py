"""`prefmill evaluate`: how often each score part prefers the human-chosen reply of labelled pairs.

Input: JSON Lines or Parquet with `prompt`, `chosen`, `rejected` (strings, or TRL message lists: the prompt a
conversation ending in a user turn, each reply one assistant message), or the folder `prefmill export
--format trl` writes and optionally `documents` (source texts the claim critic checks against). Every distinct
(prompt, reply) is scored once by each part the config can run: FLR, claim factuality (only where there are
documents: a line's own or `critiques.documents`) and the rubric judge (mean over `judge.aspects`); the
composite is the pipeline's own (`PairMiner.score`: each part normalised within the prompt, weighted by
`pairs.*_weight`). A pair agrees when the chosen reply scores higher; equal scores are ties (not agreement);
a reply a part could not score makes the pair `missing` for that part. Agreement is agree / scored pairs,
with a Wilson 95% interval, and a bootstrap over prompts when prompts repeat (their pairs are not
independent). The "longer reply wins" baseline (characters) and chance (0.5) are reported beside them.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from prefmill.flows.pipeline import open_pool
from prefmill.flows.stages.rewards import follow_up_reward
from prefmill.operators.critiques import ClaimCritic
from prefmill.operators.flr import FollowUpReward
from prefmill.operators.ids import stable_id
from prefmill.operators.judge import RubricJudge, judge_scores, load_rubrics
from prefmill.operators.pairs import PairMiner, Scored
from prefmill.operators.retrieval import DocumentIndex, load_documents
from prefmill.schemas.config import PipelineConfig, settings

PARTS = ("flr", "factuality", "judge")
Values = dict[str, float | None]  # candidate id → a part's score (None: not scored)
Progress = Callable[[str, int, int], None]  # (part, replies done, replies total)


class LabelledFileError(ValueError):
    """A labelled pairs file with a bad line: the message names file:line and the field."""


@dataclass(frozen=True)
class LabelledPair:
    """One human-labelled pair: the conversation and the chosen and rejected reply texts."""

    line: int
    prompt: list[dict]
    chosen: str
    rejected: str
    documents: list[str] = field(default_factory=list)
    subset: str | None = None

    @property
    def context_id(self) -> str:
        return stable_id("ctx", self.prompt)

    def candidate_id(self, side: str) -> str:
        return stable_id("cand", self.context_id, getattr(self, side))


def load_labelled(path: Path) -> list[LabelledPair]:
    """The pairs of a JSONL file, a Parquet file, or the folder `prefmill export --format trl` writes (its
    `data/*.parquet`); a bad line or row raises `LabelledFileError` naming file:line (or row) and field."""
    path = Path(path)
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    pairs = [pair for file in files for pair in (_parquet_pairs(file) if file.suffix == ".parquet"
                                                 else _jsonl_pairs(file))]
    if not pairs:
        raise LabelledFileError(f"{path}: no pairs (expected JSON lines or Parquet rows with prompt, chosen and "
                                "rejected)")
    return pairs


def _jsonl_pairs(path: Path) -> list[LabelledPair]:
    try:  # split on newlines only: U+2028 and friends are legal inside a JSON string
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelledFileError(f"cannot read {path}: {exc}") from exc
    return [_pair(f"{path}:{k}", k, _json_row(f"{path}:{k}", text)) for k, text in enumerate(lines, 1)
            if text.strip()]


def _parquet_pairs(path: Path) -> list[LabelledPair]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:
        raise LabelledFileError(f"cannot read {path}: {exc}") from exc
    return [_pair(f"{path}: row {k}", k, row) for k, row in enumerate(rows, 1)]


def _json_row(where: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LabelledFileError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None


def _pair(where: str, line: int, row: Any) -> LabelledPair:
    if not isinstance(row, dict):
        raise LabelledFileError(f"{where}: expected a JSON object with prompt, chosen and rejected")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
    if missing:
        raise LabelledFileError(f"{where}: missing field(s) {missing} (each line needs prompt, chosen, rejected)")
    documents = row.get("documents") or []
    if not (isinstance(documents, list) and all(isinstance(d, str) for d in documents)):
        raise LabelledFileError(f"{where}: field 'documents' must be a list of strings")
    return LabelledPair(line, _prompt(where, row["prompt"]), _reply(where, "chosen", row["chosen"]),
                        _reply(where, "rejected", row["rejected"]), documents, row.get("subset"))


def _prompt(where: str, value: Any) -> list[dict]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not _messages(value) or value[-1]["role"] != "user":
        raise LabelledFileError(f"{where}: field 'prompt' must be a non-empty string or a list of "
                                "{role, content} messages ending in a user turn")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _reply(where: str, name: str, value: Any) -> str:
    if isinstance(value, str) and value.strip():
        return value
    if _messages(value) and len(value) == 1 and value[0]["role"] == "assistant" and value[0]["content"].strip():
        return value[0]["content"]
    raise LabelledFileError(f"{where}: field '{name}' must be a non-empty string or one assistant message "
                            "[{\"role\": \"assistant\", \"content\": …}] (multi-turn replies are not scored)")


def _messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in value)


def candidates(pairs: list[LabelledPair]) -> list[dict]:
    """Each distinct (prompt, reply) once, in the shape the scorers take (the prompt stands for the seed)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        for side in ("chosen", "rejected"):
            cid = pair.candidate_id(side)
            seed = stable_id("seed", pair.context_id, pair.documents)  # the documents its claims are checked on
            out[cid] = {"candidate_id": cid, "context_id": pair.context_id, "seed_id": seed,
                        "context": pair.prompt, "reply": getattr(pair, side), "finish_reason": "stop",
                        "documents": pair.documents}
    return list(out.values())


@dataclass(frozen=True)
class FLRPart:
    """FLR rewards of replies on the scorer model."""

    flr: FollowUpReward
    scorer: str

    def __call__(self, cands: list[dict], models: Any) -> Values:
        table = self.flr(cands, models.scorer(self.scorer))
        return dict(zip(table.column("candidate_id").to_pylist(), table.column("reward").to_pylist()))


@dataclass(frozen=True)
class JudgePart:
    """The rubric judge's mean score over its aspects (None when an aspect did not parse)."""

    judge: RubricJudge
    model: str

    def __call__(self, cands: list[dict], models: Any) -> Values:
        table = self.judge(cands, models.chat_model(self.model))
        return {cid: score for cid, (score, _) in judge_scores(table).items()}


@dataclass(frozen=True)
class FactualityPart:
    """The claim critic's first-round factuality score against each reply's documents (no revision)."""

    critic: ClaimCritic
    model: str
    index: DocumentIndex | None = None

    def __call__(self, cands: list[dict], models: Any) -> Values:
        documents = {c["seed_id"]: c["documents"] for c in cands}
        table = self.critic(cands, models.chat_model(self.model), documents, self.index)
        return dict(zip(table.column("candidate_id").to_pylist(), table.column("initial_score").to_pylist()))


def model_parts(cfg: PipelineConfig, pairs: list[LabelledPair]) -> dict[str, Any]:
    """Each part's scorer step, or the reason it cannot run, as a string."""
    models = cfg.models.resolved()
    has_documents = bool(cfg.critiques.documents) or any(p.documents for p in pairs)
    index = DocumentIndex(load_documents(cfg.critiques.documents)) if cfg.critiques.documents else None
    critic = ClaimCritic(**settings(ClaimCritic, cfg.critiques) | {"rounds": 0})
    judge = RubricJudge(load_rubrics(cfg.judge.rubric_file), **settings(RubricJudge, cfg.judge))
    return {"flr": FLRPart(follow_up_reward(cfg), models["scorer"]),
            "factuality": FactualityPart(critic, models["critic"], index) if has_documents else
            "skipped: no documents to check claims against (give lines a 'documents' list or set critiques.documents)",
            "judge": JudgePart(judge, models["judge"])}


def score_parts(parts: dict[str, Any], cands: list[dict], run: Callable[[Any, list[dict]], Values],
                progress: Progress, chunk: int = 32) -> dict[str, Values | str]:
    """Every runnable part's values over `cands`, `chunk` replies a call (`run(step, rows)`), with progress."""
    out: dict[str, Values | str] = {}
    for name, step in parts.items():
        if isinstance(step, str):
            out[name] = step
            continue
        values: Values = {}
        for start in range(0, len(cands), chunk):
            values |= run(step, cands[start:start + chunk])
            progress(name, min(start + chunk, len(cands)), len(cands))
        out[name] = values
    return out


def composite(pairs: list[LabelledPair], values: dict[str, Values | str], miner: PairMiner) -> Values:
    """The pipeline's composite score of every reply that has each part the miner weighs (None otherwise)."""
    needed = [p for p in PARTS if getattr(miner, f"{p}_weight")]
    contexts: dict[str, list[Scored]] = {}
    for cand in candidates(pairs):
        part = {p: v.get(cand["candidate_id"]) if isinstance(v, dict) else None for p, v in values.items()}
        if any(part.get(p) is None for p in needed):
            continue
        contexts.setdefault(cand["context_id"], []).append(
            Scored(cand, part.get("flr") or 0.0, part.get("factuality"), None, part.get("judge")))
    miner.score(contexts)
    return {s.row["candidate_id"]: s.score for group in contexts.values() for s in group}


def outcome(chosen: float | None, rejected: float | None) -> str:
    if chosen is None or rejected is None or math.isnan(chosen) or math.isnan(rejected):
        return "missing"
    return "agree" if chosen > rejected else "tie" if chosen == rejected else "disagree"


def outcomes(pairs: list[LabelledPair], values: Values) -> list[str]:
    return [outcome(values.get(p.candidate_id("chosen")), values.get(p.candidate_id("rejected"))) for p in pairs]


def length_values(pairs: list[LabelledPair]) -> Values:
    """The "longer reply wins" baseline: each reply's length in characters."""
    return {p.candidate_id(side): float(len(getattr(p, side))) for p in pairs for side in ("chosen", "rejected")}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of k successes in n trials (NaN when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


def cluster_bootstrap(hits: list[bool], clusters: list[str], boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the hit rate, resampling whole prompts."""
    groups: dict[str, list[bool]] = {}
    for hit, cluster in zip(hits, clusters, strict=True):
        groups.setdefault(cluster, []).append(hit)
    keys, rng, rates = list(groups), random.Random(seed), []
    for _ in range(boot):
        drawn = [groups[rng.choice(keys)] for _ in keys]
        rates.append(sum(map(sum, drawn)) / sum(map(len, drawn)))
    rates.sort()
    return rates[int(0.025 * boot)], rates[min(boot - 1, int(0.975 * boot))]


def agreement(pairs: list[LabelledPair], results: list[str], boot: int = 2000, seed: int = 0) -> dict:
    """Counts, agreement over the scored pairs, the Wilson interval, and the bootstrap over prompts when they
    repeat."""
    scored = [(p, r) for p, r in zip(pairs, results, strict=True) if r != "missing"]
    n, agree = len(scored), results.count("agree")
    low, high = wilson(agree, n)
    out = {"n": n, "agree": agree, "disagree": results.count("disagree"), "ties": results.count("tie"),
           "missing": results.count("missing"), "agreement": _round(agree / n if n else math.nan),
           "wilson_low": _round(low), "wilson_high": _round(high), "boot_low": None, "boot_high": None}
    prompts = [p.context_id for p, _ in scored]
    if n and len(set(prompts)) < n:
        blow, bhigh = cluster_bootstrap([r == "agree" for _, r in scored], prompts, boot, seed)
        out |= {"boot_low": _round(blow), "boot_high": _round(bhigh)}
    return out


def _round(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def report(pairs: list[LabelledPair], values: dict[str, Values | str], miner: PairMiner, boot: int = 2000,
           seed: int = 0) -> dict:
    """Agreement of every part, the composite and the length baseline with the human labels."""
    parts = {name: ({"skipped": v} if isinstance(v, str) else agreement(pairs, outcomes(pairs, v), boot, seed))
             for name, v in values.items()}
    miner, dropped = runnable_miner(miner, values)
    parts["composite"] = agreement(pairs, outcomes(pairs, composite(pairs, values, miner)), boot, seed)
    parts["composite"]["weights"] = {"flr": miner.flr_weight, "factuality": miner.factuality_weight,
                                     "judge": miner.judge_weight}
    if dropped:
        parts["composite"]["note"] = f"weight 0 for {dropped}: skipped here (as a run without critiques drops it)"
    parts["longer"] = agreement(pairs, outcomes(pairs, length_values(pairs)), boot, seed)
    return {"pairs": len(pairs), "prompts": len({p.context_id for p in pairs}), "replies": len(candidates(pairs)),
            "parts": parts, "chance": 0.5}


def runnable_miner(miner: PairMiner, values: dict[str, Values | str]) -> tuple[PairMiner, list[str]]:
    """`miner` with the weight of each part that could not run set to 0, and those parts' names."""
    dropped = [p for p in PARTS if isinstance(values.get(p), str) and getattr(miner, f"{p}_weight")]
    return replace(miner, **{f"{p}_weight": 0.0 for p in dropped}), dropped


def score_labelled(cfg: PipelineConfig, pairs: list[LabelledPair], pool: Any, progress: Progress | None = None
                   ) -> dict[str, Values | str]:
    """Every part's values over the distinct replies of `pairs`, on the models of `pool` (`run(step, rows)`)."""
    def run(step: Any, rows: list[dict]) -> Values:
        return pool.run(step, rows).value

    return score_parts(model_parts(cfg, pairs), candidates(pairs), run, progress or (lambda *_: None))


def evaluate_pairs(cfg: PipelineConfig, pairs: list[LabelledPair], pool: Any,
                   progress: Progress | None = None, boot: int = 2000, seed: int = 0) -> dict:
    """Score `pairs` with the models of `pool` and report each part's agreement with the human labels."""
    values = score_labelled(cfg, pairs, pool, progress)
    return report(pairs, values, PairMiner(**settings(PairMiner, cfg.pairs)), boot, seed)


def evaluate_file(path: Path, cfg: PipelineConfig, progress: Progress | None = None, boot: int = 2000,
                  seed: int = 0) -> dict:
    """`evaluate_pairs` on the pairs of `path`, with the models of a pool opened for `cfg` and closed after."""
    pairs = load_labelled(path)
    pool = open_pool(cfg)
    try:
        return {"file": str(path), **evaluate_pairs(cfg, pairs, pool, progress, boot, seed)}
    finally:
        pool.shutdown()
