"""PipelineConfig: TOML + --set overrides, errors that name key, value and what is allowed, stable hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefmill.schemas.config import ConfigError, PipelineConfig, load_pipeline_config, parse_override

DEMO = Path(__file__).resolve().parents[1] / "flows" / "configs" / "demo.toml"


def test_the_demo_config_loads_and_overrides_apply_on_top():
    cfg = load_pipeline_config(DEMO, ["selfchat.max_turns=3", "models.assistant=org/name", "critiques.enabled=false"])
    assert cfg.seeds.limit == 8 and cfg.candidates.n == 4
    assert cfg.selfchat.max_turns == 3 and cfg.models.assistant == "org/name" and not cfg.critiques.enabled
    assert cfg.models.resolved()["critic"] == "org/name"


def test_override_values_are_read_as_toml_scalars_or_plain_strings():
    assert parse_override("a.b=2") == ("a.b", 2)
    assert parse_override("x=0.5") == ("x", 0.5)
    assert parse_override("x=true") == ("x", True)
    assert parse_override('x="q"') == ("x", "q")
    assert parse_override("x=org/name") == ("x", "org/name")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("no-equals-sign")


@pytest.mark.parametrize("override, named", [
    ("selfchat.max_turns=0", "selfchat.max_turns = 0: Input should be greater than or equal to 1"),
    ("critiques.select=best", "critiques.select = 'best': Input should be 'all' or 'top_k'"),
    ("backend=gpu", "backend = 'gpu': Input should be 'engine', 'ray' or 'http'"),
    ("candidates.nn=3", "candidates.nn: unknown key"),
    ("dataset=My-Pairs", "dataset = 'My-Pairs'"),
    ("backend=http", "backend 'http' needs url"),
])
def test_an_invalid_value_fails_naming_key_value_and_what_is_allowed(override, named):
    with pytest.raises(ConfigError) as err:
        load_pipeline_config(None, [override])
    assert named in str(err.value)


def test_a_bad_toml_file_fails_clearly(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[selfchat\nmax_turns = 2")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_pipeline_config(bad)


def test_the_fingerprint_covers_what_shapes_the_data_and_not_where_it_runs():
    base = PipelineConfig()
    assert base.fingerprint() == PipelineConfig().fingerprint()
    moved = load_pipeline_config(None, ["backend=ray", "catalog=/elsewhere", "ray.actors=4"])
    assert moved.fingerprint() == base.fingerprint()
    assert load_pipeline_config(None, ["candidates.seed=1"]).fingerprint() != base.fingerprint()
