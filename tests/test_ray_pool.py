"""The Ray actor pool: real actors, each hosting a real engine."""

from __future__ import annotations

import numpy as np
import pytest

from prefmill.serving.embedder import PoolEmbedder
from prefmill.serving.protocols import Sampling
from prefmill.serving.ray_pool import in_input_order, split_evenly

pytestmark = pytest.mark.slow


def test_pool_matches_the_in_process_engine_for_a_fixed_seed(ray_pool, engine):
    conversations = [[{"role": "user", "content": f"Give one fact about the number {i}."}] for i in range(5)]
    sampling = Sampling(n=2, seed=21, max_tokens=24, temperature=0.8)
    expected = [engine.chat([c], sampling)[0] for c in conversations]
    assert ray_pool.chat(conversations, sampling) == expected
    assert len(ray_pool.actors) == 2


def test_pool_scores_like_the_engine(ray_pool, engine):
    conversations = [[{"role": "user", "content": "What is 2+2?"}]] * 3
    continuations = [{"role": "assistant", "content": t} for t in ("4", "Four.", "It is four.")]
    got, want = ray_pool.score(conversations, continuations), engine.score(conversations, continuations)
    assert len(want) == 3 and all(want)
    for got_row, want_row in zip(got, want, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-4)


def loaded_embedders(texts, host) -> list[str]:
    """A pool step: the embedder specs the host it runs on holds."""
    return sorted(host.host._embedders)


def test_the_actors_embed_like_the_driver_in_input_order(ray_pool, embedder):
    import ray

    texts = [f"Fact {i}: river {i} flows {'north' if i % 3 else 'south'} past {i * 7} towns." for i in range(40)]
    on_actors = PoolEmbedder(ray_pool, embedder.name, chunk_size=8)  # 5 chunks, both actors at once
    vectors = on_actors.embed(texts)
    assert on_actors.name == embedder.name and vectors.shape == (40, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, embedder.embed(texts), atol=1e-5)
    held = [run.value for run in ray.get([actor.run.remote(loaded_embedders, None) for actor in ray_pool.actors])]
    assert held == [[embedder.name]] * 2  # each actor embedded a chunk, and keeps its embedder
    assert on_actors.embed([]).shape == (0, 384)


def test_split_evenly_keeps_order_and_balance():
    shards = split_evenly(list(range(7)), 3)
    assert shards == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1], [], []]


def test_results_out_of_order_are_reordered_and_gaps_raise():
    assert in_input_order([(2, "c"), (0, "a"), (1, "b")], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="missing results for inputs \\[1\\]"):
        in_input_order([(0, "a"), (2, "c")], 3)
    with pytest.raises(RuntimeError, match="duplicated result for input 0"):
        in_input_order([(0, "a"), (0, "a"), (1, "b")], 2)
