"""Crash/resume (issue 12 B.1): `prefmill run` SIGKILLed at four points, then the same command again.

Each killed run is a real `prefmill run` process (the CLI's own `app`, started by `DRIVER`) in which one
function is wrapped so the process SIGKILLs itself at the point (`arm`): no `finally`, no atexit, no engine
shutdown runs. The points:

- `selfchat`: in the flow's loop over finished shards, right after the first rollout shard's result came
  back from its Prefect task (persisted), while the other shard is queued or running.
- `scoring`: the same after the first FLR reward shard.
- `dedup`: inside dedup, when the embedder has embedded the run's pairs and before dedup returns.
- `publish`: inside the catalog's publish transaction, at its COMMIT: the Parquet files are written and
  registered, the lineage rows inserted, and nothing committed.

After each kill, every process the killed run had started (its engine's core and worker, multiprocessing's
resource tracker, the temporary Prefect API, the watchdogs) ends within 20 s (issue 18 C.1; at `selfchat`
and `scoring` the engine is live). `prefmill sql` and `Catalog.datasets()` show no pairs version; the re-run
finishes, its finished LLM shards come from the result cache (counted in engine requests in the run
summary), and the published pairs equal an uninterrupted run's (same config, another catalog) by content
hash.

The uninterrupted run (`reference`) runs once per module. The `dedup` and `publish` points are past every
LLM stage, so their runs start from a copy of the reference's result cache: the killed run loads no model
and goes straight to the point, and the re-run must still find every shard cached and send no engine
request. That a shard finished by a process that is then SIGKILLed is found by the re-run is what the
`selfchat` and `scoring` points show: they start from an empty cache and compute their shards themselves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest

from prefmill.storage.catalog import Catalog
from tests.flow_helpers import write_config
from tests.test_orphans import all_end

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POINTS = ["selfchat", "scoring", "dedup", "publish"]
DRIVER = "import sys; from tests.test_crash import arm; arm(sys.argv[1]); from prefmill.flows.cli import app; " \
         "app(sys.argv[2:], prog_name='prefmill')"
# kill points past the LLM stages: their runs start from a copy of the reference's result cache
AFTER_LLM = {"dedup", "publish"}
# shards a re-run must find finished, by kill point (default: all of the stage's shards)
MIN_CACHED = {"selfchat": {"rollout": 1, "rewards": 0}, "scoring": {"rollout": 1, "rewards": 1}, "dedup": {},
              "publish": {}}
# the file where a killed run notes the processes it started (in its environment)
CHILDREN_ENV = "PREFMILL_TEST_CHILDREN"


def die() -> None:
    """kill -9 of this process: nothing is cleaned up. Notes its descendants first (in the file that
    `CHILDREN_ENV` names), so the test can check that none outlives it."""
    noted = [[p.pid, p.create_time(), p.name()] for p in psutil.Process().children(recursive=True)]
    Path(os.environ[CHILDREN_ENV]).write_text(json.dumps(noted))
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Make this process SIGKILL itself at `point` (run in the killed `prefmill run` before the CLI starts)."""
    {"selfchat": lambda: _after_first_shard("rollout"), "scoring": lambda: _after_first_shard("rewards"),
     "dedup": _after_embedding, "publish": _at_commit}[point]()


def _after_first_shard(stage: str) -> None:
    from prefmill.flows.runner import stage_progress

    report = stage_progress.report  # called by the flow as each shard's task result arrives

    def killing(self, name: str, done: int, total: int) -> None:
        report(self, name, done, total)
        if name == stage:
            die()

    stage_progress.report = killing


def _after_embedding() -> None:
    from prefmill.serving.embedder import SentenceTransformerEmbedder

    embed = SentenceTransformerEmbedder.embed

    def killing(self, texts):
        vectors = embed(self, texts)
        if len(texts):
            die()
        return vectors

    SentenceTransformerEmbedder.embed = killing


class _DieAtCommit:
    """The publish transaction's connection, except that its COMMIT kills the process."""

    def __init__(self, con):
        self._con = con

    def execute(self, query: str, *args):
        if query.strip().upper() == "COMMIT":
            die()
        return self._con.execute(query, *args)

    def __getattr__(self, name: str):
        return getattr(self._con, name)


def _at_commit() -> None:
    from prefmill.storage.catalog import Catalog

    commit = Catalog._commit

    def killing(self, con, *args):
        return commit(self, _DieAtCommit(con), *args)

    Catalog._commit = killing


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("crash-env")
    # PREFMILL_HOME stays (conftest's): the materialised model lives there; catalog and results are per config
    return {**os.environ, "PREFECT_HOME": str(home / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def run(env: dict[str, str], args: list[str], timeout: float = 600,
        after_exit: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """A process in its own session; whatever it leaves behind is SIGKILLed with its group once it exited and
    `after_exit` (which may check what is left) returned: a leftover could hold a stdout pipe open."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout)
            if after_exit is not None:
                after_exit()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        return subprocess.CompletedProcess(args, proc.returncode, log.read())


def prefmill_run(env: dict[str, str], config: Path) -> dict[str, tuple[int, int, int]]:
    """`prefmill run CONFIG`; each LLM stage's (shards, cached, engine requests) from its `--summary-json`."""
    summary = config.with_name("summary.json")
    done = run(env, [str(BIN / "prefmill"), "run", str(config), "--summary-json", str(summary)])
    assert done.returncode == 0, done.stdout[-4000:]
    return stage_counts(summary)


def stage_counts(summary: Path) -> dict[str, tuple[int, int, int]]:
    """Each LLM stage's (shards, cached, engine requests) from a run's `--summary-json` file."""
    stages = json.loads(summary.read_text())["stages"]
    assert set(stages) == {"rollout", "rewards"}, stages
    return {name: (row["shards"], row["cached"], row["requests"]) for name, row in stages.items()}


def pair_hashes(catalog: Path) -> set[str]:
    """The published pairs by content: prompt, chosen and rejected."""
    rows = Catalog(catalog).read("pairs", columns=["prompt", "chosen", "rejected"]).to_pylist()
    return {hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in rows}


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> tuple[dict[str, tuple[int, int, int]], set[str], Path]:
    """One uninterrupted run from an empty cache: its stage counts, its published pairs (some) and its
    result cache."""
    folder = tmp_path_factory.mktemp("reference")
    stages = prefmill_run(env, write_config(folder))
    pairs = pair_hashes(folder / "catalog")
    assert pairs and all(cached == 0 for _, cached, _ in stages.values()), stages
    return stages, pairs, folder / "results"


def assert_no_pairs_visible(env: dict[str, str], catalog: Path) -> None:
    sql = run(env, [str(BIN / "prefmill"), "sql", "SELECT count(*) FROM pairs", "--catalog", str(catalog)], 120)
    assert sql.returncode != 0 and ("no catalog yet" in sql.stdout or "pairs" in sql.stdout), sql.stdout
    if (catalog / "meta.ducklake").exists():
        assert Catalog(catalog).datasets() == []


@pytest.mark.parametrize("point", POINTS)
def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_pairs(point, env, reference, tmp_path):
    config = write_config(tmp_path)
    catalog = tmp_path / "catalog"
    ref_stages, ref_pairs, ref_results = reference
    if point in AFTER_LLM:  # every LLM shard already finished: straight to dedup / publish, no model loads
        shutil.copytree(ref_results, tmp_path / "results")
    noted, summary = tmp_path / "children.json", tmp_path / "summary.json"
    killed = run({**env, CHILDREN_ENV: str(noted)}, [sys.executable, "-c", DRIVER, point, "run", str(config),
                                                      "--summary-json", str(summary)],
                 after_exit=lambda: assert_all_end(noted, engine_live=point not in AFTER_LLM))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-4000:]
    assert not summary.exists()  # a summary is written only by a run that finished
    assert_no_pairs_visible(env, catalog)
    if point == "publish":  # the files were written, never committed: orphans the next publish deletes
        assert list((catalog / "data").rglob("*.parquet")) and (catalog / ".publishing").exists()

    stages = prefmill_run(env, config)
    assert pair_hashes(catalog) == ref_pairs
    assert Catalog(catalog).cleanup() == []  # no orphan left
    assert_llm_work_not_redone(point, stages, ref_stages)


def assert_all_end(noted: Path, engine_live: bool) -> None:
    """Every process the killed run noted (see `die`) ends within `test_orphans.GONE_S` of its death; with
    `engine_live`, they include vLLM's engine processes."""
    started = time.monotonic()
    rows = json.loads(noted.read_text())
    assert not engine_live or any(name.startswith("VLLM::") for _, _, name in rows), rows
    print(f"the {len(rows)} processes of the run killed with its engine {'live' if engine_live else 'unloaded'} "
          f"ended {all_end(rows) - started:.1f} s after it")


def assert_llm_work_not_redone(point: str, stages: dict, ref: dict) -> None:
    """Shards finished before the kill come from the cache and only the rest cost engine requests. The tiny
    config's shards are one seed each with the same request count, so a shard costs ref requests / shards."""
    for stage, (shards, cached, requests) in stages.items():
        ref_shards, ref_cached, ref_requests = ref[stage]
        assert (shards, ref_cached) == (ref_shards, 0)
        assert cached >= MIN_CACHED[point].get(stage, shards), (stage, cached)
        assert requests * ref_shards == ref_requests * (shards - cached), (stage, requests, ref_requests)
