"""Nearest-neighbour indexes for semantic dedup (faiss-cpu), behind `operators.dedup.VectorIndex`.

Small sets are searched exactly (`IndexFlatIP`: one BLAS matrix product). From `EXACT_LIMIT` vectors on,
an inverted-file index (`IVF{nlist},Flat`, inner product) trained on a sample of the vectors to be
indexed: each query scans only the `nprobe` lists nearest to it. Near duplicates (cosine ≥ 0.9) sit in
the same or a neighbouring list, so a few probes find them. Chosen over usearch's HNSW (also what
DuckDB's vss extension runs) by measurement on 2 cores: see `bench/dedup.py --compare-index` and docs/benchmarks.md.

A large search goes list by list (each list's vectors against all the queries that probe it, one matrix
product on one BLAS thread) instead of query by query: the same neighbours, 2-5x faster from 30k to 1M here
(faiss's own `contrib.big_batch_search` does the same but prints progress). `add_search` computes the list
assignment once for adding vectors and searching them.

The coarse work (k-means training and assigning every vector to its lists: most of a 1M build) runs as
torch matrix products in bfloat16 on CPUs with native bf16 (AMX / AVX512-BF16), float32 elsewhere: 3x
faster here for the same lists up to near ties (planted and exact-NN recall 1.000 at 1M, docs/benchmarks.md).
A list's search, whose similarities the dedup thresholds read, stays float32.
"""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import torch
from threadpoolctl import threadpool_limits

EXACT_LIMIT = 20_000
NPROBE = 4
TRAIN_PER_LIST = 20
KMEANS_ITERATIONS = 10
LIST_BATCH = 128  # queries per list, on average, from which a search goes list by list (the smallest IVF,
# EXACT_LIMIT vectors, has ~140): with BLAS on one thread it was 2-5x faster than per-query from 30k to 1M here
# (docs/benchmarks.md, dedup)
ASSIGN_BLOCK = 8192  # vectors assigned to their lists per matrix product (block × lists similarities held)


class FaissIndex:
    """A `VectorIndex` over L2-normalised float32 vectors; ids are insertion positions."""

    def __init__(self, dim: int, sample: np.ndarray | None = None, nprobe: int = NPROBE,
                 exact_limit: int = EXACT_LIMIT, threads: int | None = None, list_batch: float = LIST_BATCH):
        import faiss

        faiss.omp_set_num_threads(threads or len(os.sched_getaffinity(0)))
        self.list_batch = list_batch
        size = 0 if sample is None else len(sample)
        if size < exact_limit:
            self.index = faiss.IndexFlatIP(dim)
            return
        nlist = int(4 * math.sqrt(size))
        self.index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        self.centroids = spherical_kmeans(_training_sample(sample, nlist * TRAIN_PER_LIST), nlist)
        self.index.quantizer.add(self.centroids)
        self.index.is_trained = True
        self.index.nprobe = nprobe

    def add(self, vectors: np.ndarray) -> None:
        x = _floats(vectors)
        self._add(x, self._assign(x))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        x = _floats(queries)
        return self._search(x, k, self._assign(x))

    def add_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Adds `vectors`, then searches them among everything held (themselves included), assigning them
        to their lists once for both."""
        x = _floats(vectors)
        lists = self._assign(x)
        self._add(x, lists)
        return self._search(x, k, lists)

    def emptied(self) -> FaissIndex:
        """An empty index trained like this one: the same lists, so a search probes the same ones."""
        import faiss

        twin = copy.copy(self)
        twin.index = faiss.clone_index(self.index)
        twin.index.reset()
        return twin

    def __len__(self) -> int:
        return self.index.ntotal

    def _assign(self, x: np.ndarray) -> np.ndarray | None:
        """The `nprobe` lists nearest to each vector, nearest first (None for the exact index)."""
        if not hasattr(self.index, "nlist") or not len(x):
            return None
        return nearest_lists(x, self.centroids, self.index.nprobe)

    def _add(self, x: np.ndarray, lists: np.ndarray | None) -> None:
        from faiss.contrib.ivf_tools import add_preassigned

        if lists is not None:
            add_preassigned(self.index, x, np.ascontiguousarray(lists[:, 0]))
        elif len(x):
            self.index.add(x)

    def _search(self, x: np.ndarray, k: int, lists: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        from faiss.contrib.ivf_tools import search_preassigned

        k = max(1, min(k, self.index.ntotal))
        if lists is None:
            return self.index.search(x, k)
        if lists.size < self.list_batch * self.index.nlist:
            return search_preassigned(self.index, x, k, lists)
        return list_batched_search(self.index, x, k, lists)


def spherical_kmeans(sample: np.ndarray, lists: int, iterations: int = KMEANS_ITERATIONS, seed: int = 0
                     ) -> np.ndarray:
    """`lists` unit centroids of `sample` (Lloyd's iterations on cosine; seeded, so the same sample gives the
    same lists). 1M×384: recall 1.000 at 10 iterations."""
    sample, rng = _floats(sample), np.random.default_rng(seed)
    centroids, vectors = _initial_centroids(sample, lists, rng), torch.tensor(sample)
    for _ in range(iterations):
        nearest = nearest_lists(sample, centroids, 1)[:, 0]
        sums = torch.zeros(centroids.shape).index_add_(0, torch.from_numpy(nearest), vectors).numpy()
        counts = np.bincount(nearest, minlength=lists)
        centroids = _split_empty(np.where(counts[:, None] > 0, _unit(sums), centroids), counts, rng)
    return centroids


def _initial_centroids(sample: np.ndarray, lists: int, rng: np.random.Generator) -> np.ndarray:
    """`lists` distinct rows of `sample` at random (copies of one vector would start lists that never part),
    topped up with random unit vectors when fewer rows are distinct (pairs sharing one prompt, `on = prompt`)."""
    distinct = np.unique(sample, axis=0)
    picks = distinct[rng.choice(len(distinct), min(lists, len(distinct)), replace=False)]
    return np.concatenate([picks, _unit(rng.standard_normal((lists - len(picks), sample.shape[1])))])


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each list left empty restarts next to the biggest list's centroid, which the two then share (faiss's
    k-means splits the same way), so no list stays unused."""
    for empty in np.flatnonzero(counts == 0):
        biggest = int(np.argmax(counts))
        centroids[empty] = _unit(centroids[biggest] + 1e-3 * rng.standard_normal(centroids.shape[1]))
        counts[biggest] -= counts[biggest] // 2
        counts[empty] = counts[biggest]
    return centroids


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` scaled to unit length, float32 (a zero row stays zero)."""
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def nearest_lists(x: np.ndarray, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """The `nprobe` centroids of highest inner product with each row of `x`, highest first: blocks of torch
    matrix products in `coarse_dtype()`, several times faster here than the quantizer's own search."""
    dtype = coarse_dtype()
    lists = np.empty((len(x), nprobe), np.int64)
    centres = torch.tensor(centroids, dtype=dtype).T
    for start in range(0, len(x), ASSIGN_BLOCK):
        sims = torch.tensor(x[start:start + ASSIGN_BLOCK], dtype=dtype) @ centres
        lists[start:start + ASSIGN_BLOCK] = torch.topk(sims, nprobe, dim=1).indices.numpy()
    return lists


def coarse_dtype() -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (AMX or AVX512-BF16: 2.5x float32's rate here), else
    float32 (emulated bf16 would be slower)."""
    native = getattr(torch.cpu, "_is_amx_tile_supported", bool)() or getattr(
        torch.cpu, "_is_avx512_bf16_supported", bool)()
    return torch.bfloat16 if native else torch.float32


def list_batched_search(index, queries: np.ndarray, k: int, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`index.search` of many queries (probing `lists`), one inverted list at a time: each list's vectors
    against every query that probes it, so the list is read once and the work is a matrix product. Each
    (query, probe) keeps its list's best `k`; the best `k` of a query's probes are its neighbours."""
    sims = np.full((lists.size, k), np.finfo(np.float32).min, np.float32)
    ids = np.full((lists.size, k), -1, np.int64)
    order = np.argsort(lists.ravel(), kind="stable")
    bounds = np.searchsorted(lists.ravel()[order], np.arange(index.nlist + 1))
    with threadpool_limits(1):  # each product is small: starting BLAS's threads for it cost 4x the product
        for number in np.flatnonzero(np.diff(bounds)):
            probes = order[bounds[number]:bounds[number + 1]]
            _search_list(index, number, queries[probes // lists.shape[1]], probes, sims, ids)
    return best_of(sims.reshape(len(queries), -1), ids.reshape(len(queries), -1), k)


def _search_list(index, number: int, asking: np.ndarray, probes: np.ndarray, sims: np.ndarray,
                 ids: np.ndarray) -> None:
    """Writes into rows `probes` of `sims`/`ids` the nearest vectors of list `number` to the queries `asking`."""
    from faiss.contrib.inspect_tools import get_invlist

    held, codes = get_invlist(index.invlists, int(number))
    if len(held):
        found = asking @ codes.view("float32").reshape(len(held), index.d).T
        top = np.argpartition(found, -ids.shape[1], axis=1)[:, -ids.shape[1]:] if len(held) > ids.shape[1] else \
            np.broadcast_to(np.arange(len(held)), found.shape)
        sims[probes, :top.shape[1]] = np.take_along_axis(found, top, 1)
        ids[probes, :top.shape[1]] = held[top]


def best_of(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` highest of each row's candidates, highest first."""
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def make_index(dim: int, sample: np.ndarray | None = None) -> FaissIndex:
    """The index dedup uses by default: exact below `EXACT_LIMIT` vectors, IVF above."""
    return FaissIndex(dim, sample)


def _floats(vectors: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _training_sample(vectors: np.ndarray, size: int) -> np.ndarray:
    """Evenly spaced rows (deterministic for a given input order), at most `size` of them."""
    if len(vectors) <= size:
        return _floats(vectors)
    picks = np.linspace(0, len(vectors) - 1, size).astype(np.int64)
    return _floats(vectors[picks])
