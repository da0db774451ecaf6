"""GPU backend: FP8 / INT8 kernels (Triton) and a CUDA-graph decode engine.

Importing this package does not import Triton or touch CUDA; ``supported_schemes()`` and
``availability()`` say what this machine can run.
"""

from __future__ import annotations

from quant.schemes import REGISTRY

# The formats (quant.schemes.Scheme.formats) our GPU linears run: BF16, weight-only 8-bit, and 8-bit products.
LINEAR_FORMATS = {(None, None), ("int", None), ("float", None), ("int", "int"), ("float", "float")}
MIN_CAPABILITY = (8, 0)  # A100: BF16 and INT8 tensor cores
FP8_CAPABILITY = (8, 9)  # L40S, H100, H200: FP8 tensor cores
KV_CACHES = ("bf16", "fp8", "int8")  # the GPU's KV-cache element types


def _capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def schemes_for(capability: tuple[int, int] | None) -> tuple[str, ...]:
    """The registry's schemes a GPU of this compute capability runs (FP8 needs sm89+)."""
    if capability is None or capability < MIN_CAPABILITY:
        return ()
    return tuple(
        s.name
        for s in REGISTRY.values()
        if s.formats in LINEAR_FORMATS and (capability >= FP8_CAPABILITY or not s.needs_fp8)
    )


def kv_options_for(capability: tuple[int, int] | None) -> tuple[str, ...]:
    if capability is None or capability < MIN_CAPABILITY:
        return ()
    return KV_CACHES if capability >= FP8_CAPABILITY else tuple(k for k in KV_CACHES if k != "fp8")


def supported_schemes() -> tuple[str, ...]:
    """Schemes this machine's GPU can run (empty without a usable GPU)."""
    ok, _ = availability()
    return schemes_for(_capability()) if ok else ()


def availability() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU found (the GPU backend needs an NVIDIA GPU with compute capability 8.0 or newer)"
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if not schemes_for(cap):
        return False, (
            f"{name} has compute capability {cap[0]}.{cap[1]}; the GPU backend needs 8.0 (A100: INT8) "
            "or 8.9+ (L40S, H100, H200: FP8 and INT8)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "Triton is not installed (pip install triton)"
    return True, ""
