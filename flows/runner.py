"""`prefmill run`: validate the config, quiet the engines, run the flow with a progress bar per stage,
print the summary.

Log levels are set through the environment before vLLM, Ray or Prefect are imported (they read it at
import time, and Ray actors inherit it); `verbose` leaves every engine log on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prefmill.flows.stages import build_stages
from prefmill.schemas.config import ConfigError, PipelineConfig, load_pipeline_config

if TYPE_CHECKING:
    import pyarrow as pa

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


class PrefectApiUnreachable(Exception):
    """PREFECT_API_URL names an API that does not answer; raised before anything starts."""


class PrefectHomeUnusable(PrefectApiUnreachable):
    """PREFECT_HOME, where the temporary API keeps its database, cannot be created or written; raised before
    anything starts (a subclass so that callers that report an unreachable API report this too)."""


class PrefectApiLost(Exception):
    """The Prefect API stopped answering during the run (for longer than its client retries)."""


def configure_environment(verbose: bool) -> None:
    """Engine and orchestrator log levels (quiet unless `verbose`); never overrides what the user set."""
    for key, value in DEFAULT_ENV.items() | ({} if verbose else QUIET_ENV).items():
        os.environ.setdefault(key, value)
    # Prefect's import-time warning that it cannot create PREFECT_HOME (it creates no parents): before the
    # temporary API starts, `ensure_prefect_home` creates it with its parents or fails in one line naming it
    warnings.filterwarnings("ignore", message="Failed to create the Prefect home directory")
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        # logged while vLLM imports, before its own log level applies: Triton has no CPU backend here
        logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)


def run_command(config_path: Path | None, overrides: Sequence[str], console: Console, verbose: bool = False,
                summary_json: Path | None = None):
    """Run the pipeline for the config file + overrides and print the summary; returns the `RunResult`.
    With `summary_json`, the summary also goes to that file as JSON (written only when the run finished).
    Raises `ConfigError` before anything starts when the config is invalid."""
    cfg = load_pipeline_config(config_path, overrides)
    check_summary_path(summary_json)
    seeds = check_input_files(cfg)
    configure_environment(verbose)
    from prefmill.flows.pipeline import pipeline_flow
    from prefmill.flows.report import print_summary, summary_dict

    check_prefect_api()
    start_temporary_api()
    # a run that lost its Prefect API ends with one line saying so (below); Prefect's log of it needs no
    # traceback. Only for this command: a served deployment has no such line to replace it.
    flow_log = logging.getLogger("prefect.flow_runs")
    if not verbose:
        flow_log.addFilter(_no_traceback_for_a_lost_api)
    try:
        with stage_progress(console, cfg) as report:
            result = pipeline_flow(reporter=report)(cfg.model_dump(mode="json"))
    except Exception as exc:
        url = prefect_api_url()
        lost = api_connection_error(exc, url)
        if lost is None:
            raise
        drop_undeliverable()
        raise PrefectApiLost(lost_api_message(cfg, seeds, url, lost)) from exc
    finally:
        flow_log.removeFilter(_no_traceback_for_a_lost_api)
    print_summary(console, cfg, result)
    if summary_json is not None:
        write_json(summary_json, summary_dict(result, cfg.dataset))
    return result


def check_summary_path(path: Path | None) -> None:
    """Fail before anything starts when the summary file could not be written at the end; remove an old one,
    so a run that fails leaves no summary that a script could take for this run's."""
    if path is None:
        return
    if path.is_dir() or not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--summary-json {path}: not a file in a folder that exists and can be written")
    path.unlink(missing_ok=True)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON in `path`, through a temporary file: a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def check_prefect_api() -> None:
    """When PREFECT_API_URL names a server, fail now (in a second, before an engine starts) if it does not
    answer, rather than with the client's traceback once the flow starts."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        with get_client(sync_client=True) as client:  # entering checks the API's version
            error = client.api_healthcheck()
    except Exception as exc:  # the version check's RuntimeError("Failed to reach API …") from the real cause
        error = exc.__cause__ or exc
    if error is not None:
        raise PrefectApiUnreachable(
            f"no Prefect API answers at {url.rstrip('/')} ({type(error).__name__}: {error}); start it "
            "(prefect server start), fix PREFECT_API_URL, or unset PREFECT_API_URL to run with a temporary API")


def prefect_api_url() -> str | None:
    """The Prefect API this process talks to: PREFECT_API_URL, else the temporary API if one runs."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value().rstrip("/")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


def api_connection_error(exc: BaseException | None, url: str | None):
    """The `httpx.TransportError` (connection refused, timed out, reset) of a request to the Prefect API at
    `url` in `exc`'s chain of causes, if any. (Other clients' errors, e.g. the HTTP backend's, are not it.)"""
    import httpx

    if not url:
        return None
    api = str(httpx.URL(url)).rstrip("/") + "/"  # as httpx writes a request's URL: host lower-cased, no :80
    for error in causes(exc):
        if isinstance(error, httpx.TransportError):
            with contextlib.suppress(RuntimeError):  # an error raised outside a request has none
                if str(error.request.url).startswith(api):
                    return error
    return None


def causes(exc: BaseException | None) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    chain: list[BaseException] = []
    while exc is not None and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _no_traceback_for_a_lost_api(record: logging.LogRecord) -> bool:
    if record.exc_info and api_connection_error(record.exc_info[1], prefect_api_url()):
        record.exc_info = record.exc_text = None  # the message keeps the error's repr
    return True


def lost_api_message(cfg: PipelineConfig, seeds: pa.Table, url: str, error: Exception) -> str:
    """What happened and what to do: the flow ends by reporting to the API, so a run that lost it may have
    published already (then a re-run finds the run published) or not (then it resumes from the cache).
    `seeds`: the seed file's rows as `check_input_files` read them."""
    from prefmill.flows.pipeline import find_published, run_id, run_seeds
    from prefmill.storage.catalog import Catalog

    what = f"the Prefect API at {url} stopped answering ({type(error).__name__}: {error})"
    try:
        published = find_published(Catalog(cfg.catalog), run_id(cfg, run_seeds(cfg, seeds), ""))
    except Exception:  # e.g. a PostgreSQL catalog gone too: say what is certain
        return (f"{what}. Finished shards are in the result cache: once the API is up, run the same command "
                "again to resume (or to find the run published)")
    if published:
        return (f"{what} after this run published {cfg.dataset} version {published.get(cfg.dataset, '?')}; "
                "Prefect keeps its flow run as running. The data is complete: once the API is up, run the same "
                "command again (it finds the run published and records it)")
    return (f"{what}; nothing was published. Finished shards are in the result cache: once the API is up, "
            "run the same command again to resume")


def drop_undeliverable() -> None:
    """The API is gone: drop the events and logs still queued for it and quiet their senders. Otherwise
    Prefect tries each queued event for about 7 s when the process exits (minutes for a long run), logging
    an error for each after the run's own message."""
    for name in ("prefect.events.clients", "prefect._internal.concurrency", "EventsWorker", "APILogWorker"):
        logging.getLogger(name).disabled = True  # not a level: Prefect's internal loggers ignore theirs
    from prefect._internal.concurrency.services import _QueueServiceBase
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    # private to prefect 3.7 (pinned): every service's instances, and each one's queue
    for service in list(getattr(_QueueServiceBase, "_instances", {}).values()):
        items = getattr(service, "_queue", None)
        if not isinstance(service, (EventsWorker, APILogWorker)) or items is None:
            continue
        kept = 0
        with contextlib.suppress(queue.Empty):
            while True:
                kept += items.get_nowait() is None  # a stop signal stays, or the service never ends
                items.task_done()
        for _ in range(kept):
            items.put_nowait(None)


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
    ensure_prefect_home()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    if server.server_process is None:
        return None
    pid = server.server_process.pid
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(pid)], stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return pid


def ensure_prefect_home() -> None:
    """Create PREFECT_HOME with any missing parents (`make` points it into PREFMILL_HOME, which a fresh
    machine lacks) and check it can be written, or fail now in one line. Otherwise the temporary API cannot
    open its database and Prefect retries for its whole startup timeout (180 s) printing tracebacks."""
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    try:
        home.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=home).close()
    except OSError as exc:
        raise PrefectHomeUnusable(
            f"PREFECT_HOME={home} cannot be created or written ({exc.strerror or exc}); set PREFECT_HOME to a "
            "folder you can write (the temporary Prefect API keeps its database there)") from None


def check_input_files(cfg: PipelineConfig) -> pa.Table:
    """Read the seed and follow-up files before Prefect or an engine starts, so a bad one fails in a second
    with its `SeedFileError` / `FollowUpFileError` instead of after the flow is up. Returns the seeds."""
    from prefmill.operators.flr import DEFAULT_FOLLOWUPS, load_followups
    from prefmill.operators.seeds import BUILTIN_SEEDS, load_seeds

    seeds = load_seeds(Path(cfg.seeds.path) if cfg.seeds.path else BUILTIN_SEEDS).seeds
    load_followups(cfg.flr.followups or DEFAULT_FOLLOWUPS)
    return seeds


class stage_progress:
    """One progress bar per stage, advanced as the stage's shards finish (computed or found cached)."""

    def __init__(self, console: Console, cfg: PipelineConfig):
        self.progress = Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("shards"), TimeElapsedColumn(), console=console)
        self.bars = {s.name: self.progress.add_task(s.label or s.name, total=None) for s in build_stages(cfg)}

    def __enter__(self):
        self.progress.start()
        return self.report

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def report(self, stage: str, done: int, total: int) -> None:
        self.progress.update(self.bars[stage], completed=done, total=total)
