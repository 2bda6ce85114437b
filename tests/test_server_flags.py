"""`prefmill serve` starts vLLM's server with exactly the in-process engine's settings: the argv is parsed
by vLLM's own server parser and turned into engine args the way the server does it."""

from __future__ import annotations

import pytest

import prefmill.serving.engine as engine_module
from prefmill.schemas.config import EngineConfig
from prefmill.serving.engine import engine_kwargs
from prefmill.serving.server import server_command


def served_engine_args(cmd: list[str]):
    """The engine args and namespace vLLM's API server builds from `cmd` (after `python -m module`)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    return AsyncEngineArgs.from_cli_args(args), args


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
@pytest.mark.parametrize("config", [EngineConfig(), EngineConfig(enforce_eager=False, seed=7, max_num_seqs=8,
                                                                 kv_cache_fraction=0.5, dtype="float16")],
                         ids=["defaults", "overrides"])
def test_every_engine_setting_reaches_the_server_with_its_value(monkeypatch, gpu, config):
    monkeypatch.setattr(engine_module, "on_gpu", lambda: gpu)
    kwargs = engine_kwargs(config)
    engine_args, args = served_engine_args(server_command(config, host="127.0.0.1", port=8123))
    assert {key: getattr(engine_args, key) for key in kwargs} == kwargs
    assert (args.host, args.port) == ("127.0.0.1", 8123)


def test_chunked_prefill_stays_off_on_cpu(monkeypatch):
    monkeypatch.setattr(engine_module, "on_gpu", lambda: False)
    engine_args, _ = served_engine_args(server_command(EngineConfig()))
    assert engine_args.enable_chunked_prefill is False
