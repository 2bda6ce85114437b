"""A long-lived process (a served deployment, the soak) runs many flow runs: whatever a finished run opened
must become garbage when it closes, whoever still holds the run's small objects (issue 12 B.5). The real
engine's side is in `test_engine.py::test_a_closed_engine_leaves_no_tokenizer_behind`."""

from __future__ import annotations

import contextvars
import gc
import sys
import types
import weakref

import pytest

from schemas.config import load_pipeline_config


class Closable:
    closed, name = False, "lent"

    def shutdown(self) -> None:
        self.closed = True

    close = shutdown


def test_a_finished_run_keeps_no_reference_to_the_pool_it_opened(tmp_path, monkeypatch):
    """Prefect keeps copies of a task's context (holding the run's Runtime) in services that outlive the
    run; the Runtime must let go of the pool, or every run's engine stays in memory."""
    import flows.pipeline as P

    monkeypatch.setattr(P, "open_pool", lambda _cfg: Closable())
    with P.pipeline_pool(load_pipeline_config(None, [f'catalog="{tmp_path}"'])):
        pool = P._RUN.get().get_pool()
        kept = contextvars.copy_context()  # what a Prefect service keeps of a task's context
    assert pool.closed
    gone = weakref.ref(pool)
    del pool
    gc.collect()
    assert gone() is None
    assert kept[P._RUN] is not None  # the context copy is still alive; only the pool went


def test_a_closed_host_lets_go_of_the_engines_it_opened_but_not_of_preloaded_ones(monkeypatch):
    import serving.engine
    from serving.hosts import ModelHost

    class Engine(Closable):
        def __init__(self, config):
            self.name = config.model

    monkeypatch.setattr(serving.engine, "VLLMEngine", Engine)
    lent = Closable()
    host = ModelHost(preloaded={"lent": lent})
    opened = weakref.ref(host.chat_model("m").model)
    host.close()
    gc.collect()
    assert opened() is None and not lent.closed
    assert host.chat_model("lent").model is lent


def test_no_vllm_module_keeps_a_traceback_holding_its_importers_frames():
    """vLLM keeps failed optional imports as exceptions in module globals; their tracebacks held the
    frames (and locals) of whatever first imported vLLM, a flow task's included."""
    import vllm  # noqa: F401

    from serving.engine import release_import_tracebacks

    probe = types.ModuleType("vllm._prefmill_probe")
    try:
        try:
            raise OSError("libffmpeg.so: cannot open shared object file")
        except OSError as cause:
            raise RuntimeError("could not load optional_dep") from cause
    except RuntimeError as error:
        probe.import_error = error
    sys.modules[probe.__name__] = probe
    try:
        assert probe.import_error.__traceback__ is not None
        release_import_tracebacks()
    finally:
        del sys.modules[probe.__name__]
    assert probe.import_error.__traceback__ is None and probe.import_error.__cause__.__traceback__ is None
    assert str(probe.import_error) == "could not load optional_dep"  # the message stays


def test_a_runtime_that_ended_refuses_to_open_another_pool(tmp_path, monkeypatch):
    """A task still running when its run ends (an interrupted run) must not open a pool nobody closes."""
    import flows.pipeline as P

    monkeypatch.setattr(P, "open_pool", lambda _cfg: Closable())
    runtime = P.Runtime(load_pipeline_config(None, [f'catalog="{tmp_path}"']))
    pool = runtime.get_pool()
    runtime.close()
    assert pool.closed and runtime.pool is None
    with pytest.raises(RuntimeError, match="run has ended"):
        runtime.get_pool()
