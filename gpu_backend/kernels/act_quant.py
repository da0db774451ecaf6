"""Per-token activation quantization, fused with the residual add and RMSNorm where the graph allows.

One kernel does ``x += residual`` (written back), ``y = rmsnorm(x) * w`` and ``q, scale = quant(y)``
per row; each stage is a compile-time switch, so the same kernel also serves the BF16 path (no
quantization) and the bare quantization of the attention output. ``silu_mul_quant`` does the MLP's
``silu(gate) * up`` and quantizes it in the same pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_backend.kernels import enter, use_pdl

# QUANT codes (compile-time): what the kernel writes.
NONE, INT8, FP8 = 0, 1, 2
FP8_MAX = 448.0
INT8_MAX = 127.0
AMAX_EPS = 1e-6  # quant.reference.AMAX_EPS: scale = max(amax, eps) / qmax


def quant_code(dtype: torch.dtype | None) -> int:
    if dtype is None or dtype in (torch.bfloat16, torch.float16, torch.float32):
        return NONE
    if dtype == torch.int8:
        return INT8
    if dtype == torch.float8_e4m3fn:
        return FP8
    raise ValueError(f"no activation quantization to {dtype}")


@triton.jit
def _round_half_even(v):
    """torch.round (half to even) of fp32 values, as quant.reference rounds int8."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_row(y, mask, out_ptr, scale_ptr, static_scale_ptr, row, QUANT: tl.constexpr, STATIC: tl.constexpr):
    """Write y (fp32 row) as int8/fp8 with one scale per row (dynamic, or a static input_scale).

    Numerics of quant.reference: scale = max(amax, 1e-6) / qmax, IEEE division, clamp, int8 rounds half
    to even, fp8 is a round-to-nearest cast."""
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        scale = quant_scale(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), QUANT)
    tl.store(out_ptr + tl.arange(0, y.shape[0]), quant_values(y, scale, QUANT), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def quant_scale(amax, QUANT: tl.constexpr):
    """Per-token scale from a row's amax (fp32, scalar or tensor): max(amax, 1e-6) / qmax, IEEE division."""
    qmax = 127.0 if QUANT == 1 else 448.0
    return tl.math.div_rn(tl.maximum(amax, 1e-6), tl.zeros_like(amax) + qmax)


@triton.jit
def quant_values(y, scale, QUANT: tl.constexpr):
    """fp32 values / scale (broadcast) as int8 (QUANT 1: round half to even) or e4m3 (2: round-to-nearest cast),
    clamped to +-qmax: the numerics of quant.reference, shared by this module and the GEMMs that quantize their
    input on load."""
    qmax = 127.0 if QUANT == 1 else 448.0
    v = tl.math.div_rn(y, tl.zeros_like(y) + scale)
    if QUANT == 1:
        v = _round_half_even(v)
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    if QUANT == 1:
        return v.to(tl.int8)
    return v.to(tl.float8e4nv)


@triton.jit
def _norm_quant_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    scale_ptr,
    static_scale_ptr,
    K,
    stride_x,
    stride_r,
    stride_o,
    eps,
    HAS_RES: tl.constexpr,
    HAS_NORM: tl.constexpr,
    QUANT: tl.constexpr,
    STATIC: tl.constexpr,
    BLOCK: tl.constexpr,
    GDC: tl.constexpr,
):
    enter(GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # the residual branch may arrive in fp32 (split-K GEMM): the model rounds it to bf16 first
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
        x = x + r
        x = x.to(x_ptr.dtype.element_ty)  # the residual stream is kept in bf16, as in the reference
        tl.store(x_ptr + row * stride_x + offs, x, mask=mask)
        x = x.to(tl.float32)
    y = x
    if HAS_NORM:
        var = tl.sum(x * x, axis=0) / K
        inv = tl.math.div_rn(var * 0.0 + 1.0, tl.math.sqrt_rn(var + eps))  # IEEE 1/sqrt, as torch on the CPU
        y = (x * inv).to(tl.bfloat16).to(tl.float32)
        y = y * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT == 0:
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        y = y.to(tl.bfloat16).to(tl.float32)  # quantize what the BF16 model would have fed the linear
        _quantize_row(y, mask, out_ptr + row * stride_o, scale_ptr, static_scale_ptr, row, QUANT, STATIC)


@triton.jit
def _silu_mul_quant_kernel(
    gu_ptr,
    out_ptr,
    scale_ptr,
    static_scale_ptr,
    n_inter,
    stride_g,
    stride_o,
    QUANT: tl.constexpr,
    STATIC: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK: tl.constexpr,
    GDC: tl.constexpr,
):
    enter(GDC)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_inter
    # gate_up columns are gate | up, or interleaved gate_0 up_0 gate_1 up_1 ... (the layout whose GEMM
    # epilogue can pair them); they may arrive in fp32 (split-K GEMM): the model's projections return bf16
    if INTERLEAVED:
        g_off, u_off = 2 * offs, 2 * offs + 1
    else:
        g_off, u_off = offs, n_inter + offs
    g = tl.load(gu_ptr + row * stride_g + g_off, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + u_off, mask=mask, other=0.0).to(tl.bfloat16).to(tl.float32)
    # bf16 rounding points follow F.silu(gate) * up in bf16
    s = (g / (1.0 + tl.exp(-g))).to(tl.bfloat16).to(tl.float32)
    y = (s * u).to(tl.bfloat16).to(tl.float32)
    if QUANT == 0:
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _quantize_row(y, mask, out_ptr + row * stride_o, scale_ptr, static_scale_ptr, row, QUANT, STATIC)


def _warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _outputs(x: torch.Tensor, k: int, qdtype, out, scale):
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, k), dtype=qdtype or torch.bfloat16, device=x.device)
    if scale is None:
        scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    return out, scale


def norm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    qdtype: torch.dtype | None = None,
    static_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16 (updated in place to x + residual when given) -> (rmsnorm(x)*w quantized, scale [M])."""
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    out, scale = _outputs(x, k, qdtype, out, scale)
    block = triton.next_power_of_2(k)
    _norm_quant_kernel[(m,)](
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        out,
        scale,
        static_scale if static_scale is not None else scale,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        eps,
        HAS_RES=residual is not None,
        HAS_NORM=weight is not None,
        QUANT=quant_code(qdtype),
        STATIC=static_scale is not None,
        BLOCK=block,
        GDC=use_pdl(x),
        num_warps=_warps(block),
        launch_pdl=use_pdl(x),
    )
    return out, scale


def silu_mul_quant(
    gate_up: torch.Tensor,
    qdtype: torch.dtype | None = None,
    static_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [M, 2I] (gate | up, or gate_0 up_0 gate_1 up_1 ... when ``interleaved``) -> (silu(gate) * up
    quantized [M, I], scale [M])."""
    assert gate_up.dim() == 2 and gate_up.stride(1) == 1 and gate_up.shape[1] % 2 == 0
    m, i = gate_up.shape[0], gate_up.shape[1] // 2
    out, scale = _outputs(gate_up, i, qdtype, out, scale)
    block = triton.next_power_of_2(i)
    _silu_mul_quant_kernel[(m,)](
        gate_up,
        out,
        scale,
        static_scale if static_scale is not None else scale,
        i,
        gate_up.stride(0),
        out.stride(0),
        QUANT=quant_code(qdtype),
        STATIC=static_scale is not None,
        INTERLEAVED=interleaved,
        BLOCK=block,
        GDC=use_pdl(gate_up),
        num_warps=_warps(block),
        launch_pdl=use_pdl(gate_up),
    )
    return out, scale
