"""Faults during a run: a Ray actor killed mid-step is restarted and its step retried, nothing lost."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from prefmill.serving.protocols import Sampling

pytestmark = pytest.mark.slow

PROMPTS = [[{"role": "user", "content": f"Name a colour, number {i}."}] for i in range(4)]
SAMPLING = Sampling(n=1, seed=3, max_tokens=8, temperature=0.0)


@dataclass(frozen=True)
class ChatStep:
    """A tiny shard step: chat the prompts; each attempt leaves `attempt-N` holding its process id. With
    `hold_first`, the first attempt waits after its chat so the test can kill the actor mid-step."""

    marks: str
    hold_first: bool = False

    def __call__(self, rows: list, host) -> tuple[list, int]:
        marks = Path(self.marks)
        attempt = len(list(marks.glob("attempt-*")))
        (marks / f"attempt-{attempt}").write_text(str(os.getpid()))
        out = host.chat_model(host.host.engine_config.model).chat(rows, SAMPLING)  # a HostSession
        if self.hold_first and attempt == 0:
            (marks / "holding").write_text(str(os.getpid()))
            time.sleep(300)  # killed here
        return out, os.getpid()


@pytest.fixture(scope="module")
def one_actor_pool(make_ray_pool):
    """conftest's Ray pool with one actor, which can unpickle this module's steps."""
    from ray import cloudpickle

    from prefmill.schemas.config import PoolConfig

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # actors cannot import the tests folder
    return make_ray_pool(PoolConfig(actors=1))


def _kill_when_holding(marks: Path, killed: dict) -> None:
    """SIGKILL the actor process once its first attempt is holding; note its engine processes."""
    deadline = time.monotonic() + 600
    while not (marks / "holding").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    pid = int((marks / "holding").read_text())
    killed["pid"], killed["children"] = pid, psutil.Process(pid).children(recursive=True)
    os.kill(pid, signal.SIGKILL)


def test_an_actor_killed_mid_step_is_restarted_and_the_step_completes(one_actor_pool, tmp_path):
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    clean.mkdir(), faulty.mkdir()
    expected = one_actor_pool.run(ChatStep(str(clean)), PROMPTS).value[0]
    killed: dict = {}
    killer = threading.Thread(target=_kill_when_holding, args=(faulty, killed), daemon=True)
    killer.start()
    (out, pid), attempts = one_actor_pool.run(ChatStep(str(faulty), hold_first=True), PROMPTS).value, None
    killer.join(timeout=5)
    attempts = sorted(faulty.glob("attempt-*"))
    assert len(attempts) == 2 and killed["pid"] == int(attempts[0].read_text())
    assert pid == int(attempts[1].read_text()) != killed["pid"]  # a restarted actor, a new process
    assert len(out) == len(PROMPTS) and all(c and c[0].text for c in out)
    assert out == expected  # greedy: the retried step gives what an undisturbed one gave
    # the killed actor's engine processes do not outlive it
    gone, alive = psutil.wait_procs(killed["children"], timeout=60)
    assert not alive, f"engine processes of the killed actor still running: {[p.pid for p in alive]}"
    # the pool keeps working on the restarted actor
    assert one_actor_pool.run(ChatStep(str(clean)), PROMPTS[:1]).value[0] == expected[:1]
