"""`prefmill run`: validate the config, quiet the engines, run the flow with a progress bar per stage,
print the summary.

Log levels are set through the environment before vLLM, Ray or Prefect are imported (they read it at
import time, and Ray actors inherit it); `verbose` leaves every engine log on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from schemas.config import PipelineConfig, load_pipeline_config

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "RAY_DEDUP_LOGS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "TORCH_CPP_LOG_LEVEL": "ERROR",  # torch's C++ "NUMA binding: Using MEMBIND policy" warning
    "PYTHONWARNINGS": "ignore::FutureWarning",  # engine processes: torch deprecations inside vLLM
}
# the first flow run of a process starts a temporary Prefect API; on a busy 2-core machine 20 s is too short
# no telemetry from the temporary API: its heartbeat wrote to a SQLite database the run was writing to and
# printed "database is locked" tracebacks
DEFAULT_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "HF_HUB_OFFLINE": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
STAGE_LABELS = {"rollout": "self-chat + candidates", "rewards": "FLR rewards", "critiques": "critiques + revision"}


def configure_environment(verbose: bool) -> None:
    """Engine and orchestrator log levels (quiet unless `verbose`); never overrides what the user set."""
    for key, value in DEFAULT_ENV.items() | ({} if verbose else QUIET_ENV).items():
        os.environ.setdefault(key, value)
    if not verbose:
        import logging
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        # logged while vLLM imports, before its own log level applies: Triton has no CPU backend here
        logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)


def run_command(config_path: Path | None, overrides: Sequence[str], console: Console, verbose: bool = False):
    """Run the pipeline for the config file + overrides and print the summary; returns the `RunResult`.
    Raises `ConfigError` before anything starts when the config is invalid."""
    cfg = load_pipeline_config(config_path, overrides)
    check_input_files(cfg)
    configure_environment(verbose)
    from flows.pipeline import attached, pipeline
    from flows.report import print_summary

    start_temporary_api()
    with stage_progress(console, cfg) as report, attached(reporter=report):
        result = pipeline(cfg.model_dump(mode="json"))
    print_summary(console, cfg, result)
    return result


# Runs beside a temporary Prefect API: when the process that started it is gone (killed with -9, so its
# atexit never ran), stop the API instead of leaving it serving forever.
_WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(0.5)
try:
    with open(f"/proc/{server}/cmdline", "rb") as f:
        if b"prefect.server.api.server" in f.read():
            os.kill(server, signal.SIGTERM)
except OSError:
    pass
"""


def start_temporary_api() -> int | None:
    """Start Prefect's temporary API now (as the first flow run would) unless PREFECT_API_URL names a server,
    with a watchdog that stops it if this process dies without cleaning up. Returns the API's process id."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None  # a server of the user's, or none allowed: Prefect's own error says what to set
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None:
        return None
    pid = server.server_process.pid
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return pid


def check_input_files(cfg: PipelineConfig) -> None:
    """Read the seed and follow-up files before Prefect or an engine starts, so a bad one fails in a second
    with its `SeedFileError` / `FollowUpFileError` instead of after the flow is up."""
    from operators.flr import DEFAULT_FOLLOWUPS, load_followups
    from operators.seeds import BUILTIN_SEEDS, load_seeds

    load_seeds(Path(cfg.seeds.path) if cfg.seeds.path else BUILTIN_SEEDS)
    load_followups(cfg.flr.followups or DEFAULT_FOLLOWUPS)


class stage_progress:
    """One progress bar per stage, advanced as the stage's shards finish (computed or found cached)."""

    def __init__(self, console: Console, cfg: PipelineConfig):
        self.progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("shards"), TimeElapsedColumn(), console=console)
        stages = ["rollout", "rewards"] + (["critiques"] if cfg.critiques.enabled else [])
        self.bars = {s: self.progress.add_task(STAGE_LABELS[s], total=None) for s in stages}

    def __enter__(self):
        self.progress.start()
        return self.report

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def report(self, stage: str, done: int, total: int) -> None:
        self.progress.update(self.bars[stage], completed=done, total=total)
