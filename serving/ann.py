"""Nearest-neighbour indexes for semantic dedup (faiss-cpu), behind `operators.dedup.VectorIndex`.

Small sets are searched exactly (`IndexFlatIP`: one BLAS matrix product). From `EXACT_LIMIT` vectors on,
an inverted-file index (`IVF{nlist},Flat`, inner product) trained on a sample of the vectors to be
indexed: each query scans only the `nprobe` lists nearest to it. Near duplicates (cosine ≥ 0.9) sit in
the same or a neighbouring list, so a few probes find them. Chosen over usearch's HNSW (also what
DuckDB's vss extension runs) by measurement on 2 cores: see `bench/dedup.py --compare-index` and docs/benchmarks.md.
"""

from __future__ import annotations

import math
import os

import numpy as np

EXACT_LIMIT = 20_000
NPROBE = 4
TRAIN_PER_LIST = 20
KMEANS_ITERATIONS = 10


class FaissIndex:
    """A `VectorIndex` over L2-normalised float32 vectors; ids are insertion positions."""

    def __init__(self, dim: int, sample: np.ndarray | None = None, nprobe: int = NPROBE,
                 exact_limit: int = EXACT_LIMIT, threads: int | None = None):
        import faiss

        faiss.omp_set_num_threads(threads or len(os.sched_getaffinity(0)))
        size = 0 if sample is None else len(sample)
        if size < exact_limit:
            self.index = faiss.IndexFlatIP(dim)
            return
        nlist = int(4 * math.sqrt(size))
        self.index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        self.index.cp.seed = 0  # k-means start: the same index for the same sample
        self.index.cp.niter = KMEANS_ITERATIONS  # 1M×384: planted and exact-NN recall 1.000 at 10 (bench/dedup.py)
        self.index.train(_training_sample(sample, nlist * TRAIN_PER_LIST))
        self.index.nprobe = nprobe

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, self.index.ntotal))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def __len__(self) -> int:
        return self.index.ntotal


def make_index(dim: int, sample: np.ndarray | None = None) -> FaissIndex:
    """The index dedup uses by default: exact below `EXACT_LIMIT` vectors, IVF above."""
    return FaissIndex(dim, sample)


def _training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    """Evenly spaced rows (deterministic for a given input order), at most `size` of them."""
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    picks = np.linspace(0, len(vectors) - 1, size).astype(np.int64)
    return np.ascontiguousarray(vectors[picks], dtype=np.float32)
