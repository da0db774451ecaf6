"""GPU backend: FP8 / INT8 kernels (Triton) and a CUDA-graph decode engine.

Importing this package does not import Triton or touch CUDA; ``supported_schemes()`` and
``availability()`` say what this machine can run.
"""

from __future__ import annotations

# compute capability (major, minor) floor -> schemes. sm89/sm90 have FP8 tensor cores; sm80 has INT8.
GPU_SCHEMES_BY_CAPABILITY: dict[tuple[int, int], tuple[str, ...]] = {
    (8, 9): ("bf16", "w8a16-int8", "w8a16-fp8", "w8a8-int8", "w8a8-fp8"),
    (8, 0): ("bf16", "w8a16-int8", "w8a8-int8"),
}
KV_CACHE_OPTIONS = ("bf16", "fp8", "int8")


def _capability() -> tuple[int, int] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def schemes_for(capability: tuple[int, int] | None) -> tuple[str, ...]:
    if capability is None:
        return ()
    for floor, schemes in GPU_SCHEMES_BY_CAPABILITY.items():  # highest floor first
        if capability >= floor:
            return schemes
    return ()


def kv_options_for(capability: tuple[int, int] | None) -> tuple[str, ...]:
    if capability is None:
        return ()
    return KV_CACHE_OPTIONS if capability >= (8, 9) else ("bf16", "int8")


def supported_schemes() -> tuple[str, ...]:
    """Schemes this machine's GPU can run ('' tuple without a usable GPU)."""
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
