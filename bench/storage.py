"""Storage bench: publish into the DuckLake catalog vs. a plain `pyarrow.parquet.write_table` of the same table.

- 1M preference pairs and 200k × 384-d float32 embeddings: publish (A) and write_table (B) alternate
  (A B, then B A, …) over `--repeats` rounds into a warm catalog; reports the median ratio A/B and its spread.
- read-back of 1M × 384-d vectors (`Catalog.read(columns=["reply_vector"])`) next to pyarrow reading the same files,
  and of 1M+ pair ids with their publish version (`with_version=True`).
- a filtered count at each of 10 versions.
Last line of stdout: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefmill.schemas.tables import MESSAGE, PAIR_EMBEDDINGS, PAIRS  # noqa: E402
from prefmill.storage.catalog import Catalog  # noqa: E402

PAIRS_ROWS = 1_000_000
EMBEDDING_ROWS, DIM = 200_000, 384
WORDS = "the model answers the question with care and cites the source passage where it can".split()


def texts(count: int, length: int) -> pa.Array:
    return pa.array([" ".join(WORDS[(k + j) % len(WORDS)] for j in range(length)) for k in range(count)])


def messages(role: str, pool: pa.Array, n: int, shift: int = 0) -> pa.Array:
    """n one-message conversations, contents drawn from `pool` (realistic sizes, few distinct values)."""
    content = pool.take(pa.array((np.arange(n) + shift) % len(pool)))
    struct = pa.StructArray.from_arrays([pa.array([role] * n), content], fields=list(MESSAGE))
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), struct)


def pair_table(n: int, offset: int = 0) -> pa.Table:
    """n synthetic pairs of schema PAIRS: a ~60-word prompt, ~120-word replies, scores, ids."""
    ids = pa.array([f"pair-{offset + i}" for i in range(n)])
    score = pa.array(((np.arange(n) + offset) * 7919 % 1000) / 1000)
    prompts, replies = texts(97, 60), texts(89, 120)
    columns = {
        "pair_id": ids, "prompt_id": pa.array([f"ctx-{i // 8}" for i in range(n)]),
        "prompt": messages("user", prompts, n), "chosen": messages("assistant", replies, n),
        "rejected": messages("assistant", replies, n, shift=7), "chosen_candidate_id": ids,
        "rejected_candidate_id": ids, "score_chosen": score, "score_rejected": pa.array(np.zeros(n)),
        "margin": score, "num_candidates": pa.array(np.full(n, 8, dtype=np.int32)),
        "strategy": pa.array(["best_worst"] * n), "seed_id": pa.array([f"seed-{i % 50}" for i in range(n)]),
        "policy_model": pa.array(["smollm2-135m"] * n), "run_id": pa.array(["bench"] * n),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in PAIRS}, schema=PAIRS)


def embedding_table(n: int, offset: int = 0) -> pa.Table:
    """n rows of PAIR_EMBEDDINGS with random unit-norm float32 vectors of DIM dimensions."""
    vectors = np.random.default_rng(offset).standard_normal((n, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = pa.array([f"pair-{offset + i}" for i in range(n)])
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * DIM + 1, DIM, dtype=np.int32)), vectors.ravel())
    return pa.table({"pair_id": ids, "prompt_id": ids, "dedup_key": ids, "embedder": pa.array(["minilm"] * n),
                     "prompt_vector": column, "reply_vector": column, "run_id": pa.array(["bench"] * n)},
                    schema=PAIR_EMBEDDINGS)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all its threads): on a shared machine the CPU figure
    moves far less with other people's load than the wall figure."""
    cpu = time.process_time()
    wall = timed(fn)
    return wall, time.process_time() - cpu


def side_by_side(publish: Callable[[int], object], write: Callable[[int], object], repeats: int) -> dict[str, float]:
    """Alternate A (publish) and B (write_table) — A B, then B A, … — and summarise the ratio A/B per round."""
    rounds = []
    for k in range(repeats):
        if k % 2 == 0:
            a, b = clocked(lambda: publish(k)), clocked(lambda: write(k))
        else:
            b, a = clocked(lambda: write(k)), clocked(lambda: publish(k))
        rounds.append((a, b))
        print(f"  round {k + 1}: publish {a[0]:.2f}s (cpu {a[1]:.2f}s), write_table {b[0]:.2f}s (cpu {b[1]:.2f}s), "
              f"ratio {a[0] / b[0]:.2f} (cpu {a[1] / b[1]:.2f})", flush=True)
    ratios, cpu_ratios = [a[0] / b[0] for a, b in rounds], [a[1] / b[1] for a, b in rounds]
    return {"publish_s": round(statistics.median(a[0] for a, _ in rounds), 3),
            "pyarrow_write_s": round(statistics.median(b[0] for _, b in rounds), 3),
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
            "cpu_ratio": round(statistics.median(cpu_ratios), 3),
            "cpu_ratio_min": round(min(cpu_ratios), 3), "cpu_ratio_max": round(max(cpu_ratios), 3)}


def bench_publish(catalog: Catalog, scratch: Path, tables: list[pa.Table], schema: pa.Schema,
                  repeats: int) -> dict[str, float]:
    """Round k publishes `tables[k % len(tables)]` and writes the same table with pyarrow (then deletes it)."""
    name = schema.metadata[b"prefmill.schema"].decode()
    print(f"{name}: {tables[0].num_rows} rows × {repeats} rounds", flush=True)

    def publish(k: int) -> None:
        catalog.publish(tables[k % len(tables)], name, {"run_id": f"bench-{k}"}, schema=schema)

    def write(k: int) -> None:
        path = scratch / f"{name}-{k}.parquet"
        pq.write_table(tables[k % len(tables)], path)
        path.unlink()

    return side_by_side(publish, write, repeats)


def bench_reads(catalog: Catalog) -> dict[str, float]:
    """Read back every vector, next to pyarrow reading the same Parquet files; then pair ids with versions."""
    files = sorted(str(p) for p in (catalog.data_path / "main" / "pair_embeddings").glob("*.parquet"))
    rows = catalog.versions("pair_embeddings")[-1].row_count
    read = clocked(lambda: catalog.read("pair_embeddings", columns=["reply_vector"]))
    pyarrow_read = clocked(lambda: pq.read_table(files, columns=["reply_vector"]))
    ids = catalog.versions("pairs")[-1].row_count
    with_version = clocked(lambda: catalog.read("pairs", columns=["pair_id"], with_version=True))
    print(f"read {rows} x {DIM} vectors: {read[0]:.2f}s, cpu {read[1]:.2f}s (pyarrow on the same files: "
          f"{pyarrow_read[0]:.2f}s, cpu {pyarrow_read[1]:.2f}s); {ids} pair ids with _version: {with_version[0]:.2f}s, "
          f"cpu {with_version[1]:.2f}s", flush=True)
    return {"vector_rows": rows, "vector_read_s": round(read[0], 3), "vector_read_cpu_s": round(read[1], 3),
            "vector_read_pyarrow_s": round(pyarrow_read[0], 3), "vector_read_pyarrow_cpu_s": round(pyarrow_read[1], 3),
            "with_version_rows": ids, "with_version_read_s": round(with_version[0], 3),
            "with_version_read_cpu_s": round(with_version[1], 3)}


def bench_versions(catalog: Catalog) -> dict[str, float]:
    """Nine small publishes, then a filtered count at each of the dataset's versions."""
    for k in range(1, 10):
        catalog.publish(pair_table(10_000, offset=10 * PAIRS_ROWS + k * 10_000), "pairs", {"run_id": f"v{k}"})
    versions = [v.version for v in catalog.versions("pairs")][-10:]
    query = "SELECT count(*) FROM pairs AT (VERSION => {v}) WHERE margin > 0.5 AND seed_id = 'seed-7'"
    count_s, cpu_s = clocked(lambda: [catalog.sql(query.format(v=v)) for v in versions])
    print(f"filtered count at {len(versions)} versions: {count_s:.2f}s, cpu {cpu_s:.2f}s", flush=True)
    return {"versions": len(versions), "filtered_count_10_versions_s": round(count_s, 3),
            "filtered_count_10_versions_cpu_s": round(cpu_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="A/B rounds per table (at least 3)")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be at least 3: a median of fewer rounds says little on a shared machine")
    pairs = [pair_table(PAIRS_ROWS)]
    embeddings = [embedding_table(EMBEDDING_ROWS, offset=k * EMBEDDING_ROWS) for k in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog(Path(tmp) / "catalog")
        cold_s = timed(lambda: catalog.publish(pair_table(10), "warmup"))
        print(f"first publish into a new catalog (creates it, loads ducklake): {cold_s:.2f}s", flush=True)
        pair_figures = bench_publish(catalog, Path(tmp), pairs, PAIRS, args.repeats)
        embedding_figures = bench_publish(catalog, Path(tmp), embeddings, PAIR_EMBEDDINGS, args.repeats)
        for k in range(args.repeats, len(embeddings)):  # top up to 1M vectors for the read-back
            catalog.publish(embeddings[k], "pair_embeddings", {"run_id": f"top-up-{k}"}, schema=PAIR_EMBEDDINGS)
        reads = bench_reads(catalog)
        counts = bench_versions(catalog)
    print(json.dumps({
        "rows": PAIRS_ROWS, "repeats": args.repeats, **pair_figures,
        "ratio_vs_pyarrow": pair_figures["ratio"],
        "ratio_vs_pyarrow_spread": [pair_figures["ratio_min"], pair_figures["ratio_max"]],
        "cpu_ratio_vs_pyarrow": pair_figures["cpu_ratio"],
        "embeddings": {"rows": EMBEDDING_ROWS, "dim": DIM, **embedding_figures},
        **reads, **counts, "cold_first_publish_s": round(cold_s, 3),
    }))


if __name__ == "__main__":
    main()
