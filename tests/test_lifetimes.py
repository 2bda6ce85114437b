"""A long-lived process (a served deployment, the soak) runs many flow runs: whatever a finished run opened
must become garbage when it closes, whoever still holds the run's small objects (issue 12 B.5). The real
engine's side is in `test_engine.py::test_a_closed_engine_leaves_no_tokenizer_behind`."""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest

from prefmill.schemas.config import load_pipeline_config


class Closable:
    closed, name = False, "lent"

    def shutdown(self) -> None:
        self.closed = True

    close = shutdown


def test_a_finished_run_keeps_no_reference_to_the_pool_it_opened(tmp_path, monkeypatch):
    """Prefect keeps what a task was called with (the run's models among its arguments) in services that
    outlive the run; the run's models must let go of the pool, or every run's engine stays in memory."""
    import prefmill.flows.pipeline as P

    monkeypatch.setattr(P, "open_pool", lambda _cfg, _plan: Closable())
    with P.RunModels(load_pipeline_config(None, [f'catalog="{tmp_path}"'])) as models:
        pool = models.pool()
    kept = models  # what a Prefect service keeps of a task's arguments
    assert pool.closed
    gone = weakref.ref(pool)
    del pool
    gc.collect()
    assert gone() is None and kept.owned is None


def test_a_closed_host_lets_go_of_the_engines_it_opened_but_not_of_preloaded_ones(monkeypatch):
    import prefmill.serving.engine as engine_module
    from prefmill.serving.hosts import ModelHost

    class Engine(Closable):
        def __init__(self, config, devices=()):
            self.name = config.model

    monkeypatch.setattr(engine_module, "VLLMEngine", Engine)
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

    from prefmill.serving.engine import release_import_tracebacks

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


def test_run_models_that_ended_refuse_to_open_another_pool(tmp_path, monkeypatch):
    """A task still running when its run ends (an interrupted run) must not open a pool nobody closes; a
    lent pool is its owner's to close."""
    import prefmill.flows.pipeline as P

    monkeypatch.setattr(P, "open_pool", lambda _cfg, _plan: Closable())
    cfg = load_pipeline_config(None, [f'catalog="{tmp_path}"'])
    with P.RunModels(cfg) as models:
        pool = models.pool()
    assert pool.closed and models.owned is None
    with pytest.raises(RuntimeError, match="run has ended"):
        models.pool()
    lent = Closable()
    with P.RunModels(cfg, lent) as models:
        assert models.pool() is lent
    assert not lent.closed
