"""Soak (issue 12 B.5): N back-to-back scheduled-style runs of the pipeline flow in ONE long-lived process, as
`flow.serve` keeps one: every run gets a fresh run key (a deployment's scheduled time), so a new run id, its
own engine (opened and shut down by the run) and its own publish into the same catalog.

Every run also gets new sampling seeds, like new data each night: with the same seeds every shard after the
first run would come from the result cache and no engine would start, which is not what a soak should load.
After each run (and a `gc.collect()`) it records this process's RSS, its live Python objects, its open file
descriptors and its live child processes (the temporary Prefect API stays for the life of the process;
engine processes must not). Last line: one JSON object with `rss_growth_ratio` (RSS after the last run ÷
after the first, as issue 12 defines it), `fd_growth` (fds after the last run − after the first), and, to
tell a leak from warm-up, `rss_mib_per_run` (least-squares slope of RSS over the runs after the first two:
the first runs still import and cache things once per process) and `object_growth` (live objects, last −
second run; a leak of Python objects shows here, allocator noise does not).

    .venv/bin/python bench/soak.py [--runs 5] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = ["seeds.limit=2", "shard_size=1", "selfchat.max_turns=1", "selfchat.max_tokens_per_turn=48",
        "candidates.n=2", "candidates.max_tokens=48", "critiques.enabled=false"]


def sample() -> dict[str, float]:
    """This process's resident memory (MiB), live Python objects, open file descriptors and live child
    processes."""
    import psutil

    me = psutil.Process()
    return {"rss_mib": round(me.memory_info().rss / 2**20, 1), "objects": len(gc.get_objects()),
            "fds": len(os.listdir("/proc/self/fd")), "children": len(me.children(recursive=True))}


def slope(values: list[float]) -> float | None:
    """Least-squares change per step of `values` (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / sum((x - mean_x) ** 2 for x in range(n))


def one_run(overrides: list[str], index: int, workdir: Path) -> dict:
    """One scheduled-style run: fresh run key and sampling seeds, the shared catalog and result storage."""
    from prefmill.flows.pipeline import pipeline
    from prefmill.schemas.config import load_pipeline_config

    cfg = load_pipeline_config(None, [*TINY, f'catalog="{workdir / "catalog"}"',
                                      f'result_storage="{workdir / "results"}"', f"selfchat.seed={index}",
                                      f"candidates.seed={index}", *overrides])
    started = time.perf_counter()
    result = pipeline(cfg.model_dump(mode="json"), run_key=f"soak-{index}-{time.time_ns()}")
    gc.collect()
    return {"run": index, "run_id": result.run_id, "pairs_version": result.versions.get(cfg.dataset),
            "wall_s": round(time.perf_counter() - started, 1), **sample()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="config override key=value")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pm-soak-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefmill.flows.runner import configure_environment

    configure_environment(verbose=False)
    rows = []
    for index in range(args.runs):
        rows.append(one_run(args.overrides, index, workdir))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    settled = slope([r["rss_mib"] for r in rows[2:]])
    print(json.dumps({"runs": args.runs, **{key: [r[key] for r in rows] for key in ("rss_mib", "objects", "fds",
                                                                                     "children")},
                      "rss_growth_ratio": round(last["rss_mib"] / first["rss_mib"], 3),
                      "rss_mib_per_run": None if settled is None else round(settled, 1),
                      "object_growth": last["objects"] - rows[min(1, len(rows) - 1)]["objects"],
                      "fd_growth": last["fds"] - first["fds"], "child_growth": last["children"] - first["children"]}))


if __name__ == "__main__":
    main()
