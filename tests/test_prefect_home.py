"""A PREFECT_HOME that does not exist yet is created; one that cannot be fails `prefmill run` at once in one
line naming the setting (issue 18 C.2: Prefect retried its temporary API for 180 s, printing tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# were the fix gone, the old behaviour fails after this long instead of 180 s
SHORT_STARTUP = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "20"}


def without_api_url(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | SHORT_STARTUP | extra


def test_a_prefect_home_whose_parents_are_missing_is_created(tmp_path):
    home = tmp_path / "fresh" / "prefmill" / "prefect"
    script = "from prefmill.flows.runner import ensure_prefect_home; ensure_prefect_home()"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, timeout=120,
                   env=without_api_url(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT)))
    assert home.is_dir()


def test_run_with_a_prefect_home_that_cannot_be_created_fails_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    home = tmp_path / "a-file" / "prefect"  # under a regular file: not even root can create it
    started = time.monotonic()
    result = subprocess.run([str(Path(sys.executable).with_name("prefmill")), "run", "--catalog",
                             str(tmp_path / "catalog")], capture_output=True, text=True, timeout=600,
                            env=without_api_url(PREFECT_HOME=str(home), COLUMNS="250"))
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, out[-3000:]
    assert out.splitlines() == [f"error: PREFECT_HOME={home} cannot be created or written (Not a directory); set "
                                "PREFECT_HOME to a folder you can write (the temporary Prefect API keeps its "
                                "database there)"], out[-3000:]
    assert time.monotonic() - started < 60 and not (tmp_path / "catalog").exists()
