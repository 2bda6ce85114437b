"""The Prefect API restarting during a run (issue 12 B.2): a real `prefect server start` on 127.0.0.1 is
SIGKILLed while a `prefmill run` against it is between shards, and started again on the same port and
database. The run either finishes and publishes, or fails with a clear error and the re-run resumes from
the result cache; either way the pairs are published exactly once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage.catalog import Catalog
from tests.test_crash import REPO, prefmill_run, write_config
from tests.test_flow_deploy import BIN, free_port, wait_until

pytestmark = pytest.mark.slow
DRIVER = "import sys; from tests.test_api_restart import hold; hold(sys.argv[1]); from flows.cli import app; " \
         "app(sys.argv[2:], prog_name='prefmill')"


def hold(marks: str) -> None:
    """In the run's process: once the first rollout shard's result is back, say so (`marks/holding`) and
    wait for `marks/go`, so the server dies while this run is between shards."""
    from flows.runner import stage_progress

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


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(60)


def test_a_run_outlives_a_prefect_api_restart_or_resumes_and_publishes_once(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL":
           f"http://127.0.0.1:{free_port()}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    config, marks = write_config(tmp_path / "run"), tmp_path / "marks"
    marks.mkdir()
    server = start_server(env)
    log = open(tmp_path / "run.log", "w+")
    run = subprocess.Popen([sys.executable, "-c", DRIVER, str(marks), "run", str(config)], cwd=REPO, env=env,
                           stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_until(lambda: (marks / "holding").exists() or run.poll() is not None, 600)
        assert run.poll() is None, (tmp_path / "run.log").read_text()[-4000:]
        stop(server, signal.SIGKILL)  # no clean shutdown; its database stays as it was
        (marks / "go").touch()  # the run goes on while the API is down
        down = time.monotonic()
        server = start_server(env)  # same port, same PREFECT_HOME (database)
        print(f"API down for {time.monotonic() - down:.1f} s")
        code = run.wait(600)
        runs = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", json={}, timeout=10).json()
        tasks = httpx.post(f"{env['PREFECT_API_URL']}/task_runs/filter", json={}, timeout=10).json()
    finally:
        stop(run, signal.SIGKILL) if run.poll() is None else None
        stop(server)
    log.seek(0)
    first = log.read()
    print(f"first run exit {code}:\n{first[-3000:]}")
    print("API after the run:", [r["state_type"] for r in runs], sorted((t["name"], t["state_type"]) for t in tasks))
    catalog = Catalog(tmp_path / "run" / "catalog")
    if code == 0:  # the restarted API knows the run finished (task states sent while it was down arrive later)
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    else:
        assert "Traceback" not in first.splitlines()[-1]  # a clear error line, not a bare traceback end
        server = start_server(env)
        try:
            stages = prefmill_run(env, config)
        finally:
            stop(server)
        print(f"re-run stages (shards, cached, requests): {stages}")
        assert stages["rollout"][1] >= 1  # the shard finished before the restart is served from the cache
    versions = catalog.versions("pairs")
    assert len(versions) == 1 and len({v.lineage["run_id"] for v in versions}) == 1
