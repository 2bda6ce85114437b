"""A `prefmill run` killed with -9 must not leave its temporary Prefect API running (found in the crash
tests: the API's uvicorn process outlived the run, one per killed run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys, time
from prefmill.flows.runner import start_temporary_api
print(start_temporary_api(), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return b"prefect.server.api.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_the_temporary_api_stops_when_the_run_is_killed(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        pid = int(run.stdout.readline())
        assert alive(pid), "the temporary API did not start"
        run.send_signal(signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 30
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive(pid), f"the temporary Prefect API (pid {pid}) outlived its killed run"
    finally:
        run.kill()
