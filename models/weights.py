"""Load a decoder from a folder of safetensors (never pickle)."""

from __future__ import annotations

import json
import math
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


def parameter_count(folder: Path) -> int:
    """How many weights the model folder holds, summed from its safetensors headers (no tensor is loaded)."""
    total = 0
    for path in weight_files(folder):
        if not path.is_file():
            raise CheckpointError(f"weight file {path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    total += math.prod(f.get_slice(name).get_shape())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
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
    return decoder_from_tensors(cfg, read_tensors(folder), dtype, device, where=str(folder))


def decoder_from_tensors(
    cfg: DecoderConfig,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    skip: set[str] = frozenset(),
    where: str = "the checkpoint",
) -> Decoder:
    """A Decoder holding ``tensors`` (names and shapes checked against the config). Modules in ``skip`` (e.g.
    quantized linears, which the caller replaces) are left on the meta device and their tensors unread."""
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in skip}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensors missing from the weights, e.g. {missing[0]}")
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(tensors[name].shape)} but config.json implies {tuple(ref.shape)}"
            )
    state = {k: tensors[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()
