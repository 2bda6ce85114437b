"""A scheduled deployment against a real `prefect server start` on 127.0.0.1: it exists with its cron
schedule, a triggered run publishes a pairs version, and a second run dedups against the first one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from prefmill.storage.catalog import Catalog
from tests.flow_helpers import write_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_env(tmp_path):
    """A real Prefect server with its own PREFECT_HOME; the environment that points clients at it."""
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "COLUMNS": "250"}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                               "--no-ui"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200, 180)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def wait_until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(1)
    raise TimeoutError(f"not ready after {timeout} s")


def prefmill(env, *args: str) -> str:
    out = subprocess.run([str(BIN / "prefmill"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def trigger(env, name: str) -> None:
    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"prefmill-pipeline/{name}", "--watch",
                          "--watch-timeout", "900"], env=env, capture_output=True, text=True, timeout=960)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_served_deployment_runs_on_demand_and_dedups_against_its_last_run(prefect_env, tmp_path):
    config = write_config(tmp_path, shard_size=2)  # one shard
    catalog = tmp_path / "catalog"
    served = subprocess.Popen([str(BIN / "prefmill"), "deploy", "nightly", "--cron", "0 3 * * *", "--config",
                               str(config)], env=prefect_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_until(lambda: "nightly" in prefmill(prefect_env, "deployments"), 180)
        listing = prefmill(prefect_env, "deployments")
        assert "prefmill-pipeline/nightly" in listing and "0 3 * * *" in listing

        trigger(prefect_env, "nightly")
        first = Catalog(catalog).versions("pairs")
        assert len(first) == 1 and first[0].rows_added > 0  # pairs to dedup against
        trigger(prefect_env, "nightly")
    finally:
        os.killpg(served.pid, signal.SIGTERM)
        served.wait(60)

    cat = Catalog(catalog)
    assert len(cat.versions("pairs")) == 2  # the second scheduled run is a new run, published again
    runs = {v.lineage["run_id"] for v in cat.versions("pairs")}
    assert len(runs) == 2
    removed = cat.read("dedup_removed", cat.versions("dedup_removed")[-1].version).to_pylist()
    second_run = cat.versions("pairs")[-1].lineage["run_id"]
    removed = [r for r in removed if r["run_id"] == second_run]
    # same config and seeds: every pair of the second run repeats one the first run published
    assert len(removed) == first[0].rows_added
    assert all(r["duplicate_of_version"] == first[0].version for r in removed)
    assert cat.read("pairs").num_rows == first[0].rows_added
