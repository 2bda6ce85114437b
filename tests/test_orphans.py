"""Processes an engine's owner started end when the owner is SIGKILLed (issue 18 C.1).

The watchdog alone, on a stand-in process tree: a child with a grandchild (vLLM's engine core and its
worker) and a multiprocessing child sharing a resource tracker. Then a real Ray pool's driver killed with a
live actor engine. The in-process engine's side is in `test_crash.py`: every process of a `prefmill run`
killed with a live engine is gone soon after.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from prefmill.serving.orphans import GRACE_S, POLL_S, OrphanWatchdog

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = "import time; time.sleep(600)"
# the owner: a process it started before the watchdog; then, as a vLLM engine does, a child with a grandchild
# (engine core and worker) and a child started by multiprocessing (spawn), which shares its resource
# tracker with a shared-memory segment registered there
OWNER = f"""
import multiprocessing, subprocess, sys, time
from multiprocessing import shared_memory
from prefmill.serving.orphans import OrphanWatchdog

if __name__ == "__main__":
    earlier = subprocess.Popen([sys.executable, "-c", {SLEEPER!r}])
    watchdog = OrphanWatchdog()
    tree = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); "
                             "time.sleep(600)", sys.executable, "-c", {SLEEPER!r}])
    segment = shared_memory.SharedMemory(create=True, size=4096)
    worker = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(600,))
    worker.start()
    print(earlier.pid, watchdog.pid, segment.name, flush=True)
    time.sleep(600)
"""
STARTED = 6  # earlier, the watchdog, tree's child and grandchild, the resource tracker, the spawned worker
# a driver with a Ray pool of one actor (its engine loaded) notes its descendants and kills itself
RAY_DRIVER = """
import json, os, signal
import psutil
from prefmill.schemas.config import EngineConfig, PoolConfig
from prefmill.serving.ray_pool import RayEnginePool

if __name__ == "__main__":
    pool = RayEnginePool(PoolConfig(actors=1, engine=EngineConfig(max_model_len=512)), log_to_driver=False)
    noted = [[p.pid, p.create_time(), p.name()] for p in psutil.Process().children(recursive=True)]
    print(json.dumps(noted), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
GONE_S = 20  # the bound after a kill, as in test_crash.py


def running(process: psutil.Process) -> bool:
    """Alive and not a zombie waiting for a parent to reap it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def still_running(processes: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    """Those of `processes` still running `seconds` from now (returns as soon as none is)."""
    deadline = time.monotonic() + seconds
    while any(running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in processes if running(p)]


def all_end(noted: list[list], seconds: float = GONE_S) -> float:
    """Every noted process ([pid, create time, name]) ends within `seconds`; returns when the last ended
    (`time.monotonic()`)."""
    processes = [p for p in (same_process(pid, created) for pid, created, _ in noted) if p]
    left = [p.as_dict(["pid", "name", "cmdline"]) for p in still_running(processes, seconds)]
    assert not left, f"still running {seconds} s after their owner was killed: {left}"
    return time.monotonic()


def same_process(pid: int, created: float) -> psutil.Process | None:
    """The process `pid` if it is still the one created at `created` (else it ended and its pid was reused)."""
    try:
        process = psutil.Process(pid)
        return process if process.create_time() == created else None
    except psutil.NoSuchProcess:
        return None


def test_what_the_owner_started_ends_when_it_is_killed_and_nothing_else():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    earlier = None
    try:
        earlier_pid, watchdog_pid, segment = owner.stdout.readline().split()
        earlier = psutil.Process(int(earlier_pid))
        started = wait_for_children(owner.pid, STARTED)
        started.remove(earlier)
        assert int(watchdog_pid) in {p.pid for p in started}, started
        assert Path("/dev/shm", segment).exists()
        time.sleep(5 * POLL_S + 2)  # the watchdog has seen them all (it starts in under a second)
        owner.kill()
        owner.wait()
        killed_at = time.monotonic()
        assert still_running(started, GRACE_S + 10) == []
        print(f"all gone {time.monotonic() - killed_at:.1f} s after the kill")
        assert running(earlier)
        # the resource tracker was not killed: it exited by itself, unlinking the segment the dead left
        assert not Path("/dev/shm", segment).exists()
    finally:
        owner.kill()
        if earlier is not None and running(earlier):
            earlier.kill()


def wait_for_children(pid: int, count: int) -> list[psutil.Process]:
    """`pid`'s descendants once there are `count` of them (or a minute has passed)."""
    deadline = time.monotonic() + 60
    while len(children := psutil.Process(pid).children(recursive=True)) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == count, children
    return children


def test_a_stopped_or_dropped_watchdog_ends():
    """An engine's close (or its garbage collection) ends its watchdog: a process that opens an engine per
    run keeps none for closed ones."""
    stopped, dropped = OrphanWatchdog(), OrphanWatchdog()
    processes = [psutil.Process(stopped.pid), psutil.Process(dropped.pid)]
    stopped.stop()
    stopped.stop()
    del dropped
    gc.collect()
    assert still_running(processes, 5) == []



@pytest.mark.slow
def test_a_killed_ray_drivers_runtime_and_actor_engines_end(model_path, tmp_path):
    """Ray stops its head processes with a SIGKILLed driver but not its agents, and the actor's engine
    processes outlived their actor; now every process the driver started ends (about a minute, mostly the
    actor's engine start)."""
    temp = tempfile.mkdtemp(prefix="pm-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        driver = subprocess.run([sys.executable, "-c", RAY_DRIVER], capture_output=True, text=True, cwd=ROOT,
                                timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "PREFMILL_RAY_TMP": temp})
        killed_at = time.monotonic()
        assert driver.returncode == -signal.SIGKILL, driver.stderr[-3000:]
        noted = json.loads(driver.stdout)
        assert {"raylet", "ray::_ModelActor", "VLLM::EngineCore"} <= {name for _, _, name in noted}, noted
        print(f"the {len(noted)} processes of the killed driver ended {all_end(noted) - killed_at:.1f} s after it")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
