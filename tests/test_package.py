"""prefmill installs under one import name: a wheel holds `prefmill/` and its metadata, nothing else, so it
never shadows (or is shadowed by) the PyPI packages named `flows`, `operators`, `schemas` or `storage`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# what the wheel is built from: setuptools builds in the source tree (build/), so it builds in a copy of these
SOURCES = ("pyproject.toml", "setup.py", "README.md", "prefmill", "flows", "operators", "schemas", "serving",
           "storage")


def build_wheel(folder: Path) -> Path:
    """The prefmill wheel, built from a copy of the sources under `folder` (no build/ left in the checkout)."""
    source = folder / "source"
    source.mkdir(parents=True)
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(folder)], check=True, capture_output=True)
    [wheel] = folder.glob("prefmill-*.whl")
    return wheel


def test_the_wheel_has_one_top_level_import_name_and_carries_its_data(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    # and the .pth that hides mismatched torch extension builds (prefmill/_torch_builds.py): no import name
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "prefmill", "prefmill-torch-builds.pth"}
    [top_level] = [n for n in names if n.endswith("top_level.txt")]
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["prefmill"]
    assert {"prefmill/flows/stages/base.py", "prefmill/operators/data/followups.json",
            "prefmill/flows/configs/demo.toml", "prefmill/operators/data/builtin_seeds.jsonl"} <= set(names)
