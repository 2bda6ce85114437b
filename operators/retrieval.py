"""Evidence retrieval over a local document collection: BM25 keyword search, or embedding search through
an `Embedder` (the serving layer's sentence-transformers model). No web calls."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from prefmill.serving.protocols import Embedder

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an and are as at be by for from has have in is it its of on or that the this to was were "
                  "with which who what when where why how".split())


def tokens(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def load_documents(folder: Path | str) -> list[str]:
    """Every .txt/.md file in `folder` (recursively), one document per blank-line-separated passage."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"document folder {folder} does not exist")
    docs = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in {".txt", ".md"}:
            docs += [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return docs


@dataclass
class DocumentIndex:
    """Top-k passages for a query: BM25 by default, cosine similarity when given an embedder."""

    documents: Sequence[str]
    embedder: Embedder | None = None
    k1: float = 1.5
    b: float = 0.75
    _terms: list[Counter] = field(init=False, repr=False)
    _df: Counter = field(init=False, repr=False)
    _vectors: object = field(init=False, default=None, repr=False)

    def __post_init__(self):
        self._terms = [Counter(tokens(d)) for d in self.documents]
        self._df = Counter(t for terms in self._terms for t in terms)
        self._avg_len = sum(sum(t.values()) for t in self._terms) / max(len(self._terms), 1)
        if self.embedder is not None and self.documents:
            self._vectors = self.embedder.embed(list(self.documents))

    def search(self, query: str, k: int = 2) -> list[str]:
        if not self.documents:
            return []
        scores = self._embedding_scores(query) if self._vectors is not None else self._bm25(query)
        ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [self.documents[i] for i in ranked[:k] if scores[i] > 0]

    def _bm25(self, query: str) -> list[float]:
        n = len(self.documents)
        out = []
        for terms in self._terms:
            length = sum(terms.values())
            score = 0.0
            for t in set(tokens(query)):
                if t in terms:
                    idf = math.log(1 + (n - self._df[t] + 0.5) / (self._df[t] + 0.5))
                    tf = terms[t]
                    score += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * length / self._avg_len))
            out.append(score)
        return out

    def _embedding_scores(self, query: str) -> list[float]:
        vector = self.embedder.embed([query])[0]
        return [float(v @ vector) for v in self._vectors]
