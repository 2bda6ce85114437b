"""CLI conventions (issue 24.2): --version, `config show` as TOML, `config schema`, an example in every --help."""

from __future__ import annotations

import json
import tomllib

import pytest
import typer
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.schemas.config import PipelineConfig, load_pipeline_config

DEMO = "flows/configs/demo.toml"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def test_version_prints_the_installed_distributions_version():
    from importlib.metadata import version

    result = invoke("--version")
    assert result.exit_code == 0 and result.stdout == f"prefmill {version('prefmill')}\n"


def test_config_show_prints_toml_that_loads_back_to_the_same_resolved_config(tmp_path):
    result = invoke("config", "show", DEMO, "--set", "candidates.n=8", "--set", "models.critic=org/critic")
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.stdout)
    assert shown["candidates"]["n"] == 8 and shown["models"]["critic"] == "org/critic"
    assert shown["seeds"]["limit"] == 8  # from the demo file
    assert "url" not in shown  # None: TOML has no null, the key is left out
    (tmp_path / "shown.toml").write_text(result.stdout)
    assert load_pipeline_config(tmp_path / "shown.toml") == load_pipeline_config(
        DEMO, ["candidates.n=8", "models.critic=org/critic"])


def test_config_show_without_a_file_prints_the_defaults_and_a_bad_key_fails_in_one_message():
    assert tomllib.loads(invoke("config", "show").stdout) == tomllib.loads(
        invoke("config", "show", "--set", "shard_size=auto").stdout)
    bad = invoke("config", "show", "--set", "candidates.nn=3")
    assert bad.exit_code == 2 and "error:" in bad.stdout and "candidates.nn" in bad.stdout


def test_config_schema_is_the_pipeline_configs_json_schema_and_validates_the_demo():
    result = invoke("config", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema == PipelineConfig.model_json_schema()
    assert {"seeds", "models", "candidates", "dedup", "engine"} <= set(schema["properties"])
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(tomllib.loads(open(DEMO).read()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"candidates": {"n": 0}}, schema)


def _command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        paths += _command_paths(command, (*prefix, name)) if hasattr(command, "commands") else [(*prefix, name)]
    return paths


def test_every_commands_help_shows_an_example_of_that_command():
    paths = _command_paths(typer.main.get_command(app))
    assert {("run",), ("config", "show"), ("config", "schema"), ("models",), ("models", "pull")} <= set(paths)
    for path in paths:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, path
        examples = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("Example:")]
        assert examples, f"prefmill {' '.join(path)} --help has no example"
        assert examples[0].startswith(" ".join(("Example: prefmill", *path))), (path, examples)
