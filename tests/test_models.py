"""Materializing the embedded model: once, atomically, safe under a race."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from prefmill.serving.models import EMBEDDED, known_models

pytestmark = pytest.mark.slow

RACE = "from prefmill.serving.models import materialize_embedded; print(materialize_embedded())"


def test_two_processes_materializing_at_once_both_get_one_complete_folder(tmp_path):
    env = {**os.environ, "PREFMILL_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", RACE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outputs]
    target = tmp_path / "models" / EMBEDDED
    assert {o.strip().splitlines()[-1] for o, _ in outputs} == {str(target)}
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"])
    leftovers = [p.name for p in target.parent.iterdir() if p.name.startswith(f".{EMBEDDED}.") and p.is_dir()]
    assert leftovers == []
    [info] = known_models(tmp_path)
    assert info.ready and info.location == str(target)
