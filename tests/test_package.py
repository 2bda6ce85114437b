"""prefmill installs under one import name: a wheel holds `prefmill/` and its metadata, nothing else, so it
never shadows (or is shadowed by) the PyPI packages named `flows`, `operators`, `schemas` or `storage`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_has_one_top_level_import_name_and_carries_its_data(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("prefmill-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # and the .pth that hides mismatched torch extension builds (prefmill/_torch_builds.py): no import name
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "prefmill", "prefmill-torch-builds.pth"}
    [top_level] = [n for n in names if n.endswith("top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["prefmill"]
    assert {"prefmill/flows/stages/base.py", "prefmill/operators/data/followups.json",
            "prefmill/flows/configs/demo.toml", "prefmill/operators/data/builtin_seeds.jsonl"} <= set(names)
