"""Load a decoder from a folder of safetensors (never pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models.config import DecoderConfig
from models.decoder import Decoder, rope_inv_freq


class CheckpointError(ValueError):
    """Weights that are missing, corrupt or do not match the config."""


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes), read without touching the tensors."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise CheckpointError(f"{path} is not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a table)")
    return header


def parameter_count(folder: Path) -> int:
    """How many weights the model folder holds, summed from its safetensors headers (no tensor is loaded)."""
    total = 0
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing")
        for name, info in safetensors_header(path).items():
            if name == "__metadata__":
                continue
            try:
                start, end = info["data_offsets"]
                total += (end - start) // SAFETENSORS_DTYPE_BYTES[info["dtype"]]
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: the header entry for {name} is malformed ({e})") from e
    return total


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    return tensors


def load_decoder(folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Decoder:
    folder = Path(folder)
    cfg = DecoderConfig.from_file(folder / "config.json")
    tensors = read_tensors(folder)
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: v for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{folder}: {len(missing)} tensors missing from the weights, e.g. {missing[0]}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{folder}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {tuple(ref.shape)}"
            )
    state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()
