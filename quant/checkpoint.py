"""Quantized checkpoints on disk (compressed-tensors layout) and their validated loading.

A folder holds ``model.safetensors``, ``config.json`` (with ``quantization_config``), the tokenizer files
and ``q8chat_manifest.json`` (scheme, alpha, calibration, sha256 + size of every file). Quantized linear
``NAME``: ``NAME.weight`` int8 / float8_e4m3fn [out, in], ``NAME.weight_scale`` float32 [out, 1],
``NAME.input_scale`` float32 [1] for static activations; KV scales ``model.layers.N.self_attn.k_scale`` /
``v_scale`` float32 [1]. SmoothQuant factors are already folded into the weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.config import DecoderConfig, ModelConfigError
from models.decoder import Decoder, layer_prefix
from models.files import atomic_dir
from models.registry import file_digest
from models.weights import CheckpointError as _WeightsError
from quant.schemes import Scheme, SchemeError, get_scheme, quantization_config

MANIFEST = "q8chat_manifest.json"
WEIGHTS = "model.safetensors"
FORMAT = "q8chat-quantized-checkpoint"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
WEIGHT_DTYPES = {"int": torch.int8, "float": torch.float8_e4m3fn}


class CheckpointError(_WeightsError):
    """A quantized checkpoint that is missing, corrupt, truncated, tampered with or inconsistent."""


class LinearWeights(NamedTuple):
    weight: torch.Tensor
    weight_scale: torch.Tensor | None  # None: the linear was kept in BF16
    input_scale: torch.Tensor | None


@dataclass
class QuantizedCheckpoint:
    folder: Path
    scheme: Scheme
    config: DecoderConfig
    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]

    @property
    def alpha(self) -> float | str | None:
        return self.manifest.get("alpha")

    @property
    def kept_bf16(self) -> list[str]:
        return list(self.manifest.get("keep_bf16", []))

    def linear_names(self) -> list[str]:
        return [layer_prefix(i) + s for i in range(self.config.num_layers) for s in _suffixes()]

    def is_quantized(self, name: str) -> bool:
        return f"{name}.weight_scale" in self.tensors

    def linear(self, name: str) -> LinearWeights:
        """(weight, weight_scale, input_scale) of one projection; scales are None where not stored."""
        if f"{name}.weight" not in self.tensors:
            raise KeyError(f"{self.folder} has no linear {name!r}")
        t = self.tensors
        return LinearWeights(t[f"{name}.weight"], t.get(f"{name}.weight_scale"), t.get(f"{name}.input_scale"))

    def kv_scales(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer k_scale and v_scale ([1] float32 each); empty lists when the KV cache is not quantized."""
        if self.scheme.kv_cache == "none":
            return [], []
        n = self.config.num_layers
        return ([self.tensors[layer_prefix(i) + "self_attn.k_scale"] for i in range(n)],
                [self.tensors[layer_prefix(i) + "self_attn.v_scale"] for i in range(n)])


def _suffixes() -> tuple[str, ...]:
    from models.decoder import LINEAR_SUFFIXES

    return LINEAR_SUFFIXES


def ignore_list(keep_bf16: list[str]) -> list[str]:
    return ["lm_head", *keep_bf16]


def save_checkpoint(
    out: str | Path, tensors: dict[str, torch.Tensor], source: str | Path, scheme: Scheme,
    keep_bf16: list[str], info: dict[str, Any],
) -> Path:
    """Write a checkpoint folder atomically (built in a temporary sibling, then renamed)."""
    out, source = Path(out), Path(source)
    with atomic_dir(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        hf = json.loads((source / "config.json").read_text())
        hf["dtype"] = "bfloat16"
        hf.pop("torch_dtype", None)
        qc = quantization_config(scheme, ignore_list(keep_bf16))
        if qc is not None:
            hf["quantization_config"] = qc
        else:
            hf.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for f in sorted(source.iterdir()):
            if f.is_file() and f.name not in ("config.json", MANIFEST) and not f.name.startswith("model.safetensors"):
                shutil.copy2(f, tmp / f.name)
        files = {f.name: {"sha256": file_digest(f), "bytes": f.stat().st_size} for f in sorted(tmp.iterdir())}
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "scheme": scheme.name, "kv_cache": scheme.kv_cache,
            "activations": scheme.activations if scheme.activation_type else None, "keep_bf16": keep_bf16,
            **info, "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; build one with `python -m quant quantize`")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a q8chat checkpoint (rebuild it with "
                              "`python -m quant quantize`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); rebuild the checkpoint") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(
        manifest.get("files"), dict
    ):
        raise CheckpointError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {manifest.get('version')}, this q8chat reads {FORMAT_VERSION}"
        )
    return manifest


def _verify_files(folder: Path, manifest: dict[str, Any], verify_hashes: bool) -> None:
    files = manifest["files"]
    for required in ("config.json", WEIGHTS):
        if required not in files:
            raise CheckpointError(f"{folder / MANIFEST} does not list {required}")
    if not any(t in files for t in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}) in its manifest")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            what = "tokenizer file" if name.startswith("tokenizer") else "file"
            raise CheckpointError(f"{what} {path} is missing from the checkpoint")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path} is {size} bytes but the manifest says {entry.get('bytes')}: "
                                  "truncated or replaced; rebuild the checkpoint")
        if verify_hashes and file_digest(path) != entry.get("sha256"):
            raise CheckpointError(f"{path} does not match its sha256 in the manifest: corrupt or modified; "
                                  "rebuild the checkpoint")


def _expected(cfg: DecoderConfig, scheme: Scheme, keep_bf16: set[str]) -> dict[str, tuple[torch.dtype | None, tuple]]:
    """Every tensor a checkpoint must hold: name -> (dtype or None for any float, shape)."""
    with torch.device("meta"):
        model = Decoder(cfg)
    linears = set(model.linear_names())
    exp: dict[str, tuple[torch.dtype | None, tuple]] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, _, leaf = name.rpartition(".")
        if module in linears and leaf == "weight" and scheme.quantizes_weights and module not in keep_bf16:
            exp[name] = (WEIGHT_DTYPES[scheme.weight_type], tuple(t.shape))
            exp[f"{module}.weight_scale"] = (torch.float32, (t.shape[0], 1))
            if scheme.static_activations:
                exp[f"{module}.input_scale"] = (torch.float32, (1,))
        else:
            exp[name] = (None, tuple(t.shape))
    if scheme.kv_cache != "none":
        for i in range(cfg.num_layers):
            for k in ("k_scale", "v_scale"):
                exp[f"{layer_prefix(i)}self_attn.{k}"] = (torch.float32, (1,))
    return exp


def load_checkpoint(folder: str | Path, verify_hashes: bool = True) -> QuantizedCheckpoint:
    """Load and validate a checkpoint folder; raise ``CheckpointError`` naming the offending file otherwise."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    _verify_files(folder, manifest, verify_hashes)
    config_path = folder / "config.json"
    try:
        hf = json.loads(config_path.read_text())
        cfg = DecoderConfig.from_hf_dict(hf)
    except (json.JSONDecodeError, UnicodeDecodeError, ModelConfigError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a usable model config: {e}") from e
    try:
        scheme = get_scheme(manifest.get("scheme"), manifest.get("kv_cache", "none"),
                            manifest.get("activations") or "dynamic")
    except SchemeError as e:
        raise CheckpointError(f"{folder / MANIFEST}: {e}") from e
    keep = list(manifest.get("keep_bf16", []))
    if hf.get("quantization_config") != quantization_config(scheme, ignore_list(keep)):
        raise CheckpointError(f"{config_path}: quantization_config does not describe scheme {scheme.name!r} "
                              f"(kv cache {scheme.kv_cache}) named in {MANIFEST}")
    weights = folder / WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    expected = _expected(cfg, scheme, set(keep))
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{weights} lacks {len(missing)} tensors for scheme {scheme.name}, e.g. {missing[0]}")
    extra = sorted(set(tensors) - set(expected) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()))
    if extra:
        raise CheckpointError(
            f"{weights} holds {len(extra)} tensors that config.json does not explain, e.g. {extra[0]}"
        )
    for name, (dtype, shape) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{weights}: {name} has shape {tuple(t.shape)}, config.json implies {shape}")
        if dtype is not None and t.dtype != dtype or dtype is None and not t.is_floating_point():
            raise CheckpointError(f"{weights}: {name} is {t.dtype}, scheme {scheme.name} stores {dtype or 'float'}")
    return QuantizedCheckpoint(folder, scheme, cfg, hf, tensors, manifest)
