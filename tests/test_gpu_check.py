"""bench/gpu_check.py (issue 23): its CPU smoke run with tiny random models ends in one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_scores_and_embeds_on_cpu_and_reports_the_plan_estimate():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["device"], result["tiny"]) == ("cpu", True)
    assert result["scorer"]["prefixes_per_s"] > 0 and result["embedder"]["texts_per_s"] > 0
    assert result["scorer"]["peak_gib"] is None  # measured on CUDA only
    # the plan's estimate: weights + repeated prefix caches + logits + placement.activation_gib (2 GiB)
    assert 2.0 < result["scorer"]["plan_gib"] < 2.5 and 2.0 < result["embedder"]["plan_gib"] < 2.1
