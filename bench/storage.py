"""Publish 1M preference pairs into the DuckLake catalog vs. pyarrow.parquet.write_table, side by side;
then a filtered count across 10 versions. Last line: one JSON object of the figures."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.tables import PAIRS  # noqa: E402
from storage.catalog import Catalog  # noqa: E402

ROWS = 1_000_000


def pair_table(n: int, offset: int = 0) -> pa.Table:
    """n synthetic pairs with realistic text sizes (a ~60-word prompt, ~120-word replies)."""
    words = "the model answers the question with care and cites the source passage where it can".split()
    text = lambda k, length: " ".join(words[(k + j) % len(words)] for j in range(length))  # noqa: E731
    base = [text(k, 60) for k in range(97)], [text(k, 120) for k in range(89)]
    ids = pa.array([f"pair-{offset + i}" for i in range(n)])
    msg = lambda role, texts, m: pa.array(  # noqa: E731
        [[{"role": role, "content": texts[i % m]}] for i in range(n)], PAIRS.field("prompt").type)
    score = pa.array([((offset + i) * 7919 % 1000) / 1000 for i in range(n)], pa.float64())
    return pa.Table.from_arrays([
        ids, msg("user", base[0], 97), msg("assistant", base[1], 89), msg("assistant", base[1][::-1], 89), score,
        pa.array([0.0] * n), score, ids, ids, pa.array([f"ctx-{i // 8}" for i in range(n)]),
        pa.array([f"seed-{i % 50}" for i in range(n)]), pa.array(["flr"] * n)], schema=PAIRS)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    table = pair_table(ROWS)
    with tempfile.TemporaryDirectory() as tmp:
        pyarrow_s = timed(lambda: pq.write_table(table, f"{tmp}/pairs.parquet"))
        catalog = Catalog(Path(tmp) / "catalog")
        publish_s = timed(lambda: catalog.publish(table, "pairs", {"run_id": "bench"}, schema=PAIRS))
        print(f"1M pairs: publish {publish_s:.2f}s, pyarrow write_table {pyarrow_s:.2f}s")
        for k in range(1, 10):
            catalog.publish(pair_table(10_000, offset=ROWS + k * 10_000), "pairs", {"run_id": f"v{k}"})
        versions = [v.version for v in catalog.versions("pairs")]
        query = "SELECT count(*) FROM pairs AT (VERSION => {v}) WHERE margin > 0.5 AND seed_id = 'seed-7'"
        count_s = timed(lambda: [catalog.sql(query.format(v=v)) for v in versions])
        print(f"filtered count over {len(versions)} versions: {count_s:.2f}s")
    print(json.dumps({
        "rows": ROWS, "publish_s": round(publish_s, 3), "pyarrow_write_s": round(pyarrow_s, 3),
        "ratio_vs_pyarrow": round(publish_s / pyarrow_s, 3), "versions": len(versions),
        "filtered_count_10_versions_s": round(count_s, 3),
        "rows_per_s": round(ROWS / publish_s),
    }))


if __name__ == "__main__":
    main()
