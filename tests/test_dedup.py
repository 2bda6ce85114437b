"""Dedup on real text with the packaged all-MiniLM-L6-v2: planted exact and near duplicates, published
rows that win without being embedded again, and survivors that do not depend on input order."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
from faiss.contrib.ivf_tools import add_preassigned, search_preassigned

from prefmill.operators.dedup import Deduper, dedup_key, vectors_of
from prefmill.operators.seeds import BUILTIN_SEEDS
from prefmill.schemas.tables import DEDUP_REMOVED, PAIR_EMBEDDINGS, PAIRS
from prefmill.serving.ann import FaissIndex, make_index, nearest_lists, spherical_kmeans

SEEDS = [json.loads(line) for line in BUILTIN_SEEDS.read_text().splitlines()]
PARAPHRASES = {  # seed index → (question, answer) written in other words: the same pair, every fact kept
    0: ("What makes the sky look blue?", "Sunlight holds every visible colour. Molecules in the air scatter short "
                                         "wavelengths much more strongly than long ones (Rayleigh scattering grows "
                                         "with the inverse fourth power of the wavelength), so blue light is spread "
                                         "over the whole sky while red and yellow light travel on more directly."),
    1: ("How come salt melts ice?", "Salt dissolved in water lowers the water's freezing point: a 10 percent salt "
                                    "solution freezes at about minus 6 degrees Celsius rather than at 0."),
}


def answer(seed: dict) -> str:
    return " ".join(seed["documents"][0].split(". ")[:2])


def pair(question: str, chosen: str, prompt_id: str, margin: float = 1.0, pair_id: str | None = None) -> dict:
    row = {name: None for name in PAIRS.names}
    row.update(pair_id=pair_id or f"pair-{prompt_id}-{abs(hash(chosen)) % 10**8}", prompt_id=prompt_id,
               prompt=[{"role": "user", "content": question}], chosen=[{"role": "assistant", "content": chosen}],
               rejected=[{"role": "assistant", "content": "I do not know."}], margin=margin, strategy="best_worst")
    return row


def originals(n: int = 20) -> list[dict]:
    return [pair(s["question"], answer(s), f"ctx-{k}", margin=1.0 + k / 100, pair_id=f"orig-{k:02d}")
            for k, s in enumerate(SEEDS[:n])]


def one_word_edit(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "really"
    return " ".join(words)


def planted() -> tuple[list[dict], dict[str, str]]:
    """Originals plus planted duplicates (lower margin, so the original survives); {planted id: original id}."""
    rows = originals()
    dups = {}
    for k in (2, 3):  # exact copies up to case and spacing, under another prompt id
        s = SEEDS[k]
        rows.append(pair("  " + s["question"].upper(), answer(s).replace(" ", "  "), f"copy-{k}", 0.5, f"exact-{k}"))
        dups[f"exact-{k}"] = f"orig-{k:02d}"
    for k in (4, 5, 6):
        rows.append(pair(SEEDS[k]["question"], one_word_edit(answer(SEEDS[k])), f"edit-{k}", 0.5, f"edit-{k}"))
        dups[f"edit-{k}"] = f"orig-{k:02d}"
    for k, (question, text) in PARAPHRASES.items():
        rows.append(pair(question, text, f"para-{k}", 0.5, f"para-{k}"))
        dups[f"para-{k}"] = f"orig-{k:02d}"
    return rows, dups


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to encode."""

    def __init__(self, embedder):
        self.inner, self.name, self.texts = embedder, embedder.name, 0

    def embed(self, texts):
        self.texts += len(texts)
        return self.inner.embed(texts)


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PAIRS)


def test_planted_exact_and_near_duplicates_are_removed_and_distinct_rows_kept(embedder):
    rows, dups = planted()
    counting = CountingEmbedder(embedder)
    result = Deduper(threshold=0.85)(table(rows), counting, make_index, run_id="r1")
    removed = {r["removed_pair_id"]: r for r in result.removed.to_pylist()}
    assert {k: r["duplicate_of"] for k, r in removed.items()} == dups
    assert {r["rule"] for k, r in removed.items() if k.startswith("exact")} == {"exact"}
    assert {r["rule"] for k, r in removed.items() if not k.startswith("exact")} == {"semantic"}
    assert all(r["similarity"] >= 0.85 and r["threshold"] == 0.85 and r["run_id"] == "r1" for r in removed.values())
    assert sorted(result.pairs.column("pair_id").to_pylist()) == [f"orig-{k:02d}" for k in range(20)]
    assert counting.texts == 2 * (len(rows) - 2)  # a prompt and a reply each; exact copies are never embedded
    assert result.num_embedded == len(rows) - 2
    assert result.removed.schema == DEDUP_REMOVED and result.embeddings.schema == PAIR_EMBEDDINGS
    assert result.embeddings.column("pair_id").to_pylist() == result.pairs.column("pair_id").to_pylist()


def test_survivors_do_not_depend_on_input_order(embedder):
    rows, _ = planted()
    # two near-identical new rows of equal margin: the smaller pair_id survives, whatever comes first
    rows += [pair("Why is the ocean salty?", "Rivers carry dissolved salts into the sea.", "tie-a", 3.0, "tie-b"),
             pair("Why is the ocean salty?", "Rivers carry dissolved salts into the sea!", "tie-b", 3.0, "tie-a")]
    reference = Deduper(threshold=0.85)(table(rows), embedder, make_index)
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        again = Deduper(threshold=0.85)(table(shuffled), embedder, make_index)
        assert again.pairs.column("pair_id") == reference.pairs.column("pair_id")
        assert again.removed.to_pylist() == reference.removed.to_pylist()
    assert {"removed_pair_id": "tie-b", "duplicate_of": "tie-a"}.items() <= next(
        r for r in reference.removed.to_pylist() if r["removed_pair_id"] == "tie-b").items()


def published_table(result, version: int) -> pa.Table:
    return result.embeddings.append_column("_version", pa.array([version] * result.embeddings.num_rows, pa.int64()))


def test_duplicates_of_published_rows_are_caught_without_embedding_the_published_rows(embedder):
    first = Deduper()(table(originals(12)), embedder, make_index, run_id="day-1")
    published = published_table(first, 7)
    new = [pair(SEEDS[3]["question"], answer(SEEDS[3]), "again-3", 9.0, "again-3"),           # exact, higher margin
           pair(SEEDS[5]["question"], one_word_edit(answer(SEEDS[5])), "edit-5", 9.0, "edit-5"),  # near
           pair(SEEDS[30]["question"], answer(SEEDS[30]), "ctx-30", 1.0, "new-30")]            # distinct
    counting = CountingEmbedder(embedder)
    result = Deduper()(table(new), counting, make_index, published=published, run_id="day-2")
    assert counting.texts == 4  # prompt and reply of the new near duplicate and the distinct row; no published row
    removed = {r["removed_pair_id"]: r for r in result.removed.to_pylist()}
    assert removed["again-3"]["duplicate_of"] == "orig-03" and removed["again-3"]["rule"] == "exact"
    assert removed["edit-5"]["duplicate_of"] == "orig-05" and removed["edit-5"]["rule"] == "semantic"
    assert {r["duplicate_of_version"] for r in removed.values()} == {7}
    assert result.pairs.column("pair_id").to_pylist() == ["new-30"]


def test_a_run_whose_pairs_are_all_published_already_embeds_nothing(embedder):
    first = Deduper()(table(originals(3)), embedder, make_index)
    counting = CountingEmbedder(embedder)
    again = Deduper()(table(originals(3)), counting, make_index, published=published_table(first, 2))
    assert counting.texts == 0 and again.pairs.num_rows == 0 and again.embeddings.num_rows == 0
    assert again.removed.column("duplicate_of_version").to_pylist() == [2, 2, 2]


def test_pairs_of_one_prompt_are_not_duplicates_of_each_other(embedder):
    s = SEEDS[0]
    siblings = [pair(s["question"], answer(s), "ctx-0", 2.0, "p-a"),
                pair(s["question"], answer(s), "ctx-0", 1.0, "p-b")]
    result = Deduper()(table(siblings), embedder, make_index)
    assert result.pairs.num_rows == 2 and result.removed.num_rows == 0


def test_published_vectors_of_another_embedder_are_refused(embedder):
    first = Deduper()(table(originals(2)), embedder, make_index)
    other = first.embeddings.set_column(3, "embedder", pa.array(["other-model"] * 2))
    with pytest.raises(ValueError, match="other-model"):
        Deduper()(table(originals(3)), embedder, make_index, published=other)


def test_dedup_key_normalises_case_and_spacing():
    a = pair("Why  is the sky BLUE?", "Rayleigh scattering.", "x")
    b = pair("why is the sky blue?", "rayleigh   scattering.", "y")
    assert dedup_key(a) == dedup_key(b) != dedup_key(pair("Why is the sky blue?", "Dust.", "z"))


def test_the_ivf_index_finds_planted_near_duplicates_like_exact_search():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6000, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:300] + 0.05 * rng.standard_normal((300, 64)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    ivf = FaissIndex(64, base, exact_limit=1000)
    assert "IVF" in type(ivf.index).__name__
    ivf.add(base)
    sims, ids = ivf.search(near, 1)
    found = ids[:, 0] == np.arange(300)
    assert found.mean() >= 0.95 and (sims[found, 0] > 0.8).all()
    assert vectors_of(pa.chunked_array([pa.array(base[:3].tolist(), pa.list_(pa.float32()))])).tolist() == \
        base[:3].tolist()


class VectorEmbedder:
    """An embedder that looks each text up in a table of given unit vectors (planted geometry, no encoder)."""

    name = "planted-vectors"

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def embed(self, texts):
        return np.stack([self.vectors[t] for t in texts])


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_vectors(n: int, dim: int = 32, flood: int = 40) -> tuple[list[dict], VectorEmbedder, dict[str, str]]:
    """`n` distinct pairs, a near copy of every tenth (lower margin), a copy of every 25th with the same prompt
    but another reply (no duplicate by pair), and a flood of `flood` near-identical pairs (more than the index's
    neighbours); {planted id: original id}."""
    rng = np.random.default_rng(0)
    prompts, replies = unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((n, dim)))
    rows = [pair(f"q{k}", f"a{k}", f"ctx-{k}", 2.0 + k / n, f"base-{k:05d}") for k in range(n)]
    texts = {f"q{k}": prompts[k] for k in range(n)} | {f"a{k}": replies[k] for k in range(n)}
    dups = {}
    for k in range(0, n, 10):
        texts[f"q{k}'"], texts[f"a{k}'"] = unit(prompts[k] + 0.04 * rng.standard_normal(dim)), unit(
            replies[k] + 0.04 * rng.standard_normal(dim))
        rows.append(pair(f"q{k}'", f"a{k}'", f"near-{k}", 1.0, f"near-{k:05d}"))
        dups[f"near-{k:05d}"] = f"base-{k:05d}"
    for k in range(5, n, 25):
        texts[f"x{k}"] = unit(rng.standard_normal(dim))
        rows.append(pair(f"q{k}", f"x{k}", f"other-{k}", 1.0, f"other-{k:05d}"))
    for j in range(flood):
        texts[f"fq{j}"], texts[f"fa{j}"] = unit(prompts[0] + 0.01 * rng.standard_normal(dim)), unit(
            replies[1] + 0.01 * rng.standard_normal(dim))
        rows.append(pair(f"fq{j}", f"fa{j}", f"flood-{j}", 0.5, f"flood-{j:02d}"))
        dups[f"flood-{j:02d}"] = "flood-00"
    del dups["flood-00"]
    return rows, VectorEmbedder(texts), dups


def greedy(rows: list[dict], embedder: VectorEmbedder, threshold: float, reply_threshold: float) -> dict[str, str]:
    """The definition, pair by pair against every kept pair, no index: {removed id: the kept pair it duplicates}."""
    kept, removed = [], {}
    for row in sorted(rows, key=lambda r: (-r["margin"], r["pair_id"])):
        p, a = embedder.vectors[row["prompt"][0]["content"]], embedder.vectors[row["chosen"][0]["content"]]
        scores = [(min(p @ kp, a @ ka), pid) for pid, ctx, kp, ka in kept if ctx != row["prompt_id"]
                  and p @ kp >= threshold and a @ ka >= reply_threshold]
        if scores:
            removed[row["pair_id"]] = max(scores)[1]
        else:
            kept.append((row["pair_id"], row["prompt_id"], p, a))
    return removed


def test_the_pass_removes_what_the_greedy_definition_removes_floods_included():
    rows, embedder, dups = planted_vectors(2000)
    result = Deduper()(table(rows), embedder, make_index)
    removed = {r["removed_pair_id"]: r["duplicate_of"] for r in result.removed.to_pylist()}
    assert removed == greedy(rows, embedder, Deduper().threshold, Deduper().reply_threshold)
    assert removed == dups  # every planted copy and flood member, nothing else (same-prompt other replies kept)


def ivf(list_batch: float):
    return lambda dim, sample: FaissIndex(dim, sample, exact_limit=1000, list_batch=list_batch)


def test_the_list_batched_search_finds_the_same_duplicates_as_the_plain_search_and_prints_nothing(capfd):
    rows, embedder, dups = planted_vectors(7000)
    capfd.readouterr()
    batched = Deduper()(table(rows), embedder, ivf(0)).removed.to_pylist()
    assert capfd.readouterr() == ("", "")
    plain = Deduper()(table(rows), embedder, ivf(float("inf"))).removed.to_pylist()
    assert batched == plain
    found = {r["removed_pair_id"]: r["duplicate_of"] for r in batched}
    assert len(found.keys() - dups.keys()) == 0 and len(found.items() & dups.items()) >= 0.95 * len(dups)


def test_add_search_returns_the_neighbours_of_faiss_own_search_over_the_same_lists():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((6000, 48)))
    x[3000:] = unit(x[:3000] + 0.05 * rng.standard_normal((3000, 48)))
    batched = FaissIndex(48, x, exact_limit=1000, list_batch=0)
    sims, ids = batched.add_search(x, 3)
    reference = batched.emptied()
    lists = nearest_lists(x, batched.centroids, batched.index.nprobe)
    add_preassigned(reference.index, x, np.ascontiguousarray(lists[:, 0]))
    plain_sims, plain_ids = search_preassigned(reference.index, x, 3, lists)  # faiss's per-query search
    assert (ids == plain_ids).mean() > 0.999 and np.allclose(sims, plain_sims, atol=1e-5)
    assert (ids[3000:, 1] == np.arange(3000)).mean() > 0.95 and len(reference) == len(batched) == 6000


def test_the_coarse_lists_are_the_float32_nearest_up_to_bf16_rounding():
    rng = np.random.default_rng(2)
    x, centroids = unit(rng.standard_normal((5000, 48))), unit(rng.standard_normal((300, 48)))
    exact = x @ centroids.T
    chosen = np.take_along_axis(exact, nearest_lists(x, centroids, 4), 1)
    assert np.abs(chosen - -np.sort(-exact, axis=1)[:, :4]).max() < 0.02  # bf16 keeps 8 significant bits
    assert (np.diff(chosen, axis=1) <= 0.02).all() and (chosen[:, 0] == exact.max(axis=1)).mean() > 0.95


def test_k_means_uses_every_list_when_many_rows_repeat_one_vector():
    """Pairs sharing a prompt (`on = prompt`) repeat one key vector: copies must not start twin lists, and a list
    left empty takes part of the biggest one."""
    rng = np.random.default_rng(4)
    repeated = np.repeat(unit(rng.standard_normal((50, 32))), 30, axis=0)
    sample = np.concatenate([repeated, unit(rng.standard_normal((1500, 32)))])
    centroids = spherical_kmeans(sample, 100)
    used = np.bincount(nearest_lists(sample, centroids, 1)[:, 0], minlength=100)
    assert len(np.unique(centroids, axis=0)) == 100 and (used > 0).all()
    assert spherical_kmeans(sample[:40], 100).shape == (100, 32)  # more lists than rows: topped up, no error


def test_without_native_bf16_the_coarse_lists_are_the_exact_float32_nearest(monkeypatch):
    rng = np.random.default_rng(2)
    x, centroids = unit(rng.standard_normal((3000, 48))), unit(rng.standard_normal((300, 48)))
    monkeypatch.setattr("prefmill.serving.ann.coarse_dtype", lambda: torch.float32)
    assert np.array_equal(nearest_lists(x, centroids, 4), np.argsort(-(x @ centroids.T), axis=1)[:, :4])


def test_k_means_gives_the_same_unit_centroids_for_the_same_sample():
    sample = unit(np.random.default_rng(3).standard_normal((3000, 32)))
    centroids = spherical_kmeans(sample, 40)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert np.array_equal(centroids, spherical_kmeans(sample, 40))
    assert not np.array_equal(centroids, spherical_kmeans(sample, 40, seed=1))


LEGACY_EMBEDDINGS = pa.schema([("pair_id", pa.string()), ("prompt_id", pa.string()), ("dedup_key", pa.string()),
                               ("embedder", pa.string()), ("vector", pa.list_(pa.float32())), ("run_id", pa.string())])


def test_a_catalog_from_before_pair_vectors_takes_new_pairs_and_dedups_against_its_old_ones(embedder, tmp_path):
    """A catalog whose `pairs_embeddings` has one vector of prompt + reply per pair (schema version 2):
    the next run's dedup computes its old pairs' vectors from their published text, and its publish adds
    the new columns to the dataset (old rows keep theirs, null in the new ones)."""
    from prefmill.flows.pipeline import dedup_pairs
    from prefmill.schemas.config import load_pipeline_config
    from prefmill.storage.catalog import Catalog

    old = table(originals(3))
    texts = [f"{r['prompt'][0]['content']}\n{r['chosen'][0]['content']}" for r in old.to_pylist()]
    legacy = pa.table({"pair_id": old["pair_id"], "prompt_id": old["prompt_id"],
                       "dedup_key": [dedup_key(r) for r in old.to_pylist()], "embedder": [embedder.name] * 3,
                       "vector": pa.array(embedder.embed(texts).tolist(), pa.list_(pa.float32())),
                       "run_id": ["old"] * 3}, schema=LEGACY_EMBEDDINGS)
    catalog = Catalog(tmp_path / "catalog")
    catalog.publish_many({"pairs": old, "pairs_embeddings": legacy}, {"run_id": "old"},
                         {"pairs": PAIRS, "pairs_embeddings": LEGACY_EMBEDDINGS})
    cfg = load_pipeline_config(None, [f'catalog="{tmp_path / "catalog"}"'])
    new = table([pair(SEEDS[1]["question"], one_word_edit(answer(SEEDS[1])), "edit-1", 5.0, "edit-1"),
                 pair(SEEDS[9]["question"], answer(SEEDS[9]), "ctx-9", 1.0, "new-9")])
    deduped = dedup_pairs.fn(cfg, catalog, new, "r2")
    [removed] = deduped.removed.to_pylist()
    assert (removed["removed_pair_id"], removed["duplicate_of"]) == ("edit-1", "orig-01")
    assert deduped.pairs.column("pair_id").to_pylist() == ["new-9"]
    catalog.publish_many({"pairs": deduped.pairs, "pairs_embeddings": deduped.embeddings,
                          "dedup_removed": deduped.removed}, {"run_id": "r2"},
                         {"pairs": PAIRS, "pairs_embeddings": PAIR_EMBEDDINGS, "dedup_removed": DEDUP_REMOVED})
    stored = {r["pair_id"]: r for r in catalog.read("pairs_embeddings").to_pylist()}
    assert stored["orig-00"]["vector"] is not None and stored["orig-00"]["prompt_vector"] is None
    assert stored["new-9"]["vector"] is None and len(stored["new-9"]["reply_vector"]) == 384
    again = dedup_pairs.fn(cfg, catalog, table([pair(SEEDS[9]["question"], answer(SEEDS[9]), "x", 1.0, "x")]), "r3")
    assert again.removed.column("duplicate_of").to_pylist() == ["new-9"]
