"""Quantization schemes: what each one stores, and the compressed-tensors config that describes it.

A scheme is data (``Scheme``); the code that executes it lives in ``quant.quantize`` (weights),
``quant.reference`` (kernel numerics) and ``quant.checkpoint`` (layout on disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCHEMES: tuple[str, ...] = ("bf16", "w8a16-int8", "w8a8-int8", "w8a8-fp8")
KV_CACHE_OPTIONS: tuple[str, ...] = ("none", "int8", "fp8")
ACTIVATION_MODES: tuple[str, ...] = ("dynamic", "static")

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_type: str | None  # "int" | "float" | None (not quantized)
    activation_type: str | None  # "int" | "float" | None (weight-only)
    activations: str = "dynamic"  # "dynamic" per-token, or "static" per-tensor (calibrated input_scale)
    smooth: bool = False  # SmoothQuant scales folded into the weights
    kv_cache: str = "none"

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_type is not None

    @property
    def static_activations(self) -> bool:
        return self.activation_type is not None and self.activations == "static"

    @property
    def weight_qmax(self) -> float:
        return FP8_MAX if self.weight_type == "float" else INT8_MAX


class SchemeError(ValueError):
    """An unknown scheme or an option it does not support."""


def get_scheme(name: str, kv_cache: str = "none", activations: str = "dynamic") -> Scheme:
    if name not in SCHEMES:
        raise SchemeError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if kv_cache not in KV_CACHE_OPTIONS:
        raise SchemeError(f"unknown KV cache option {kv_cache!r}; choose one of {', '.join(KV_CACHE_OPTIONS)}")
    if activations not in ACTIVATION_MODES:
        raise SchemeError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    if activations == "static" and name != "w8a8-int8":
        raise SchemeError("static per-tensor activations are offered for w8a8-int8 only")
    table = {
        "bf16": Scheme("bf16", None, None, kv_cache=kv_cache),
        "w8a16-int8": Scheme("w8a16-int8", "int", None, kv_cache=kv_cache),
        "w8a8-int8": Scheme("w8a8-int8", "int", "int", activations, smooth=True, kv_cache=kv_cache),
        "w8a8-fp8": Scheme("w8a8-fp8", "float", "float", kv_cache=kv_cache),
    }
    return table[name]


def _args(kind: str, strategy: str, dynamic: bool) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": kind,
        "symmetric": True,
        "strategy": strategy,
        "dynamic": dynamic,
        "group_size": None,
        "block_structure": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
        "actorder": None,
    }


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any] | None:
    """The ``quantization_config`` entry of config.json (compressed-tensors), or None for bf16 without KV."""
    groups: dict[str, Any] = {}
    if scheme.quantizes_weights:
        acts = None
        if scheme.activation_type is not None:
            static = scheme.static_activations
            acts = _args(scheme.activation_type, "tensor" if static else "token", dynamic=not static)
        groups["group_0"] = {
            "targets": ["Linear"],
            "weights": _args(scheme.weight_type, "channel", dynamic=False),
            "input_activations": acts,
            "output_activations": None,
            "format": "float-quantized" if scheme.weight_type == "float" else "int-quantized",
        }
    kv = None
    if scheme.kv_cache != "none":
        kv = _args("int" if scheme.kv_cache == "int8" else "float", "tensor", dynamic=False)
    if not groups and kv is None:
        return None
    fmt = groups["group_0"]["format"] if groups else "dense"
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": groups,
        "kv_cache_scheme": kv,
        "ignore": ignore,
        "global_compression_ratio": None,
    }
