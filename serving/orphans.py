"""Engine processes that end with the process that owns them.

vLLM runs its engine core and workers as processes of their own (and multiprocessing adds a resource
tracker). When their owner is SIGKILLed (the OOM killer, `kill -9`), no atexit handler runs: they lived on,
holding the model and its KV cache (on a GPU, the memory the next run's engine needs). vLLM starts them
itself, so no parent-death signal can be set in them. Instead a small watchdog process, started just before
an engine, notes every process its owner starts while it watches and ends them once the owner is gone.

Run as `python -m serving.orphans OWNER_PID [PID …]` (the owner's processes to leave alone) by
`OrphanWatchdog`; it imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import weakref

import psutil

POLL_S = 0.5  # how often the watchdog checks its owner and looks for the owner's new processes
GRACE_S = 5.0  # how long a resource tracker may take to clean up and exit by itself


class OrphanWatchdog:
    """Ends the processes this process starts from now on if this process dies without ending them. One per
    engine, created before the engine starts (a kill during its start is covered); `stop()` when the engine
    is shut down, so a long-lived process that opens many engines keeps no watchdog per closed one."""

    def __init__(self) -> None:
        owner = os.getpid()
        before = [str(p.pid) for p in psutil.Process(owner).children(recursive=True)]
        # a session of its own: Ctrl-C in a terminal (SIGINT to the whole foreground group) must not end it
        process = subprocess.Popen([sys.executable, "-m", __name__, str(owner), *before], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.pid = process.pid
        self._retire = weakref.finalize(self, _retire, process, owner)  # also when garbage or at a normal exit

    def stop(self) -> None:
        """The owner has ended the engine's processes itself: end the watchdog (idempotent)."""
        self._retire()


def _retire(process: subprocess.Popen, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child that inherited the finalizer
        process.terminate()
        process.wait()


def watch(owner: int, before: set[int]) -> None:
    """While `owner` lives (it is this process's parent), note its descendants that are not in `before`; once
    it is gone, end them."""
    me, seen = os.getpid(), {}
    while os.getppid() == owner:
        seen = {p.pid: p for p in seen.values() if p.is_running()}
        seen |= {p.pid: p for p in descendants(owner) if p.pid not in before | {me} and p.pid not in seen}
        time.sleep(POLL_S)
    end(list(seen.values()))


def descendants(pid: int) -> list[psutil.Process]:
    """`pid`'s children, theirs, and so on; none once it is gone."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def end(processes: list[psutil.Process]) -> None:
    """SIGKILL the processes now: their owner is gone, so nothing is left for them to finish (vLLM's engine
    would otherwise wait for its requests to drain). Resource trackers are spared at first: each exits by
    itself once the processes holding its pipe are gone, unlinking the shared memory they left; any still
    running `GRACE_S` later is killed too."""
    trackers = [p for p in processes if is_resource_tracker(p)]
    kill([p for p in processes if p not in trackers])
    kill(psutil.wait_procs(trackers, timeout=GRACE_S)[1])


def kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):  # gone already, or its pid reused: not ours to signal
            process.kill()


def is_resource_tracker(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return any("multiprocessing.resource_tracker" in arg for arg in process.cmdline())
    return False


if __name__ == "__main__":
    watch(int(sys.argv[1]), {int(pid) for pid in sys.argv[2:]})
