"""Deduplicating preference pairs, exact then semantic, incrementally against every published pair.

What a duplicate is (`on`): with `"pair"` (the default), two pairs are duplicates when their prompts are
similar (cosine ≥ `threshold`) *and* their chosen replies are (≥ `reply_threshold`: an edited or reordered
reply sits lower than a reworded prompt); with `"prompt"`, when their prompts are, whatever they answer.
The prompt and the reply are embedded separately, each within the encoder's window: embedded as one text,
a long user turn pushed the reply out of the window (pairs with the same long prompt and different replies
came out at cosine 1.0), and a shared question made pairs with contradicting answers look alike.

1. Exact: a hash of the normalised prompt + chosen text (`dedup_key`), before any embedding: a new pair
   whose key is already published, or belongs to an earlier new pair of another prompt, is removed.
2. Semantic: the survivors' prompts and replies are embedded (only theirs: published pairs keep the
   vectors stored with them) and looked up, all in one search, in a nearest-neighbour index that holds the
   published pairs and the new ones; a new pair counts only its published and earlier kept neighbours. The
   index key is the prompt vector (`"prompt"`) or prompt and reply vectors side by side, scaled to unit
   length (`"pair"`: its cosine is the mean of the two, so every pair with both at or above the threshold
   is among its nearest neighbours); each hit is then checked part by part. A published pair always wins:
   it is already in someone's training set.

New pairs are visited in one canonical order — highest margin first, then smallest `pair_id` — so the
survivors are the same whatever order they arrived in. Pairs of the same prompt (a strategy may mine
several comparisons of one context) are never duplicates of each other. Every removal is a
`dedup_removed` row: which pair, the pair it duplicates (and that pair's version when published), the
prompt and reply similarities, the rule, what counted (`on`) and the threshold.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa

from prefmill.schemas.config import DedupOn, DedupSection
from prefmill.schemas.tables import DEDUP_REMOVED, PAIR_EMBEDDINGS, PAIRS
from prefmill.serving.protocols import Embedder

DEDUP_ON: tuple[str, ...] = DedupOn.__args__


class VectorIndex(Protocol):
    """Inner-product nearest neighbours over L2-normalised vectors; ids are insertion positions."""

    def add(self, vectors: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, ids), each (len(queries), k), best first; id -1 where fewer than k exist."""
        ...

    def add_search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`add(vectors)`, then `search(vectors, k)` (each finds itself too), in one go for speed."""
        ...

    def emptied(self) -> VectorIndex:
        """An empty index built like this one, whose searches probe the same way."""
        ...


IndexFactory = Callable[..., VectorIndex]


@dataclass(frozen=True)
class DedupResult:
    pairs: pa.Table
    embeddings: pa.Table
    removed: pa.Table
    num_embedded: int


@dataclass(frozen=True)
class PairVectors:
    """Unit prompt and reply vectors of some pairs, row for row."""

    prompt: np.ndarray
    reply: np.ndarray

    def key(self, on: str) -> np.ndarray:
        """What the index holds: the prompt vector, or both side by side at unit length."""
        return self.prompt if on == "prompt" else np.hstack([self.prompt, self.reply]) / np.float32(np.sqrt(2))

    def take(self, rows: list[int] | np.ndarray) -> PairVectors:
        return PairVectors(self.prompt[rows], self.reply[rows])

    @classmethod
    def empty(cls, dim: int = 0) -> PairVectors:
        return cls(np.zeros((0, dim), np.float32), np.zeros((0, dim), np.float32))


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


# sources whose chosen side is the seed's gold answer in every round (SPIN): their own reply is what tells
# one pair from another, so two rounds on one question are not duplicates
GOLD_CHOSEN_SOURCES = ("spin",)


def compared_side(pair: dict) -> list[dict]:
    """The reply a duplicate must repeat: the chosen one, or the rejected own reply of a gold-chosen source."""
    return pair["rejected"] if pair.get("source") in GOLD_CHOSEN_SOURCES else pair["chosen"]


def dedup_key(pair: dict) -> str:
    """The exact-duplicate key: a hash of the normalised prompt and compared reply."""
    parts = [f"{m['role']}:{normalise(m['content'])}" for m in pair["prompt"] + compared_side(pair)]
    return hashlib.sha256("\x1e".join(parts).encode()).hexdigest()[:32]


def prompt_text(pair: dict) -> str:
    """The prompt as embedded: its user turns, latest first (the encoder reads only its first few hundred
    tokens, and the latest turn is what the reply answers)."""
    return "\n".join(m["content"] for m in reversed(pair["prompt"]) if m["role"] == "user")


def reply_text(pair: dict) -> str:
    """The reply as embedded: the compared reply, after the assistant turns that end the prompt (a Step-DPO
    prompt's correct steps so far, which the step continues)."""
    turns = pair["prompt"]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    return "\n".join(m["content"] for m in turns[last_user + 1:] + compared_side(pair))


def embed_pairs(rows: list[dict], embedder: Embedder) -> PairVectors:
    """Prompt and reply vectors of `rows`, in one call to the encoder."""
    vectors = np.asarray(embedder.embed([prompt_text(r) for r in rows] + [reply_text(r) for r in rows]), np.float32)
    return PairVectors(vectors[:len(rows)], vectors[len(rows):])


_DEFAULTS = DedupSection()  # the config section holds every default: one definition


@dataclass(frozen=True)
class Deduper:
    """`__call__(pairs, embedder, index_factory, published=None, run_id=None)` → `DedupResult`.

    `published`: the target dataset's stored `pair_embeddings` rows (latest version), with an int64
    `_version` column when known. `index_factory(dim, sample)` builds the nearest-neighbour index.
    """

    threshold: float = _DEFAULTS.threshold
    reply_threshold: float = _DEFAULTS.reply_threshold
    neighbors: int = _DEFAULTS.neighbors
    on: DedupOn = _DEFAULTS.on

    def __post_init__(self):
        if not (0.0 < self.threshold <= 1.0 and 0.0 < self.reply_threshold <= 1.0):
            raise ValueError(f"dedup thresholds must be in (0, 1], got {self.threshold}, {self.reply_threshold}")
        if self.on not in DEDUP_ON:
            raise ValueError(f"dedup.on must be one of {list(DEDUP_ON)}, got {self.on!r}")

    def __call__(self, pairs: pa.Table, embedder: Embedder, index_factory: IndexFactory,
                 published: pa.Table | None = None, run_id: str | None = None) -> DedupResult:
        rows = sorted(pairs.to_pylist(), key=lambda r: (-r["margin"], r["pair_id"]))
        old = Published.of(published, embedder.name)
        keys = [dedup_key(r) for r in rows]
        removed: list[dict] = []
        todo = self._exact(rows, keys, old, removed)
        vectors = embed_pairs([rows[i] for i in todo], embedder) if todo else PairVectors.empty(old.dim)
        kept = self._semantic(rows, todo, vectors, old, index_factory, removed)
        for row in removed:
            row.update(threshold=self.threshold, reply_threshold=self.reply_threshold, embedder=embedder.name,
                       run_id=run_id, dedup_on=self.on)
        position = {i: k for k, i in enumerate(todo)}
        return DedupResult(
            pa.Table.from_pylist([rows[i] for i in kept], schema=PAIRS),
            _embeddings([rows[i] for i in kept], [keys[i] for i in kept],
                        vectors.take([position[i] for i in kept]), embedder.name, run_id),
            pa.Table.from_pylist(removed, schema=DEDUP_REMOVED),
            len(todo),
        )

    def _exact(self, rows: list[dict], keys: list[str], old: Published, removed: list[dict]) -> list[int]:
        """Indices of rows that survive the exact pass (in canonical order)."""
        first: dict[str, int] = {}
        survivors = []
        for i, (row, key) in enumerate(zip(rows, keys, strict=True)):
            if key in old.key_index:
                j = old.key_index[key]
                removed.append(_removal(row, old.pair_ids[j], old.versions[j], 1.0, 1.0, 1.0, "exact"))
            elif key in first and rows[first[key]]["prompt_id"] != row["prompt_id"]:
                removed.append(_removal(row, rows[first[key]]["pair_id"], None, 1.0, 1.0, 1.0, "exact"))
            else:
                first.setdefault(key, i)
                survivors.append(i)
        return survivors

    def _semantic(self, rows: list[dict], todo: list[int], vectors: PairVectors, old: Published,
                  index_factory: IndexFactory, removed: list[dict]) -> list[int]:
        """Greedy pass in canonical order: a row is a duplicate when a published or an earlier kept row matches
        it. One search finds every new row's neighbours among all rows (list by list at scale); the pass counts
        the published and earlier kept ones among them."""
        if not todo:
            return []
        keys, published = vectors.key(self.on), old.vectors.key(self.on)
        index = index_factory(keys.shape[1], np.concatenate([published, keys]) if len(published) else keys)
        index.add(published)
        near = Neighbours(*index.add_search(keys, self.neighbors + 1), len(published), self._key_threshold())
        kept_rows = KeptRows(index, published, keys)
        kept = np.ones(len(todo), bool)
        for at in near.to_visit():
            hits = kept_rows.hits(at, kept, self.neighbors) if near.full[at] else near.hits(at, kept, self.neighbors)
            match = self._best(rows, todo, vectors, at, hits, old)
            if match:
                removed.append(_removal(rows[todo[at]], *match))
                kept[at] = False
        return [todo[k] for k in np.flatnonzero(kept)]

    def _best(self, rows: list[dict], todo: list[int], vectors: PairVectors, at: int,
              hits: list[tuple[int, float]], old: Published) -> tuple[str, int | None, float, float, float, str] | None:
        """(duplicate_of, its version, similarity, prompt and reply similarity, rule) of the closest hit that is
        a duplicate. A hit is (ref, key similarity); ref is a new row's position in `todo`, or −1 − the
        published row's index. Both parts at or above their thresholds put the key above `_key_threshold`, so
        only those hits are checked part by part; a new row of the same prompt is no duplicate."""
        best: tuple[int, float, float] | None = None
        prompt_id = rows[todo[at]]["prompt_id"]
        for ref, key_sim in hits:
            if key_sim < self._key_threshold() or (ref >= 0 and rows[todo[ref]]["prompt_id"] == prompt_id):
                continue
            theirs, j = (old.vectors, -ref - 1) if ref < 0 else (vectors, ref)
            sims = float(vectors.prompt[at] @ theirs.prompt[j]), float(vectors.reply[at] @ theirs.reply[j])
            if self._duplicate(*sims) and (best is None or self._similarity(*sims) > self._similarity(*best[1:])):
                best = (ref, *sims)
        if best is None:
            return None
        ref, prompt_sim, reply_sim = best
        found = (old.pair_ids[-ref - 1], old.versions[-ref - 1]) if ref < 0 else (rows[todo[ref]]["pair_id"], None)
        return *found, self._similarity(prompt_sim, reply_sim), prompt_sim, reply_sim, "semantic"

    def _key_threshold(self) -> float:
        """The index key's similarity a duplicate reaches at least (the key's cosine is the parts' mean)."""
        return self.threshold if self.on == "prompt" else (self.threshold + self.reply_threshold) / 2

    def _duplicate(self, prompt_sim: float, reply_sim: float) -> bool:
        return prompt_sim >= self.threshold and (self.on == "prompt" or reply_sim >= self.reply_threshold)

    def _similarity(self, prompt_sim: float, reply_sim: float) -> float:
        """The similarity a removal reports: the prompt's (`on = "prompt"`), else the lower of the two."""
        return prompt_sim if self.on == "prompt" else min(prompt_sim, reply_sim)


class Neighbours:
    """Every new row's `k` nearest rows in the index (ids: published rows, then new rows in canonical order) and
    which of them are close enough to be checked. A row is `full` when even its last neighbour is close: more
    close rows may lie beyond it."""

    def __init__(self, sims: np.ndarray, ids: np.ndarray, published: int, threshold: float):
        own = published + np.arange(len(ids))[:, None]
        self.ids, self.sims, self.published = ids, sims, published
        self.close = (sims >= threshold) & (ids >= 0) & (ids != own)
        self.full = (sims[:, -1] >= threshold) & (ids[:, -1] >= 0)

    def to_visit(self) -> np.ndarray:
        """The rows that may be duplicates; every other row is kept."""
        return np.flatnonzero(self.close.any(axis=1) | self.full)

    def hits(self, at: int, kept: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(ref, similarity) of row `at`'s `k` nearest close rows that are published or kept before it (refs as
        in `Deduper._best`): the neighbours an index of those rows alone would return."""
        refs = [(i - self.published if i >= self.published else -i - 1, float(s))
                for i, s in zip(self.ids[at][self.close[at]], self.sims[at][self.close[at]], strict=True)]
        return [(ref, s) for ref, s in refs if ref < 0 or (ref < at and kept[ref])][:k]


class KeptRows:
    """The published rows and the rows kept so far, in an index built like the main one and filled as the pass
    goes: searched for a `full` row, whose neighbours in the main index may have missed a kept row."""

    def __init__(self, index: VectorIndex, published: np.ndarray, keys: np.ndarray):
        self.main, self.published, self.keys = index, published, keys
        self.index: VectorIndex | None = None
        self.owners: list[int] = [-j - 1 for j in range(len(published))]
        self.upto = 0

    def hits(self, at: int, kept: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(ref, similarity) of row `at`'s `k` nearest published or earlier kept rows."""
        if self.index is None:
            self.index = self.main.emptied()
            self.index.add(self.published)
        new = self.upto + np.flatnonzero(kept[self.upto:at])
        self.index.add(self.keys[new])
        self.owners += new.tolist()
        self.upto = at
        sims, ids = self.index.search(self.keys[at:at + 1], k)
        return [(self.owners[i], float(s)) for i, s in zip(ids[0], sims[0], strict=True) if i >= 0]


@dataclass(frozen=True)
class Published:
    """The published side: ids, exact keys, stored vectors and versions, read from `pair_embeddings`."""

    pair_ids: list[str]
    versions: list[int | None]
    key_index: dict[str, int]
    vectors: PairVectors

    @property
    def dim(self) -> int:
        return self.vectors.prompt.shape[1]

    @classmethod
    def of(cls, table: pa.Table | None, embedder: str) -> Published:
        if table is None or table.num_rows == 0:
            return cls([], [], {}, PairVectors.empty())
        specs = set(table.column("embedder").to_pylist())
        if specs != {embedder}:
            raise ValueError(f"published pairs were embedded with {sorted(specs)}, this run embeds with "
                             f"{embedder!r}: use the same embedder spec, or deduplicate into a new dataset")
        if not has_pair_vectors(table):
            raise ValueError("some published pairs have no prompt/reply vectors (published before pair-level "
                             "dedup): fill them with `with_pair_vectors` first")
        versions = table.column("_version").to_pylist() if "_version" in table.column_names else [None] * len(table)
        key_index: dict[str, int] = {}
        for k, key in enumerate(table.column("dedup_key").to_pylist()):
            key_index.setdefault(key, k)
        vectors = PairVectors(vectors_of(table.column("prompt_vector")), vectors_of(table.column("reply_vector")))
        return cls(table.column("pair_id").to_pylist(), versions, key_index, vectors)


def has_pair_vectors(published: pa.Table) -> bool:
    """Whether every published row has its prompt and reply vectors (rows stored before pair-level dedup
    have one vector of prompt + reply instead)."""
    names = ("prompt_vector", "reply_vector")
    return all(n in published.column_names and not published.column(n).null_count for n in names)


def with_pair_vectors(published: pa.Table, pairs: pa.Table, embedder: Embedder) -> pa.Table:
    """`published` embeddings with the prompt and reply vectors of rows stored before they existed (one
    vector of prompt + reply per pair) computed from those pairs' published text."""
    for name in ("prompt_vector", "reply_vector"):
        if name not in published.column_names:
            published = published.append_column(name, pa.nulls(len(published), pa.list_(pa.float32())))
    missing = [k for k, v in enumerate(published.column("prompt_vector").to_pylist()) if v is None]
    if not missing:
        return published
    by_id = {r["pair_id"]: r for r in pairs.to_pylist()}
    vectors = embed_pairs([by_id[published.column("pair_id")[k].as_py()] for k in missing], embedder)
    for name, new in (("prompt_vector", vectors.prompt), ("reply_vector", vectors.reply)):
        column = published.column(name).to_pylist()
        for k, vector in zip(missing, new.tolist(), strict=True):
            column[k] = vector
        published = published.set_column(published.schema.get_field_index(name), name,
                                          pa.array(column, pa.list_(pa.float32())))
    return published


def vectors_of(column: pa.ChunkedArray) -> np.ndarray:
    """A list<float32> column as one (rows, dim) float32 array, without a Python loop."""
    flat = column.combine_chunks()
    values = np.asarray(flat.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return values.reshape(len(flat), -1) if len(flat) else np.zeros((0, 0), dtype=np.float32)


def _vector_column(vectors: np.ndarray) -> pa.Array:
    if not len(vectors):
        return pa.array([], pa.list_(pa.float32()))
    flat = pa.array(vectors.reshape(-1), pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]).cast(pa.list_(pa.float32()))


def _embeddings(rows: list[dict], keys: list[str], vectors: PairVectors, embedder: str, run_id: str | None
                ) -> pa.Table:
    return pa.table({"pair_id": [r["pair_id"] for r in rows], "prompt_id": [r["prompt_id"] for r in rows],
                     "dedup_key": keys, "embedder": [embedder] * len(rows),
                     "prompt_vector": _vector_column(vectors.prompt), "reply_vector": _vector_column(vectors.reply),
                     "run_id": [run_id] * len(rows)}, schema=PAIR_EMBEDDINGS)


def _removal(row: dict, duplicate_of: str, version: int | None, similarity: float, prompt_similarity: float,
             reply_similarity: float, rule: str) -> dict:
    return {"removed_pair_id": row["pair_id"], "duplicate_of": duplicate_of, "duplicate_of_version": version,
            "similarity": similarity, "prompt_similarity": prompt_similarity, "reply_similarity": reply_similarity,
            "rule": rule}
