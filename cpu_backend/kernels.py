"""Build (once, cached by torch) and load the CPU C++ kernels in csrc/."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"


@functools.cache
def load() -> None:
    """Compile csrc/ with the system C++ compiler on first use (~30 s), then reuse the cached build."""
    from torch.utils.cpp_extension import load as load_extension

    load_extension(
        name="q8chat_cpu_kernels",
        sources=[str(CSRC / "quantize.cpp")],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def quantize_per_token(x: torch.Tensor, zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 or uint8+128 values [M, K], float32 scales [M, 1]) with the reference's rounding."""
    load()
    q, s = torch.ops.q8chat.quantize_per_token(x, zero_point)
    return q, s


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    """round(x / scale) clamped to +-127 (+ zero_point), as int8 or uint8."""
    load()
    return torch.ops.q8chat.quantize_per_tensor(x, scale, zero_point)
