"""Quantization schemes: the one place a scheme is named and described.

A scheme is data (``Scheme``): the formats of its weights and activations, a line for people, and the
compressed-tensors config that describes its checkpoints to vLLM and transformers. Code that executes a scheme
asks for its formats, never for its name: ``quant.reference`` (the numerics every kernel is tested against),
``quant.pipeline`` (calibration, smoothing, quantization) and each backend's linear methods (keyed by
``Scheme.formats``). Adding a scheme: README, "Adding a scheme".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn

KV_CACHE_OPTIONS: tuple[str, ...] = ("none", "int8", "fp8")  # a checkpoint's KV-cache scales ("none": not stored)
ACTIVATION_MODES: tuple[str, ...] = ("dynamic", "static")


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str  # one line for people: what is quantized, and what it buys
    weight_type: str | None  # "int" (int8) | "float" (fp8 e4m3) | None (bf16)
    activation_type: str | None  # "int" | "float" | None (bf16 activations: weight-only)
    activations: str = "dynamic"  # "dynamic" per-token, or "static" per-tensor (calibrated input_scale)
    smooth: bool = False  # SmoothQuant folds per-channel scales into the weights before quantizing them
    kv_cache: str = "none"

    @property
    def formats(self) -> tuple[str | None, str | None]:
        """(weight_type, activation_type): what a backend's linear method is chosen by."""
        return self.weight_type, self.activation_type

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_type is not None

    @property
    def static_activations(self) -> bool:
        return self.activation_type is not None and self.activations == "static"

    @property
    def needs_fp8(self) -> bool:
        """FP8 tensors anywhere: needs FP8 hardware (NVIDIA sm89+) or an emulation."""
        return "float" in self.formats

    @property
    def weight_qmax(self) -> float:
        return FP8_MAX if self.weight_type == "float" else INT8_MAX


class SchemeError(ValueError):
    """An unknown scheme or an option it does not support."""


BF16 = "bf16"
W8A16_INT8 = "w8a16-int8"
W8A16_FP8 = "w8a16-fp8"
W8A8_INT8 = "w8a8-int8"
W8A8_FP8 = "w8a8-fp8"

REGISTRY: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(BF16, "unquantized BF16 weights and activations: the quality baseline", None, None),
        Scheme(W8A16_INT8, "INT8 weights (per output channel), BF16 activations: half the bytes to read", "int", None),
        Scheme(W8A16_FP8, "FP8 weights (per output channel), BF16 activations: half the bytes to read", "float", None),
        Scheme(
            W8A8_INT8,
            "SmoothQuant: INT8 weights and per-token INT8 activations, integer matrix products",
            "int",
            "int",
            smooth=True,
        ),
        Scheme(
            W8A8_FP8,
            "FP8 weights and per-token FP8 activations, FP8 tensor-core products (GPU sm89+)",
            "float",
            "float",
            smooth=True,
        ),
    )
}
SCHEMES: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_SCHEME = BF16


def get_scheme(name: str, kv_cache: str = "none", activations: str = "dynamic") -> Scheme:
    if name not in REGISTRY:
        raise SchemeError(f"unknown scheme {name!r}; choose one of {', '.join(SCHEMES)}")
    if kv_cache not in KV_CACHE_OPTIONS:
        raise SchemeError(f"unknown KV cache option {kv_cache!r}; choose one of {', '.join(KV_CACHE_OPTIONS)}")
    if activations not in ACTIVATION_MODES:
        raise SchemeError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    scheme = REGISTRY[name]
    if activations == "static" and scheme.activation_type != "int":
        static = [s.name for s in REGISTRY.values() if s.activation_type == "int"]
        raise SchemeError(f"static per-tensor activations are offered for {', '.join(static)} only")
    return dataclasses.replace(scheme, activations=activations, kv_cache=kv_cache)


def quantization_config(scheme: Scheme, ignore: list[str]) -> dict[str, Any] | None:
    """The ``quantization_config`` entry of config.json, written by compressed-tensors' own config classes
    (what vLLM and transformers parse), or None for bf16 without a quantized KV cache."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    def args(kind: str, strategy: str, dynamic: bool) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=8, type=kind, symmetric=True, strategy=strategy, dynamic=dynamic,
            observer=None if dynamic else "minmax",
        )  # fmt: skip

    groups = {}
    fmt = "dense"
    if scheme.quantizes_weights:
        fmt = "float-quantized" if scheme.weight_type == "float" else "int-quantized"
        acts = None
        if scheme.activation_type is not None:
            static = scheme.static_activations
            acts = args(scheme.activation_type, "tensor" if static else "token", dynamic=not static)
        groups["group_0"] = QuantizationScheme(
            targets=["Linear"], weights=args(scheme.weight_type, "channel", False), input_activations=acts, format=fmt
        )
    kv = None
    if scheme.kv_cache != "none":
        kv = args("int" if scheme.kv_cache == "int8" else "float", "tensor", dynamic=False)
    if not groups and kv is None:
        return None
    config = QuantizationConfig(
        config_groups=groups, format=fmt, quantization_status="compressed", kv_cache_scheme=kv, ignore=ignore
    )
    return config.model_dump(mode="json", exclude_none=True)
