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
        sources=[str(CSRC / "quantize.cpp"), str(CSRC / "gemv.cpp"), str(CSRC / "decode.cpp")],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],  # no FMA contraction: the reference rounds twice
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def op(name: str):
    """The C++ kernel ``name`` as its bare overload (no overload resolution per call: the decode step's fast path)."""
    load()
    return getattr(torch.ops.q8chat, name).default


def quantize_per_token(x: torch.Tensor, zero_point: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 or uint8+128 values [M, K], float32 scales [M, 1]) with the reference's rounding."""
    load()
    q, s = torch.ops.q8chat.quantize_per_token(x, zero_point)
    return q, s


def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int = 0) -> torch.Tensor:
    """round(x / scale) clamped to +-127 (+ zero_point), as int8 or uint8."""
    load()
    return torch.ops.q8chat.quantize_per_tensor(x, scale, zero_point)


def dequantize(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Exact products [M, N] (int32, or float32 holding int32 values converted once) -> bf16
    ``(acc * x_scale[m]) * w_scale[n] (+ bias[n])`` in float32: the reference's dequantization order in one
    pass. x_scale: [M] (per token) or one value (static)."""
    load()
    return torch.ops.q8chat.dequantize(acc, x_scale, w_scale, bias)


@functools.cache
def has_vnni() -> bool:
    """Whether this CPU runs our AVX512-VNNI GEMV (``gemv_w8a8``)."""
    load()
    return bool(torch.ops.q8chat.has_vnni())


@functools.cache
def has_avx512bf16() -> bool:
    """Whether this CPU runs our AVX512-BF16 GEMV (``gemv_bf16``). False where csrc/ does not build (no C++
    compiler): BF16, the default scheme, then runs on oneDNN alone."""
    try:
        load()
    except Exception:  # noqa: BLE001
        return False
    return bool(torch.ops.q8chat.has_avx512bf16())


@functools.cache
def has_avx512() -> bool:
    """Whether this CPU runs our AVX-512 W8A16 GEMV (``gemv_w8a16``); False where csrc/ does not build."""
    try:
        load()
    except Exception:  # noqa: BLE001
        return False
    return bool(torch.ops.q8chat.has_avx512())


def gemv_w8a16(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One bf16 row [1, K] times a plain int8 weight [N, K]: ``bf16(bf16(x @ w.T) * w_scale (+ bias))`` [1, N], the
    sum in float32 over exact products. w_scale: float32 [N]; bias: float32 [N] or None."""
    load()
    return torch.ops.q8chat.gemv_w8a16(x, weight, w_scale, bias)


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One bf16 row [1, K] times a plain bf16 weight [N, K] (+ bias): [1, N] bf16, float32 accumulation."""
    load()
    return torch.ops.q8chat.gemv_bf16(x, weight, bias)


def add_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 rows [M, n]: (x + delta rounded to bf16, or x; RMSNorm of that times ``weight``, with the decoder's
    bf16 rounding points; the mean of squares summed in our order)."""
    load()
    return torch.ops.q8chat.add_rmsnorm(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[M, 2I] bf16 (gate | up) -> silu(gate) * up, [M, I] bf16, rounded as the decoder's bf16 ops round."""
    load()
    return torch.ops.q8chat.silu_mul(gate_up)


def rope_attend(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    n_heads: int,
) -> torch.Tensor:
    """One decode step's attention (csrc/decode.cpp): RoPE on q|k of ``qkv`` [1, (H + 2 KV) d] bf16 (``sin``
    with its first half negated), k and v written to the float32 caches [KV, max_len, d] at ``pos``, softmax
    attention over positions 0..pos in float32 -> [1, H d] bf16."""
    load()
    return torch.ops.q8chat.rope_attend(qkv, cos, sin, k_cache, v_cache, pos, n_heads)


def rope_rows(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    n_heads: int,
) -> torch.Tensor:
    """A prefill's RoPE (csrc/decode.cpp): ``qkv`` [M, (H + 2 KV) d] bf16 at positions start.., ``cos`` / ``sin``
    [M, d] (``sin`` with its first half negated); rotated k and v written to the bf16 caches [KV, max_len, d];
    returns the rotated queries [H, M, d] bf16. The decoder's elementwise rounding, bit for bit."""
    load()
    return torch.ops.q8chat.rope_rows(qkv, cos, sin, k_cache, v_cache, start, n_heads)


def pack_vnni(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int8 weight [N, K] as ``gemv_w8a8`` reads it: ([N/16, K/4, 16, 4] int8 zero-padded, 128 * row sums int32)."""
    n, k = weight.shape
    n_pad, k_pad = -n % 16, -k % 4
    w = torch.nn.functional.pad(weight, (0, k_pad, 0, n_pad))
    packed = w.view((n + n_pad) // 16, 16, (k + k_pad) // 4, 4).permute(0, 2, 1, 3).contiguous()
    comp = w.sum(1, dtype=torch.int32) * 128
    return packed, comp.to(torch.int32)


def unpack_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The plain int8 weight [N, K] back from ``pack_vnni``'s layout."""
    nb, kg = packed.shape[0], packed.shape[1]
    return packed.permute(0, 2, 1, 3).reshape(nb * 16, kg * 4)[:n, :k].contiguous()


def gemv_w8a8(
    x: torch.Tensor,
    packed: torch.Tensor,
    comp: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    static_scale: float = 0.0,
) -> torch.Tensor:
    """One token [1, K] through a W8A8 linear: BF16 [1, N] with quant/reference.py's numerics.

    The row is quantized per token (``static_scale`` 0) or with the calibrated scale, accumulated
    exactly in int32 (AVX512-VNNI), then ``(acc * x_scale) * w_scale + bias`` in float32.
    """
    load()
    return torch.ops.q8chat.gemv_w8a8(x, packed, comp, w_scale, bias, static_scale, n)
