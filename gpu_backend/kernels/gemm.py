"""8-bit GEMMs with the dequantization fused in the epilogue: C = (A @ W^T) * a_scale[m] * w_scale[n].

A is [M, K] (int8 or fp8 with one scale per row, or bf16 for weight-only), W is [N, K] as the
checkpoint stores it (int8 or fp8 with one scale per output channel). One Triton kernel, two
families of tile shapes:

- small M (decode, M <= 64): weight streaming. Narrow N tiles give every SM several programs so
  enough weight bytes are in flight to reach the memory bandwidth; the tiny A tile stays in L1/L2.
- large M (prefill): tensor-core tiles. For FP8 at large M ``torch._scaled_mm`` (cuBLASLt with
  row-wise scales) measured fastest on H100/H200, so ``scaled_mm`` routes there; INT8 stays here
  (``torch._int_mm`` gains nothing at large M and would need a separate epilogue pass).

Tile shapes are chosen per (kind, M bucket, N, K) by timing a short candidate list once, before any
CUDA graph is captured (``tune_cache`` holds the winners). Under TRITON_INTERPRET a fixed small
tile is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gpu_backend.kernels import enter, use_pdl
from gpu_backend.kernels.act_quant import quant_code, quant_scale, quant_values


class Fusion(NamedTuple):
    """What a GEMM does besides (A @ W^T) * scales, so that the elementwise kernels between the decode
    GEMMs disappear (each is a launch and a dependent wait in a step of ~300 kernels):

    - ``quant_in`` (int8 / fp8): A arrives in bf16 and is quantized per token on load, with the scale
      ``max(amax, 1e-6) / qmax`` from ``in_scale`` = the row amax its producer accumulated, or the static
      input scale when ``static_in`` (the numerics of act_quant.norm_quant, bit for bit);
    - ``silu``: W's rows are interleaved gate_0 up_0 gate_1 up_1 ...; the output is silu(gate) * up [M, N/2]
      in bf16, and each row's amax is accumulated into ``amax_out`` (zeroed by the caller) for the next
      GEMM's ``quant_in``.
    """

    quant_in: torch.dtype | None = None
    in_scale: torch.Tensor | None = None
    static_in: bool = False
    silu: bool = False
    amax_out: torch.Tensor | None = None

    def tag(self) -> str:
        """Part of the tile-table key (empty for a plain GEMM, so the existing keys stay valid)."""
        q = quant_code(self.quant_in)
        return (f"|q{q}{'s' if self.static_in else 'd'}" if q else "") + ("|silu" if self.silu else "")


PLAIN = Fusion()


@triton.jit
def _row_scales(a_scale_ptr, rm_c, QIN: tl.constexpr, STATIC_IN: tl.constexpr):
    """Per-row A scales [BLOCK_M]: loaded, or (QIN) derived from the producer's row amax / the static scale."""
    if QIN == 0:
        return tl.load(a_scale_ptr + rm_c)
    if STATIC_IN:
        return tl.load(a_scale_ptr + rm_c * 0)
    return quant_scale(tl.load(a_scale_ptr + rm_c), QIN)


@triton.jit
def _store_c(c, rm, rn, pid_n, M, N, c_ptr, stride_cm, amax_ptr, SILU: tl.constexpr, ATOMIC: tl.constexpr):
    """Write the scaled tile: plain, split-K partial (atomic add), or silu(gate) * up of interleaved columns
    (with the row amax accumulated for the consumer's input quantization)."""
    if SILU:
        BM: tl.constexpr = c.shape[0]
        HALF: tl.constexpr = c.shape[1] // 2
        # the bf16 rounding points of the unfused path: gate_up stored in bf16, then silu_mul_quant
        gate, up = tl.split(tl.reshape(c.to(tl.bfloat16).to(tl.float32), (BM, HALF, 2)))
        s = (gate / (1.0 + tl.exp(-gate))).to(tl.bfloat16).to(tl.float32)
        y = (s * up).to(tl.bfloat16)
        cols = pid_n * HALF + tl.arange(0, HALF)
        mask = (rm[:, None] < M) & (cols[None, :] < N // 2)
        tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_cm + cols[None, :], y, mask=mask)
        amax = tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0), axis=1)
        tl.atomic_max(amax_ptr + rm, amax, mask=rm < M, sem="relaxed")
    else:
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        cmask = (rm[:, None] < M) & (rn[None, :] < N)
        if ATOMIC:  # split-K: slices add their (already scaled) partial sums into a zeroed fp32 output
            tl.atomic_add(c_ptrs, c, mask=cmask, sem="relaxed")
        else:
            tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=cmask)


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_M = 64  # up to here the weight-streaming tiles are used


@triton.jit
def _gemm_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    amax_ptr,
    M,
    N,
    K,
    k_chunk,
    stride_am,
    stride_wn,
    stride_cm,
    A_SCALED: tl.constexpr,
    INT_ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    QIN: tl.constexpr,
    STATIC_IN: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GDC: tl.constexpr,
):
    enter(GDC)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)  # split-K slice: [pid_k * k_chunk, (pid_k + 1) * k_chunk)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: programs that run together share A rows and W columns in L2
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)  # clamp instead of masking the loads on M and N
    rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    a_ptrs = a_ptr + rm_c[:, None] * stride_am + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rn_c[None, :] * stride_wn + (k_lo + rk)[:, None]  # [BLOCK_K, BLOCK_N] view of W^T

    ACC: tl.constexpr = tl.int32 if INT_ACC else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if A_SCALED:
        a_rows = _row_scales(a_scale_ptr, rm_c, QIN, STATIC_IN)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            kmask = rk < K - k0
            a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        if QIN != 0:
            a = quant_values(a.to(tl.float32), a_rows[:, None], QIN)
        if not A_SCALED:  # weight-only: widen the 8-bit weight to A's dtype (exact for int8 and e4m3)
            w = w.to(a_ptr.dtype.element_ty)
        acc = tl.dot(a, w, acc, out_dtype=ACC)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c = acc.to(tl.float32) * tl.load(w_scale_ptr + rn_c)[None, :]
    if A_SCALED:
        c = c * a_rows[:, None]
    if HAS_BIAS:
        if pid_k == 0:
            c = c + tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    _store_c(c, rm, rn, pid_n, M, N, c_ptr, stride_cm, amax_ptr, SILU, ATOMIC)


@triton.jit
def _gemv_step(
    w,
    a_ptr,
    a_scale_ptr,
    k0,
    rk,
    rm,
    K,
    M,
    stride_am,
    acc,
    ACC: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    QIN: tl.constexpr,
    STATIC_IN: tl.constexpr,
):
    """acc += this K step's products: elementwise [BLOCK_N, BLOCK_K] at M = 1, reduced per row at M > 1.
    QIN: A is bf16, quantized here with its row's scale (a few L1-resident scalars per step)."""
    w = w.to(ACC)
    kmask = rk < K - k0
    if BLOCK_M == 1:
        if EVEN_K:
            a = tl.load(a_ptr + k0 + rk)
        else:
            a = tl.load(a_ptr + k0 + rk, mask=kmask, other=0.0)
        if QIN != 0:
            a = quant_values(a.to(tl.float32), tl.sum(_row_scales(a_scale_ptr, rm, QIN, STATIC_IN), axis=0), QIN)
        acc += w * a.to(ACC)[None, :]
    else:
        for i in tl.static_range(BLOCK_M):
            row = tl.minimum(M - 1, i).to(tl.int64)  # rows past M repeat the last one (not stored)
            if EVEN_K:
                a = tl.load(a_ptr + row * stride_am + k0 + rk)
            else:
                a = tl.load(a_ptr + row * stride_am + k0 + rk, mask=kmask, other=0.0)
            if QIN != 0:
                sc = tl.sum(tl.where(rm == i, _row_scales(a_scale_ptr, tl.minimum(rm, M - 1), QIN, STATIC_IN), 0.0))
                a = quant_values(a.to(tl.float32), sc, QIN)
            part = tl.sum(w * a.to(ACC)[None, :], axis=1)
            acc = tl.where(rm[:, None] == i, acc + part[None, :], acc)
    return acc


@triton.jit
def _load_w(w_ptrs, k0, rk, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs + k0, eviction_policy="evict_first")
    return tl.load(w_ptrs + k0, mask=(rk < K - k0)[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _gemv_kernel(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    bias_ptr,
    c_ptr,
    amax_ptr,
    M,
    N,
    K,
    stride_am,
    stride_wn,
    stride_cm,
    A_SCALED: tl.constexpr,
    INT_ACC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    QIN: tl.constexpr,
    STATIC_IN: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    GDC: tl.constexpr,
):
    """Weight streaming for decode (M <= GEMV_M): each program owns BLOCK_N weight rows and loops over all
    of K with wide contiguous loads; no tensor cores (M is tiny), no split-K, so no zeroed output, no
    atomics and no memset node in the CUDA graph. Everything stays in the weight tile's 2-D layout (a 3-D
    [M, N, K] broadcast made Triton shuffle every tile through shared memory: 1.2-1.6 TB/s on H200).
    M = 1 accumulates elementwise and reduces over K once at the end; M > 1 reduces each step per row.
    The first weight tile is requested before waiting for the previous kernel (PDL): weights never depend
    on it, so the stream starts during the predecessor's tail."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    rm_c = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_c = tl.where(rn < N, rn, 0).to(tl.int64)
    w_ptrs = w_ptr + rn_c[:, None] * stride_wn + rk[None, :]  # [BLOCK_N, BLOCK_K], K contiguous
    ACC: tl.constexpr = tl.int32 if INT_ACC else tl.float32
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    w_first = _load_w(w_ptrs, 0, rk, K, EVEN_K)
    enter(GDC)
    acc = _gemv_step(w_first, a_ptr, a_scale_ptr, 0, rk, rm, K, M, stride_am, acc, ACC, EVEN_K, BLOCK_M, QIN, STATIC_IN)
    for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=NUM_STAGES):
        w = _load_w(w_ptrs, k0, rk, K, EVEN_K)
        acc = _gemv_step(w, a_ptr, a_scale_ptr, k0, rk, rm, K, M, stride_am, acc, ACC, EVEN_K, BLOCK_M, QIN, STATIC_IN)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[None, :]

    c = acc.to(tl.float32) * tl.load(w_scale_ptr + rn_c)[None, :]
    if A_SCALED:
        c = c * _row_scales(a_scale_ptr, rm_c, QIN, STATIC_IN)[:, None]
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + rn_c).to(tl.float32)[None, :]
    _store_c(c, rm, rn, pid, M, N, c_ptr, stride_cm, amax_ptr, SILU, False)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); BLOCK_M is raised to cover M when small.
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, SPLIT_K).
# Small M: the weight tile must dwarf the (redundant, L2-resident) activation tile, so BLOCK_M = 16 and
# wide N tiles; split-K then restores the parallelism that wide tiles take away (N = 4096 / 128 is
# only 32 programs). Measured on H200: 64-row tiles re-read A 64 times and ran at ~1 TB/s.
SMALL_M_CANDIDATES = [
    (16, bn, bk, 1, 4, st, sk) for bn, bk, st in ((64, 256, 4), (128, 128, 4), (128, 256, 3)) for sk in (1, 2, 4, 8)
] + [(16, 32, 512, 1, 4, 3, 1), (16, 32, 256, 1, 4, 4, 1), (16, 32, 256, 1, 4, 4, 2), (16, 64, 512, 1, 4, 3, 1)]
LARGE_M_CANDIDATES = [
    (128, 128, 128, 8, 8, 3, 1),
    (128, 256, 128, 8, 8, 3, 1),
    (64, 128, 128, 8, 4, 4, 1),
    (128, 128, 64, 8, 4, 4, 1),
]
# Decode (M <= GEMV_M): the weight-streaming GEMV, ("gemv", BLOCK_N, BLOCK_K, num_warps, num_stages). Narrow
# N slices give every SM several programs (N = 4096 / 4 = 1024 programs), each streaming its rows over all
# of K in 8-32 KB steps, so enough bytes are in flight without split-K.
GEMV_M = 4
GEMV_CANDIDATES = [
    ("gemv", bn, bk, w, st)
    for bn, bk, w, st in (
        (1, 2048, 2, 1),
        (1, 4096, 4, 1),
        (2, 1024, 2, 2),
        (2, 2048, 4, 1),
        (2, 4096, 4, 1),
        (4, 1024, 4, 3),
        (4, 2048, 4, 1),
        (4, 2048, 4, 2),
        (4, 4096, 4, 1),
        (4, 4096, 8, 1),
        (8, 512, 4, 2),
        (8, 1024, 4, 2),
        (8, 2048, 8, 1),
        (8, 2048, 8, 2),
        (16, 1024, 8, 2),
    )
]
INTERPRET_CONFIG = (16, 16, 32, 1, 1, 1, 1)
INTERPRET_GEMV_CONFIG = ("gemv", 4, 32, 1, 1)
INTERPRET_SPLIT_CONFIG = (16, 16, 32, 1, 1, 1, 2)  # tests the split-K path in the interpreter

tune_cache: dict[str, tuple] = {}
FORCE_GEMV: bool | None = None  # tests: True/False forces the interpreter's pick; None: GEMV for M <= GEMV_M


def is_gemv(cfg) -> bool:
    return cfg[0] == "gemv"


def m_bucket(m: int) -> int:
    # M = 1 and M <= 4 have their own buckets: the GEMV competes there (Triton also specializes M = 1)
    if m <= GEMV_M:
        return 1 if m == 1 else GEMV_M
    return 16 if m <= 16 else (32 if m <= 32 else (64 if m <= 64 else (256 if m <= 256 else 1024)))


def _fusion_args(a, a_scale, w_scale, fusion: Fusion) -> dict:
    """The kernels' A-scale pointer, accumulator type and fusion switches."""
    qin = quant_code(fusion.quant_in)
    if qin:
        assert a_scale is None and fusion.in_scale is not None and a.dtype == torch.bfloat16
        a_scale = fusion.in_scale
    return dict(
        a_scale=a_scale if a_scale is not None else w_scale,
        amax=fusion.amax_out if fusion.silu else w_scale,
        A_SCALED=a_scale is not None,
        INT_ACC=(fusion.quant_in or a.dtype) == torch.int8,
        QIN=qin,
        STATIC_IN=fusion.static_in,
        SILU=fusion.silu,
    )


def _launch_gemv(a, a_scale, w, w_scale, bias, c, cfg, fusion: Fusion = PLAIN) -> None:
    _, bn, bk, warps, stages = cfg
    m, k = a.shape
    n = w.shape[0]
    f = _fusion_args(a, a_scale, w_scale, fusion)
    _gemv_kernel[(triton.cdiv(n, bn),)](
        a,
        f["a_scale"],
        w,
        w_scale,
        bias if bias is not None else w_scale,
        c,
        f["amax"],
        m,
        n,
        k,
        a.stride(0),
        w.stride(0),
        c.stride(0),
        A_SCALED=f["A_SCALED"],
        INT_ACC=f["INT_ACC"],
        HAS_BIAS=bias is not None,
        EVEN_K=k % bk == 0,
        QIN=f["QIN"],
        STATIC_IN=f["STATIC_IN"],
        SILU=f["SILU"],
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=bn,
        BLOCK_K=bk,
        NUM_STAGES=stages,
        GDC=use_pdl(a),
        num_warps=warps,
        launch_pdl=use_pdl(a),
    )


def _launch(a, a_scale, w, w_scale, bias, c, cfg, fusion: Fusion = PLAIN) -> None:
    if is_gemv(cfg):
        _launch_gemv(a, a_scale, w, w_scale, bias, c, cfg, fusion)
        return
    bm, bn, bk, gm, warps, stages, split = cfg
    assert not (fusion.silu and split > 1), "the silu epilogue needs whole sums (no split-K)"
    m, k = a.shape
    n = w.shape[0]
    k_chunk = triton.cdiv(triton.cdiv(k, split), bk) * bk
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, k_chunk))
    f = _fusion_args(a, a_scale, w_scale, fusion)
    _gemm_kernel[grid](
        a,
        f["a_scale"],
        w,
        w_scale,
        bias if bias is not None else w_scale,
        c,
        f["amax"],
        m,
        n,
        k,
        k_chunk,
        a.stride(0),
        w.stride(0),
        c.stride(0),
        A_SCALED=f["A_SCALED"],
        INT_ACC=f["INT_ACC"],
        HAS_BIAS=bias is not None,
        EVEN_K=k % bk == 0,
        ATOMIC=split > 1,
        QIN=f["QIN"],
        STATIC_IN=f["STATIC_IN"],
        SILU=f["SILU"],
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_K=bk,
        GROUP_M=gm,
        GDC=use_pdl(a),
        num_warps=warps,
        num_stages=stages,
        launch_pdl=use_pdl(a),
    )


def _run(a, a_scale, w, w_scale, bias, cfg, out=None, fusion: Fusion = PLAIN) -> torch.Tensor:
    """Launch one config; split-K writes a zeroed fp32 output (consumers read fp32 or bf16 alike)."""
    m, n = a.shape[0], w.shape[0] // (2 if fusion.silu else 1)
    if not is_gemv(cfg) and cfg[-1] > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    elif out is None:
        out = torch.empty((m, n), dtype=torch.bfloat16, device=a.device)
    _launch(a, a_scale, w, w_scale, bias, out, cfg, fusion)
    return out


def _candidates(m: int, k: int, allow_split: bool, silu: bool = False) -> list[tuple]:
    gemv = [c for c in GEMV_CANDIDATES if c[2] <= max(256, triton.next_power_of_2(k))] if m <= GEMV_M else []
    if silu:  # a program's columns must hold whole gate/up pairs
        gemv = [c for c in gemv if c[1] >= 2]
    return gemv + _tile_candidates(m, k, allow_split)


def _tile_candidates(m: int, k: int, allow_split: bool) -> list[tuple]:
    if m <= SMALL_M:  # cover M in one row tile: 16-row tiles at M = 64 re-read the weights 4 times
        bm = max(16, triton.next_power_of_2(m))
        cands = [
            (bm, bn, bk, gm, w, st if bm == 16 else min(st, 3), sk) for _, bn, bk, gm, w, st, sk in SMALL_M_CANDIDATES
        ]
    else:
        cands = list(LARGE_M_CANDIDATES)
    ok = [
        c
        for c in cands
        if c[2] <= max(32, triton.next_power_of_2(k)) and (allow_split or c[-1] == 1) and triton.cdiv(k, c[2]) >= c[-1]
    ]
    if not ok:  # tiny K (test models): one narrow tile
        bm = max(16, triton.next_power_of_2(min(m, 64)))
        ok = [(bm, 64, max(16, min(64, triton.next_power_of_2(k))), 1, 4, 2, 1)]
    return ok


def table_key(a_dtype, w_dtype, m: int, n: int, k: int, has_bias: bool, allow_split: bool) -> str:
    return (
        f"{str(a_dtype).split('.')[-1]}|{str(w_dtype).split('.')[-1]}|{m_bucket(m)}|{n}|{k}|{int(has_bias)}|"
        f"{int(allow_split)}"
    )


def _table() -> dict[str, list]:
    """Measured tiles for this GPU model (``tiles.json``: device name -> key -> config), written by
    ``bench/gpu_latency.py --write-tiles`` from a tuning run: the same shape gets the same tile every run."""
    global _TABLE
    if _TABLE is None:
        try:
            _TABLE = json.loads(TILE_TABLE.read_text()).get(torch.cuda.get_device_name(), {})
        except (OSError, ValueError):
            _TABLE = {}
    return _TABLE


_TABLE: dict[str, list] | None = None
TILE_TABLE = Path(__file__).with_name("tiles.json")
USE_TABLE = os.environ.get("Q8CHAT_GPU_TUNE") != "1"  # 1: ignore the table and time candidates


def _time(fn, rep: int) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def weight_copies(w: torch.Tensor, min_bytes: int = 160 << 20, most: int = 16) -> list[torch.Tensor]:
    """``w`` and enough copies of it that cycling through them reads from HBM, not L2 (60 MB on H200)."""
    n = max(2, min(most, -(-min_bytes // max(1, w.numel() * w.element_size()))))
    return [w] + [w.clone() for _ in range(n - 1)]


def time_in_graph(fns: list, reps: int = 10, rounds: int = 5) -> float:
    """Median ms of one call, timed as CUDA-graph replays of ``reps`` passes over ``fns`` (each fn the same
    work on its own weight copy): no launch overhead and no L2 reuse, as inside the decode graph (do_bench
    times each Triton launch from Python, ~10 us of host time, which hid the differences between decode
    kernels of 5-15 us)."""
    for f in fns:  # compile and warm outside the capture
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    times = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / (reps * len(fns)))
    del graph
    return sorted(times)[len(times) // 2]


def _pick(a, a_scale, w, w_scale, bias, allow_split: bool, fusion: Fusion = PLAIN) -> tuple:
    if INTERPRET or not a.is_cuda:
        if FORCE_GEMV or (a.shape[0] <= GEMV_M and FORCE_GEMV is None):
            return INTERPRET_GEMV_CONFIG
        return INTERPRET_SPLIT_CONFIG if allow_split and a.shape[1] >= 64 else INTERPRET_CONFIG
    m, k = a.shape
    a_dtype = fusion.quant_in or a.dtype
    key = table_key(a_dtype, w.dtype, m, w.shape[0], k, bias is not None, allow_split) + fusion.tag()
    cfg = tune_cache.get(key)
    if cfg is None and USE_TABLE and key in _table():
        cfg = tune_cache[key] = tuple(_table()[key])
    if cfg is None:
        cands = _candidates(m, k, allow_split, fusion.silu)
        if fusion.silu:  # timing runs accumulate into a scratch amax, not the caller's
            fusion = fusion._replace(amax_out=torch.zeros_like(fusion.amax_out))
        try:  # in-graph timing over weight copies (what a decode step sees)
            ws = weight_copies(w)

            def fns(c):
                return [lambda c=c, wc=wc: _run(a, a_scale, wc, w_scale, bias, c, fusion=fusion) for wc in ws]

            timed = []
            for cand in cands:
                try:
                    timed.append((time_in_graph(fns(cand)), cand))
                except Exception:  # a config that does not compile or fit in shared memory: skip it
                    torch.cuda.synchronize()
                    continue
            # second round: the best three again, longer
            finals = sorted(
                ((time_in_graph(fns(c), reps=20, rounds=7), c) for _, c in sorted(timed, key=lambda tc: tc[0])[:3]),
                key=lambda tc: tc[0],
            )
            del ws
        except torch.cuda.OutOfMemoryError:
            finals = []
        if not finals:
            # two rounds: every candidate briefly, then the best three again for longer (a single short
            # do_bench per candidate picked a 4x slower tile now and then)
            timed = []
            for cand in cands:
                try:
                    timed.append(
                        (_time(lambda cand=cand: _run(a, a_scale, w, w_scale, bias, cand, fusion=fusion), 25), cand)
                    )
                except Exception:  # a config that does not compile or fit in shared memory: skip it
                    continue
            if not timed:
                raise RuntimeError(f"no GEMM tile compiled for {key}")
            finals = sorted(
                (
                    (
                        min(
                            _time(lambda c=c: _run(a, a_scale, w, w_scale, bias, c, fusion=fusion), 60)
                            for _ in range(2)
                        ),
                        c,
                    )
                    for _, c in sorted(timed, key=lambda tc: tc[0])[:3]
                ),
                key=lambda tc: tc[0],
            )
        cfg = tune_cache[key] = finals[0][1]
    return cfg


def gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    fusion: Fusion = PLAIN,
) -> torch.Tensor:
    """(A @ W^T) * a_scale[:, None] * w_scale[None, :] (+ bias). a_scale None: weight-only (A in bf16), or A
    quantized on load (``fusion.quant_in``). ``fusion.silu``: silu(gate) * up of interleaved rows, [M, N/2].

    Returns bf16, or float32 when the tuner chose split-K (small M) and neither ``out`` nor
    ``out_dtype`` fixes the dtype (never with the silu epilogue).
    """
    assert a.dim() == 2 and w.dim() == 2 and a.shape[1] == w.shape[1], (a.shape, w.shape)
    assert a.stride(1) == 1 and w.stride(1) == 1
    w_scale = w_scale.reshape(-1)
    if a_scale is not None:
        a_scale = a_scale.reshape(-1)
    if fusion.in_scale is not None:
        fusion = fusion._replace(in_scale=fusion.in_scale.reshape(-1))
    n_out = w.shape[0] // (2 if fusion.silu else 1)
    if out is None and (out_dtype is not None or fusion.silu):
        out = torch.empty((a.shape[0], n_out), dtype=out_dtype or torch.bfloat16, device=a.device)
    allow_split = (out is None or out.dtype == torch.float32) and not fusion.silu
    if a.shape[0] == 0:
        return out if out is not None else torch.empty((0, n_out), dtype=torch.bfloat16, device=a.device)
    cfg = _pick(a, a_scale, w, w_scale, bias, allow_split, fusion)
    if not is_gemv(cfg) and cfg[-1] > 1 and out is not None:
        out.zero_()
        _launch(a, a_scale, w, w_scale, bias, out, cfg, fusion)
        return out
    return _run(a, a_scale, w, w_scale, bias, cfg, out, fusion)


def scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """FP8 x FP8 with row-wise scales through cuBLASLt (the large-M FP8 path)."""
    return torch._scaled_mm(
        a, w.t(), scale_a=a_scale.reshape(-1, 1), scale_b=w_scale.reshape(1, -1), bias=bias, out_dtype=torch.bfloat16
    )


def w8a8(a, a_scale, w, w_scale, bias=None, out=None, large_m_fp8_cublas: bool = True) -> torch.Tensor:
    """The W8A8 dispatcher: the Triton kernel, except FP8 at large M where cuBLASLt wins."""
    if (
        large_m_fp8_cublas
        and a.shape[0] > SMALL_M
        and a.dtype == torch.float8_e4m3fn
        and a.is_cuda
        and not INTERPRET
        and out is None
    ):
        return scaled_mm(a, a_scale, w, w_scale, bias)
    return gemm(a, a_scale, w, w_scale, bias, out)
