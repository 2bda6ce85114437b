"""The Prefect API restarting during a run (issue 12 B.2): a real `prefect server start` on 127.0.0.1 is
SIGKILLed while a `prefmill run` against it is between shards.

- Short outage: the server starts again on the same port and database at once. The run either finishes and
  publishes, or fails with a clear error and the re-run resumes from the result cache.
- Long outage: the server stays down until the run gives up (its Prefect client told to retry once, so it
  gives up in seconds rather than after about a minute of back-off per request). Shards and publish need
  no API (task states go out as events, results to local storage), so the run goes on to publish; the
  first request it cannot do without (the flow's artifacts, then its final state) ends it with one clear
  error line, not a traceback, saying whether it published. Once the server is back, the same command
  finds the run published (or resumes from the result cache had it not).

Either way the pairs are published exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prefmill.storage.catalog import Catalog
from tests.test_crash import REPO, run, stage_counts, write_config
from tests.test_flow_deploy import BIN, free_port, wait_until

pytestmark = pytest.mark.slow
DRIVER = "import sys; from tests.test_api_restart import hold; hold(sys.argv[1]); " \
         "from prefmill.flows.cli import app; app(sys.argv[2:], prog_name='prefmill')"
# the run's Prefect client: one retry (2 s) of a request the API does not answer, instead of 5 (about 62 s)
GIVE_UP_QUICKLY = {"PREFECT_CLIENT_MAX_RETRIES": "1", "PREFECT_CLIENT_RETRY_JITTER_FACTOR": "0"}
OUTAGE_BOUND = 300  # seconds the API stays down waiting for the run to give up


def hold(marks: str) -> None:
    """In the run's process: once the first rollout shard's result is back, say so (`marks/holding`) and
    wait for `marks/go`, so the server dies while this run is between shards."""
    from prefmill.flows.runner import stage_progress

    report, folder = stage_progress.report, Path(marks)

    def holding(self, stage: str, done: int, total: int) -> None:
        report(self, stage, done, total)
        if stage == "rollout" and done == 1:
            (folder / "holding").touch()
            deadline = time.monotonic() + 600
            while not (folder / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.2)

    stage_progress.report = holding


def start_server(env: dict[str, str]) -> subprocess.Popen:
    port = env["PREFECT_API_URL"].split(":")[-1].split("/")[0]
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", port,
                               "--no-ui"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    wait_until(lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200, 180)
    return server


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(60)


@dataclass
class HeldRun:
    """A `prefmill run` against its own Prefect server, holding after its first rollout shard."""

    env: dict[str, str]  # the server's and the re-run's: PREFECT_HOME, PREFECT_API_URL
    config: Path
    marks: Path
    log: Path
    server: subprocess.Popen | None = None
    run: subprocess.Popen | None = None

    def kill_api(self) -> None:
        stop(self.server, signal.SIGKILL)  # no clean shutdown; its database stays as it was
        self.server = None

    def start_api(self) -> None:
        self.server = start_server(self.env)  # same port, same PREFECT_HOME (database)

    def go(self) -> None:
        (self.marks / "go").touch()

    def output(self) -> str:
        return self.log.read_text()

    def rerun(self) -> str:
        """The same command again against the (restarted) server: its output; it must succeed. Its summary
        goes to `summary`."""
        if self.server is None:
            self.start_api()
        done = run(self.env, [str(BIN / "prefmill"), "run", str(self.config), "--summary-json", str(self.summary)])
        assert done.returncode == 0, done.stdout[-4000:]
        return done.stdout

    @property
    def summary(self) -> Path:
        return self.config.with_name("summary.json")

    def close(self) -> None:
        if self.run is not None and self.run.poll() is None:
            stop(self.run, signal.SIGKILL)
        stop(self.server)
        self.server = None


@pytest.fixture
def held_run(tmp_path):
    """Start a server and a run against it (the run's own environment plus `run_env`); returns once the run
    holds between shards. Stops whatever is left at the end of the test."""
    runs: list[HeldRun] = []

    def start(**run_env: str) -> HeldRun:
        env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL":
               f"http://127.0.0.1:{free_port()}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
        held = HeldRun(env, write_config(tmp_path / "run"), tmp_path / "marks", tmp_path / "run.log")
        runs.append(held)
        held.marks.mkdir()
        held.start_api()
        with open(held.log, "w") as log:
            held.run = subprocess.Popen([sys.executable, "-c", DRIVER, str(held.marks), "run", str(held.config)],
                                        cwd=REPO, env={**env, **run_env}, stdout=log, stderr=subprocess.STDOUT,
                                        text=True, start_new_session=True)
        wait_until(lambda: (held.marks / "holding").exists() or held.run.poll() is not None, 600)
        assert held.run.poll() is None, held.output()[-4000:]
        return held

    yield start
    for held in runs:
        held.close()


def pairs_versions(config: Path) -> list:
    catalog = Catalog(config.parent / "catalog")
    return catalog.versions("pairs") if catalog.exists() else []


def published_once(config: Path) -> None:
    versions = pairs_versions(config)
    assert len(versions) == 1 and len({v.lineage["run_id"] for v in versions}) == 1, versions


def test_a_run_outlives_a_prefect_api_restart_or_resumes_and_publishes_once(held_run):
    held = held_run()
    held.kill_api()
    held.go()  # the run goes on while the API is down
    down = time.monotonic()
    held.start_api()
    print(f"API down for {time.monotonic() - down:.1f} s")
    code = held.run.wait(600)
    api = held.env["PREFECT_API_URL"]
    runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
    tasks = httpx.post(f"{api}/task_runs/filter", json={}, timeout=10).json()
    first = held.output()
    print(f"first run exit {code}:\n{first[-3000:]}")
    print("API after the run:", [r["state_type"] for r in runs], sorted((t["name"], t["state_type"]) for t in tasks))
    if code == 0:  # the restarted API knows the run finished (task states sent while it was down arrive later)
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    else:
        assert first.strip().splitlines()[-1].startswith("error: "), first[-3000:]  # one clear line, no traceback
        held.rerun()
        counts = stage_counts(held.summary)
        print(f"re-run stages (shards, cached, requests): {counts}")
        assert counts["rollout"][1] >= 1  # the shard finished before the restart is served from the cache
    published_once(held.config)


def test_a_run_whose_prefect_api_stays_down_stops_clearly_and_the_same_command_then_completes(held_run):
    held = held_run(**GIVE_UP_QUICKLY)
    api = held.env["PREFECT_API_URL"]
    held.kill_api()
    held.go()  # the API stays down until the run has ended
    down = time.monotonic()
    try:
        code = held.run.wait(OUTAGE_BOUND)
    except subprocess.TimeoutExpired:
        code = None
    first = held.output()
    print(f"API down {time.monotonic() - down:.1f} s; first run exit {code}:\n{first[-3000:]}")
    assert code is not None, f"the run neither finished nor gave up in {OUTAGE_BOUND} s with the API down"
    assert code == 1, "a run whose Prefect API is gone cannot end as a finished flow run"
    last = first.strip().splitlines()[-1]
    assert last.startswith(f"error: the Prefect API at {api} stopped answering (ConnectError"), last
    assert "run the same command again" in last and "Traceback" not in first, first[-4000:]
    published = pairs_versions(held.config)
    if "after this run published" in last:  # as it goes today: shards and publish need no API
        assert [v.version for v in published] == [int(last.split(" version ")[1].split(";")[0])], published
        out = held.rerun()
        print(f"re-run:\n{out[-1500:]}")
        assert "already published" in out
        runs = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=10).json()
        assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "RUNNING"]  # as the error line says
    else:
        assert "nothing was published" in last and not published, published
        held.rerun()
        counts = stage_counts(held.summary)
        print(f"re-run stages (shards, cached, requests): {counts}")
        assert counts["rollout"][1] >= 1  # the shard finished before the API went down is served from the cache
    published_once(held.config)
