"""RoPE + KV-cache write, and split-KV decode attention over a static (bf16, fp8 or int8) cache.

The cache is [batch, kv_heads, max_len, head_dim] per layer; positions and sequence lengths live in
device tensors, so one CUDA graph per batch size serves every step. An 8-bit cache stores
``k / k_scale[head]`` (the quantizer's per-head scales); the decode kernel folds the scales into the
softmax scale (keys) and the output (values), so it reads 1 byte per element and widens in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_backend.kernels import enter, use_pdl
from gpu_backend.kernels.act_quant import _round_half_even


@triton.jit
def _to_cache(x, dst, scale, QUANT: tl.constexpr, mask=None):
    """Store key/value elements (fp32) in the cache: /scale, rounded and clamped for an 8-bit cache. Returns
    what was stored."""
    if QUANT != 0:  # quant.reference.fake_quant_kv: IEEE division, int8 rounds half to even, clamp
        qmax = 127.0 if QUANT == 1 else 448.0
        x = tl.math.div_rn(x, tl.zeros_like(x) + scale)
        if QUANT == 1:
            x = _round_half_even(x)
        x = tl.minimum(tl.maximum(x, -qmax), qmax)
    x = x.to(dst.dtype.element_ty)
    tl.store(dst, x, mask=mask)
    return x


@triton.jit
def _rope_cache_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    rows,
    T,
    stride_row,
    n_heads,
    n_kv,
    stride_cb,
    stride_ch,
    stride_cs,
    HALF: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GDC: tl.constexpr,
):
    """Program (BLOCK_R token rows, one head among q|k|v): RoPE in place on q and k; k and v go to the cache.
    With an 8-bit cache, k and v in ``qkv`` are replaced by what the cache holds, dequantized (bf16), so that
    the prefill attention reads them from there instead of dequantizing the cache in a pass of its own."""
    enter(GDC)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    r = tl.where(rmask, r, 0).to(tl.int64)[:, None]
    head = tl.program_id(1)
    pos = tl.load(pos_ptr + r).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    mask = rmask[:, None]
    base = qkv_ptr + r * stride_row + head * (2 * HALF)
    x1 = tl.load(base + d).to(tl.bfloat16).to(tl.float32)  # the model's qkv is bf16 (identity there)
    x2 = tl.load(base + HALF + d).to(tl.bfloat16).to(tl.float32)
    if head < n_heads + n_kv:
        # the model's bf16 rounding points: cos/sin in bf16, q*cos and rotate_half(q)*sin rounded, then the sum
        c = tl.load(cos_ptr + pos * HALF + d).to(tl.bfloat16).to(tl.float32)
        s = tl.load(sin_ptr + pos * HALF + d).to(tl.bfloat16).to(tl.float32)
        a1 = (x1 * c).to(tl.bfloat16).to(tl.float32)
        b1 = (-x2 * s).to(tl.bfloat16).to(tl.float32)
        a2 = (x2 * c).to(tl.bfloat16).to(tl.float32)
        b2 = (x1 * s).to(tl.bfloat16).to(tl.float32)
        x1, x2 = (a1 + b1).to(tl.bfloat16).to(tl.float32), (a2 + b2).to(tl.bfloat16).to(tl.float32)
        if head < n_heads or QUANT == 0:
            tl.store(base + d, x1.to(qkv_ptr.dtype.element_ty), mask=mask)
            tl.store(base + HALF + d, x2.to(qkv_ptr.dtype.element_ty), mask=mask)
    if head >= n_heads:
        b = r // T
        if head < n_heads + n_kv:
            kvh = head - n_heads
            dst = kc_ptr + b * stride_cb + kvh * stride_ch + pos * stride_cs
            sc = tl.load(k_scale_ptr + kvh)
        else:
            kvh = head - n_heads - n_kv
            dst = vc_ptr + b * stride_cb + kvh * stride_ch + pos * stride_cs
            sc = tl.load(v_scale_ptr + kvh)
        c1 = _to_cache(x1, dst + d, sc, QUANT, mask)
        c2 = _to_cache(x2, dst + HALF + d, sc, QUANT, mask)
        if QUANT != 0:  # what the cache holds, as the reference attends to it: float(q) * scale, in bf16
            y1 = (c1.to(tl.float32) * sc).to(tl.bfloat16)
            y2 = (c2.to(tl.float32) * sc).to(tl.bfloat16)
            tl.store(base + d, y1.to(qkv_ptr.dtype.element_ty), mask=mask)
            tl.store(base + HALF + d, y2.to(qkv_ptr.dtype.element_ty), mask=mask)


def rope_and_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    n_heads: int,
    n_kv: int,
    tokens_per_seq: int,
) -> None:
    """qkv [B*T, (H + 2*KV) * D] bf16 (rows b-major): rotate q, k in place; store k, v at cache[b, :, pos];
    with an 8-bit cache, k and v in qkv become the cache's dequantized values (read by the prefill attention)."""
    rows, width = qkv.shape
    half = cos.shape[1]
    assert width == (n_heads + 2 * n_kv) * 2 * half and qkv.stride(1) == 1
    from gpu_backend.kernels.act_quant import quant_code

    block_r = min(16, triton.next_power_of_2(rows))
    _rope_cache_kernel[(triton.cdiv(rows, block_r), n_heads + 2 * n_kv)](
        qkv,
        positions,
        cos,
        sin,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        rows,
        tokens_per_seq,
        qkv.stride(0),
        n_heads,
        n_kv,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        HALF=half,
        QUANT=quant_code(k_cache.dtype),
        BLOCK_R=block_r,
        GDC=use_pdl(qkv),
        num_warps=2 if block_r * half >= 512 else 1,
        launch_pdl=use_pdl(qkv),
    )


@triton.jit
def _decode_split_kernel(
    q_ptr,
    kc_ptr,
    vc_ptr,
    k_scale_ptr,
    v_scale_ptr,
    seq_ptr,
    o_ptr,
    ml_ptr,
    out_ptr,
    amax_ptr,
    stride_qb,
    stride_cb,
    stride_ch,
    stride_cs,
    stride_ob,
    sm_scale,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLITS: tl.constexpr,
    SCALED: tl.constexpr,
    AMAX: tl.constexpr,
    GDC: tl.constexpr,
):
    """Program (b, kv head, split): the G query heads sharing this kv head, over one slice of the keys. With one
    split (large batches fill the GPU without splitting) it writes the normalized output itself."""
    enter(GDC)
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_heads = tl.num_programs(1) * G
    seq = tl.load(seq_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq, SPLITS), BLOCK_S) * BLOCK_S
    lo = split * per_split
    hi = tl.minimum(lo + per_split, seq)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # exp2
    if SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kvh)
    m_i = tl.full((G_PAD,), -float("inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, D), tl.float32)
    cache = b * stride_cb + kvh * stride_ch
    s_off = tl.arange(0, BLOCK_S)
    for start in range(lo, hi, BLOCK_S):
        s = start + s_off
        smask = s < hi
        kv_off = cache + s.to(tl.int64)[:, None] * stride_cs + d[None, :]
        # widen to q's dtype (bf16 on the GPU; fp32 in the CPU interpreter, whose bf16 dot is broken)
        k = tl.load(kc_ptr + kv_off, mask=smask[:, None], other=0.0).to(q_ptr.dtype.element_ty)
        v = tl.load(vc_ptr + kv_off, mask=smask[:, None], other=0.0).to(q_ptr.dtype.element_ty)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(smask[None, :], qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q_ptr.dtype.element_ty), v)
        m_i = m_new
    if SCALED:
        acc = acc * tl.load(v_scale_ptr + kvh)
    gm = g < G
    if SPLITS == 1:
        # the merge of one split, o * 1 / (l * 1): the same values as _decode_reduce_kernel writes
        o = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * D + d[None, :], o, mask=gm[:, None])
        if AMAX:
            amax = tl.max(tl.max(tl.where(gm[:, None], tl.abs(o.to(tl.float32)), 0.0), axis=1), axis=0)
            tl.atomic_max(amax_ptr + b, amax, sem="relaxed")
    else:
        # partials: o [B, H, SPLITS, D] (unnormalized), ml [B, H, SPLITS, 2] (running max in log2, sum)
        part = (b * n_heads + heads) * SPLITS + split
        tl.store(o_ptr + part[:, None] * D + d[None, :], acc, mask=gm[:, None])
        tl.store(ml_ptr + part * 2, m_i, mask=gm)
        tl.store(ml_ptr + part * 2 + 1, l_i, mask=gm)


@triton.jit
def _decode_reduce_kernel(
    o_ptr,
    ml_ptr,
    out_ptr,
    amax_ptr,
    stride_ob,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    AMAX: tl.constexpr,
    GDC: tl.constexpr,
):
    """Merge the splits of one (b, head); AMAX: also accumulate the row's amax (the o projection quantizes its
    input on load with it, instead of a quantization kernel of its own)."""
    enter(GDC)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    part = (b * tl.num_programs(1) + h) * SPLITS + tl.arange(0, SPLITS)
    m = tl.load(ml_ptr + part * 2)
    l_ = tl.load(ml_ptr + part * 2 + 1)
    m_max = tl.max(m, axis=0)
    w = tl.where(l_ > 0, tl.exp2(m - m_max), 0.0)
    o = tl.load(o_ptr + part[:, None] * D + tl.arange(0, D)[None, :])
    num = tl.sum(o * w[:, None], axis=0)
    den = tl.sum(l_ * w, axis=0)
    o = (num / den).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + b * stride_ob + h * D + tl.arange(0, D), o)
    if AMAX:
        tl.atomic_max(amax_ptr + b, tl.max(tl.abs(o.to(tl.float32)), axis=0), sem="relaxed")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    seq_lens: torch.Tensor,
    n_heads: int,
    out: torch.Tensor | None = None,
    splits: int = 16,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_s: int = 64,
    amax_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, >= H*D] (row stride free: a view of the qkv buffer) -> out [B, H*D] bf16.

    Attends over cache[b, :, :seq_lens[b]]. ``splits`` (a power of 2) slices the keys so that batch 1 still
    spreads over the SMs (flash-decoding); a second small kernel merges the slices (none with one split).
    ``amax_out`` [B] fp32 (zeroed): each row's amax of ``out`` is accumulated into it.
    """
    assert splits >= 1 and splits & (splits - 1) == 0, splits
    bsz, n_kv, _, d = k_cache.shape
    g = n_heads // n_kv
    assert q.stride(1) == 1 and triton.next_power_of_2(d) == d
    if out is None:
        # bf16 on the GPU even when q arrives in fp32 (a split-K GEMM output)
        out = torch.empty((bsz, n_heads * d), dtype=torch.bfloat16 if q.is_cuda else q.dtype, device=q.device)
    if workspace is None:
        workspace = decode_workspace(bsz, n_heads, d, splits, q.device)
    o_part, ml = workspace
    gdc = use_pdl(q)
    amax = amax_out if amax_out is not None else ml
    _decode_split_kernel[(bsz, n_kv, splits)](
        q,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        seq_lens,
        o_part,
        ml,
        out,
        amax,
        q.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        out.stride(0),
        d**-0.5,
        G=g,
        G_PAD=max(16, triton.next_power_of_2(g)),
        D=d,
        BLOCK_S=block_s,
        SPLITS=splits,
        SCALED=k_cache.dtype in (torch.int8, torch.float8_e4m3fn),
        AMAX=amax_out is not None,
        GDC=gdc,
        num_warps=4,
        num_stages=2,
        launch_pdl=gdc,
    )
    if splits > 1:
        _decode_reduce_kernel[(bsz, n_heads)](
            o_part,
            ml,
            out,
            amax,
            out.stride(0),
            D=d,
            SPLITS=splits,
            AMAX=amax_out is not None,
            GDC=gdc,
            num_warps=1,
            launch_pdl=gdc,
        )
    return out


def decode_splits(bsz: int, n_kv: int, sms: int, most: int = 16) -> int:
    """Key slices per (sequence, kv head) for a decode batch: enough programs for about two per SM (batch 1
    needs 16 slices to spread over the GPU; at batch 32-64 the sequences alone fill it, and every slice adds
    partials to write and merge). A power of 2, 1 to ``most``."""
    want = max(1, min(most, (2 * sms) // max(1, bsz * n_kv)))
    return 1 << (want.bit_length() - 1)


def decode_workspace(bsz: int, n_heads: int, d: int, splits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty((bsz, n_heads, splits, d), dtype=torch.float32, device=device),
        torch.empty((bsz, n_heads, splits, 2), dtype=torch.float32, device=device),
    )
