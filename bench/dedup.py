"""Dedup benchmark, side by side in one run (2 CPU cores here):

1. embedding throughput of prefmill's embedder vs raw `SentenceTransformer.encode` on the same texts
   (alternated over `--repeats`, median and spread);
2. recall and precision on planted near duplicates (one-word edits, synonym swaps, reordered sentences,
   punctuation and case changes, exact copies) among generated pairs;
3. the incremental case of a daily run: 90% of the pairs already published (their vectors stored),
   10% new — prefmill embeds only the new rows (prompt and reply apart: two texts a pair); `semhash`
   (same encoder, its default usearch index) fits on the old texts (prompt + reply as one) and
   deduplicates the new ones against them, so it embeds both;
4. 1M synthetic 384-d vectors with planted near duplicates: the ANN index build + search of every
   vector, old path (faiss's own training, add and per-query search) against new (`make_index`: k-means and
   list assignment in bf16 where the CPU has it, one assignment for add and search, a list-batched search),
   alternated over `--repeats`, recall against exact search on a sample; then the
   Deduper itself on them as 1M pairs, per-query against list-batched search, with the same removals.
   `--index-only` runs just this part (no encoder).
`--compare-index` also times usearch HNSW (what semhash and DuckDB's vss run) against faiss IVF.

Texts: sentences of Python's own documentation (pydoc topics) and the built-in seed passages, four per
pair, so generated rows are distinct unless planted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import time

import numpy as np
import pyarrow as pa

from prefmill.operators.dedup import Deduper, prompt_text, reply_text
from prefmill.operators.seeds import BUILTIN_SEEDS
from prefmill.schemas.tables import PAIRS
from prefmill.serving.ann import FaissIndex, coarse_dtype, make_index
from prefmill.serving.embedder import SentenceTransformerEmbedder

SYNONYMS = {"value": "number", "function": "routine", "object": "instance", "method": "procedure",
            "returns": "gives back", "called": "invoked", "the": "this", "used": "employed", "must": "has to",
            "attribute": "field", "argument": "parameter", "error": "exception", "list": "sequence"}


def sentences() -> list[str]:
    import pydoc_data.topics as topics

    text = " ".join(topics.topics.values()) + " " + " ".join(
        d for line in BUILTIN_SEEDS.read_text().splitlines() for d in json.loads(line)["documents"])
    found = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))
    return sorted({s.strip() for s in found if 40 <= len(s.strip()) <= 200 and s.strip()[0].isupper()})


def near_duplicate(text: str, rng: random.Random, vocabulary: list[str]) -> str:
    """One realistic edit of `text`."""
    words = text.split()
    kind = rng.choice(["one_word", "synonyms", "reorder", "punctuation", "drop_word"])
    if kind == "one_word":
        words[rng.randrange(len(words))] = rng.choice(vocabulary)
    elif kind == "synonyms":
        words = [SYNONYMS.get(w, w) for w in words]
    elif kind == "drop_word":
        del words[rng.randrange(len(words))]
    elif kind == "punctuation":
        return re.sub(r"[.,;:]", lambda m: rng.choice([";", ",", " -", "."]), text)
    else:
        parts = re.split(r"(?<=[.!?])\s+", text)
        return " ".join(parts[1:] + parts[:1]) if len(parts) > 1 else text[::-1]
    return " ".join(words)


def make_pairs(n: int, dup_share: float, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    """`n` pair rows, `dup_share` of them near duplicates of earlier rows; {duplicate id: original id}."""
    rng, pool = random.Random(seed), sentences()
    vocabulary = sorted({w for s in pool for w in s.split()})
    rows, planted = [], {}
    for k in range(n):
        if rows and rng.random() < dup_share:
            original = rows[rng.randrange(len(rows))]
            question = original["prompt"][0]["content"]
            chosen = near_duplicate(original["chosen"][0]["content"], rng, vocabulary)
            planted[f"p{k:07d}"] = original["pair_id"]
            margin = original["margin"] / 2  # a copy ranks below its original
        else:
            picked = rng.sample(pool, 4)
            question, chosen, margin = picked[0], " ".join(picked[1:]), 1.0 + rng.random()
        rows.append(_row(f"p{k:07d}", question, chosen, margin))
    return rows, planted


def _row(pair_id: str, question: str, chosen: str, margin: float) -> dict:
    row = dict.fromkeys(PAIRS.names)
    row.update(pair_id=pair_id, prompt_id=f"ctx-{pair_id}", prompt=[{"role": "user", "content": question}],
               chosen=[{"role": "assistant", "content": chosen}], rejected=[{"role": "assistant", "content": "-"}],
               margin=margin)
    return row


def embed_throughput(embedder: SentenceTransformerEmbedder, texts: list[str], repeats: int) -> dict:
    """Ours (the Embedder) vs raw `encode` with the same batch size, alternated."""
    raw, ours = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.model.encode(texts, batch_size=embedder.batch_size, normalize_embeddings=True)
        raw.append(len(texts) / (time.perf_counter() - start))
        start = time.perf_counter()
        embedder.embed(texts)
        ours.append(len(texts) / (time.perf_counter() - start))
    ratios = [o / r for o, r in zip(ours, raw)]
    return {"embed_ratio_vs_raw": statistics.median(ratios), "embed_ratio_spread": [min(ratios), max(ratios)],
            "ours_texts_per_s": statistics.median(ours), "raw_texts_per_s": statistics.median(raw)}


def recall_precision(rows: list[dict], planted: dict[str, str], embedder, threshold: float) -> dict:
    start = time.perf_counter()
    result = Deduper(threshold=threshold)(pa.Table.from_pylist(rows, schema=PAIRS), embedder, make_index)
    seconds = time.perf_counter() - start
    removed = set(result.removed.column("removed_pair_id").to_pylist())
    caught = len(removed & planted.keys())
    return {"recall": caught / max(1, len(planted)), "precision": caught / max(1, len(removed)),
            "planted": len(planted), "removed": len(removed), "full_dedup_s": seconds}, result


def one_text(row: dict) -> str:
    """A pair as semhash takes it: one text (prefmill embeds the prompt and the reply apart)."""
    return f"{prompt_text(row)}\n{reply_text(row)}"


def incremental(rows: list[dict], full, embedder, threshold: float, repeats: int) -> dict:
    """90% published (stored vectors) + 10% new: prefmill vs semhash, alternated."""
    from semhash import SemHash

    cut = int(len(rows) * 0.9)
    old_ids = {r["pair_id"] for r in rows[:cut]}
    stored = full.embeddings.filter(pa.array([p in old_ids for p in full.embeddings.column("pair_id").to_pylist()]))
    published = stored.append_column("_version", pa.array([1] * stored.num_rows, pa.int64()))
    new = pa.Table.from_pylist(rows[cut:], schema=PAIRS)
    old_texts = [one_text(r) for r in rows[:cut]]
    new_texts = [one_text(r) for r in rows[cut:]]
    ours, theirs, removed = [], [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        result = Deduper(threshold=threshold)(new, embedder, make_index, published=published)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        semhash = SemHash.from_records(old_texts, model=embedder.model)
        theirs_result = semhash.deduplicate(new_texts, threshold=threshold)
        theirs.append(time.perf_counter() - start)
        removed = {"ours_removed": result.removed.num_rows, "semhash_removed": len(theirs_result.filtered)}
    ratios = [o / t for o, t in zip(ours, theirs)]
    return {"ratio_vs_semhash": statistics.median(ratios), "ratio_vs_semhash_spread": [min(ratios), max(ratios)],
            "incremental_ours_s": statistics.median(ours), "incremental_semhash_s": statistics.median(theirs),
            "new_rows": len(new_texts), "published_rows": stored.num_rows, **removed}


def synthetic_vectors(n: int, dim: int = 384, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit vectors, the last 5% near copies (cosine ≈ 0.93) of earlier ones."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    x = 0.6 * centres[rng.integers(0, 2000, n)] + 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    m = n // 20
    sources = rng.integers(0, n - m, m)
    x[n - m:] = x[sources] + 0.02 * np.linalg.norm(x[sources], axis=1, keepdims=True) * rng.standard_normal(
        (m, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, np.arange(n - m, n), sources


def ann_search(n: int, repeats: int, sample: int = 1000) -> dict:
    """Build an index of every vector and search each for its nearest other, alternated over `repeats`: faiss's
    own path (float32 k-means training, its quantizer's assignment, per-query search; old) against
    `make_index` + `add_search` (bf16 k-means and assignment where the CPU has native bf16, one list
    assignment, list-batched search; new); recall of each against exact search and the planted copies."""
    x, dups, sources = synthetic_vectors(n)
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    found = {}
    for _ in range(repeats):
        for path, run in (("old", faiss_own_build_search), ("new", build_add_search)):
            start = time.perf_counter()
            found[path] = run(x)
            seconds[path].append(time.perf_counter() - start)
    picks = np.random.default_rng(1).choice(n, sample, replace=False)
    exact = [nearest_other(x, p) for p in picks]
    return {**spread(f"search_{n}", seconds), "coarse_dtype": str(coarse_dtype()), "ann_vectors": n,
            **{f"ann_recall_vs_exact_{path}": float(np.mean([e in ids[p] for e, p in zip(exact, picks)]))
               for path, ids in found.items()},
            **{f"ann_planted_recall_{path}": float(np.mean([s in ids[d] for d, s in zip(dups, sources)]))
               for path, ids in found.items()}}


def build_add_search(x: np.ndarray) -> np.ndarray:
    """prefmill's path: `make_index` trained on `x`, then one `add_search`; the neighbour ids."""
    return make_index(x.shape[1], x).add_search(x, 2)[1]


def faiss_own_build_search(x: np.ndarray) -> np.ndarray:
    """The old path: faiss trains the same IVF on the same sample, adds and searches one query at a time."""
    import faiss

    from prefmill.serving.ann import KMEANS_ITERATIONS, NPROBE, TRAIN_PER_LIST, _training_sample

    nlist = int(4 * math.sqrt(len(x)))
    index = faiss.index_factory(x.shape[1], f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.min_points_per_centroid = 0, KMEANS_ITERATIONS, TRAIN_PER_LIST
    index.train(_training_sample(x, nlist * TRAIN_PER_LIST))
    index.nprobe = NPROBE
    index.add(x)
    return index.search(x, 2)[1]


def spread(name: str, seconds: dict[str, list[float]]) -> dict:
    """Median and [min, max] seconds of each path, and the median new/old ratio of the alternated runs."""
    ratios = [new / old for old, new in zip(seconds["old"], seconds["new"])]
    return {**{f"{name}_{path}_s": statistics.median(s) for path, s in seconds.items()},
            **{f"{name}_{path}_spread": [min(s), max(s)] for path, s in seconds.items()},
            f"{name}_ratio": statistics.median(ratios)}


class VectorEmbedder:
    """Looks texts `p<k>` / `r<k>` up as row k of given prompt / reply vectors (dedup without an encoder)."""

    name = "synthetic"

    def __init__(self, prompts: np.ndarray, replies: np.ndarray):
        self.vectors = {"p": prompts, "r": replies}

    def embed(self, texts: list[str]) -> np.ndarray:
        """The vectors of `texts`, which come as the operator sends them: every prompt, then every reply."""
        prompts = sum(t[0] == "p" for t in texts)
        rows = np.array([int(t[1:]) for t in texts], np.int64)
        return np.concatenate([self.vectors["p"][rows[:prompts]], self.vectors["r"][rows[prompts:]]])


def operator_pass(n: int, repeats: int) -> dict:
    """The Deduper on `n` synthetic pairs (prompt dedup, so the index holds the 384-d prompt vectors): the
    plain per-query search (old) against the list-batched one (new), alternated; the same removals."""
    x, dups, sources = synthetic_vectors(n)
    embedder = VectorEmbedder(x, x)
    pairs = pa.Table.from_pylist([_row(f"p{k}", f"p{k}", f"r{k}", 2.0 - k / n) for k in range(n)], schema=PAIRS)
    factories = {"old": lambda dim, sample: FaissIndex(dim, sample, list_batch=math.inf), "new": make_index}
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    removed = {}
    for _ in range(repeats):
        for path, factory in factories.items():
            start = time.perf_counter()
            removed[path] = Deduper(on="prompt")(pairs, embedder, factory).removed
            seconds[path].append(time.perf_counter() - start)
    caught = set(removed["new"].column("removed_pair_id").to_pylist())
    return {**spread(f"dedup_{n}", seconds), "dedup_same_removals": removed["old"].equals(removed["new"]),
            "dedup_planted_recall": float(np.mean([f"p{d}" in caught for d in dups]))}


def nearest_other(x: np.ndarray, p: int) -> int:
    """Exact search: the vector most similar to x[p], other than itself."""
    sims = x @ x[p]
    sims[p] = -2.0
    return int(np.argmax(sims))


def compare_index(n: int) -> dict:
    """usearch HNSW (semhash's and DuckDB vss's engine) vs faiss IVF: build + search all, recall of plants."""
    from usearch.index import Index

    x, dups, sources = synthetic_vectors(n)
    out = {}
    start = time.perf_counter()
    hnsw = Index(ndim=x.shape[1], metric="ip", dtype="f32")
    hnsw.add(np.arange(n), x)
    keys = hnsw.search(x[dups], 2).keys
    out["usearch_hnsw_s"] = time.perf_counter() - start
    out["usearch_recall"] = float(np.mean([s in k for s, k in zip(sources, keys)]))
    start = time.perf_counter()
    ivf = FaissIndex(x.shape[1], x)
    ivf.add(x)
    _, ids = ivf.search(x[dups], 2)
    out["faiss_ivf_s"] = time.perf_counter() - start
    out["faiss_recall"] = float(np.mean([s in k for s, k in zip(sources, ids)]))
    out["compare_vectors"] = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="2k rows, 200k vectors")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--compare-index", type=int, default=0, metavar="N", help="also time usearch vs faiss on N")
    parser.add_argument("--index-only", action="store_true", help="only the index and the operator on vectors")
    parser.add_argument("--operator-repeats", type=int, default=1, help="alternations of the Deduper's two searches "
                                                                        "(each a full dedup of --vectors pairs)")
    args = parser.parse_args()
    rows_n, vectors_n = (2_000, 200_000) if args.quick else (args.rows, args.vectors)
    if args.index_only:
        figures = ann_search(vectors_n, args.repeats) | operator_pass(vectors_n, args.operator_repeats)
        print(json.dumps(figures | {"load_1min": os.getloadavg()[0]}))
        return
    embedder = SentenceTransformerEmbedder()
    rows, planted = make_pairs(rows_n, dup_share=0.1)
    figures = {"rows": rows_n, "threshold": args.threshold}
    texts = [reply_text(r) for r in rows[: min(rows_n, 1000)]]
    figures |= embed_throughput(embedder, texts, args.repeats)
    print(f"embedding: ours {figures['ours_texts_per_s']:.0f} vs raw {figures['raw_texts_per_s']:.0f} texts/s")
    quality, full = recall_precision(rows, planted, embedder, args.threshold)
    figures |= quality
    print(f"planted: recall {quality['recall']:.3f} precision {quality['precision']:.3f} "
          f"({quality['removed']} removed, {quality['planted']} planted) in {quality['full_dedup_s']:.1f} s")
    figures |= incremental(rows, full, embedder, args.threshold, args.repeats)
    print(f"incremental: ours {figures['incremental_ours_s']:.1f} s, semhash {figures['incremental_semhash_s']:.1f} s")
    figures |= ann_search(vectors_n, args.repeats)
    if args.compare_index:
        figures |= compare_index(args.compare_index)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
