"""The CLI smoke commands, run as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PREFMILL = str(Path(sys.executable).with_name("prefmill"))


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFMILL, *args], capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_models_lists_the_embedded_default_and_where_it_lives(model_path):
    out = run("models").stdout
    assert "smollm2-135m" in out and "yes" in out
    assert model_path in out


@pytest.mark.slow
def test_chat_answers_with_the_real_model(model_path):
    out = run("chat", "What color is the sky on a clear day?", "--n", "2", "--max-tokens", "24", "--seed", "3").stdout
    assert out.count("reply ") == 2
    assert "tokens" in out


def test_chat_with_a_bad_model_spec_fails_clearly():
    result = run("chat", "hi", "--model", "./no-such-folder", check=False)
    assert result.returncode == 2
    assert "neither an embedded model" in result.stdout
