"""GPU kernels against float references. Without CUDA they run in Triton's CPU interpreter on small
shapes; there bf16 tensor-core dots and int8->bf16 conversion are not emulated correctly by the
interpreter, so the weight-only GEMM and the attention kernels take fp32 activations on the CPU (same
index and scale logic, wider operands)."""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
triton = pytest.importorskip("triton")

from gpu_backend.kernels.act_quant import norm_quant, silu_mul_quant  # noqa: E402
from gpu_backend.kernels.attention import decode_attention, rope_and_cache  # noqa: E402
from gpu_backend.kernels.gemm import gemm, scaled_mm  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
ACT = torch.bfloat16 if CUDA else torch.float32  # activation dtype for weight-only / attention
FP8 = torch.float8_e4m3fn
# the interpreter's float->e4m3 conversion does not round to nearest (errors up to one step): looser there
FP8_TOL = 4e-2 if CUDA else 0.1
fp8_cuda_only = pytest.mark.skipif(not CUDA, reason="interpreter's e4m3 conversion is off by several steps")
needs_fp8 = pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (8, 9), reason="no FP8 on this GPU")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def rms_ref(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).bfloat16().float() * w.float()


@pytest.mark.parametrize("qdtype", [None, torch.int8, FP8])
@pytest.mark.parametrize("with_res", [False, True])
def test_norm_quant(qdtype, with_res):
    torch.manual_seed(0)
    m, k = (3, 200) if not CUDA else (37, 4096)
    x = torch.randn(m, k, device=DEV).bfloat16() * 3
    res = torch.randn(m, k, device=DEV).bfloat16() if with_res else None
    w = (torch.rand(k, device=DEV) + 0.5).bfloat16()
    x_ref = (x.float() + res.float()).bfloat16() if with_res else x
    ref = rms_ref(x_ref, w, 1e-5)
    x_in = x.clone()
    out = torch.full((m, k), 7, dtype=qdtype or torch.bfloat16, device=DEV)  # poisoned
    q, s = norm_quant(x_in, w, 1e-5, residual=res, qdtype=qdtype, out=out)
    deq = q.float() * (s[:, None] if qdtype else 1)
    tol = {None: 1e-2, torch.int8: 1.5e-2, FP8: FP8_TOL}[qdtype]
    assert rel(deq, ref) < tol
    if with_res:
        # exact on the GPU; the interpreter truncates float->bf16 instead of rounding
        assert torch.equal(x_in, x_ref) if CUDA else torch.allclose(x_in.float(), x_ref.float(), rtol=1e-2)
    if qdtype is not None:
        qmax = 127 if qdtype == torch.int8 else 448
        assert torch.allclose(s.cpu(), ref.abs().amax(-1).cpu() / qmax, rtol=1e-2)


@pytest.mark.parametrize("qdtype", [None, torch.int8, FP8])
def test_silu_mul_quant(qdtype):
    torch.manual_seed(1)
    m, i = (2, 96) if not CUDA else (33, 14336)
    gu = torch.randn(m, 2 * i, device=DEV).bfloat16() * 2
    ref = (torch.nn.functional.silu(gu[:, :i].float()).bfloat16() * gu[:, i:]).float()
    q, s = silu_mul_quant(gu, qdtype)
    deq = q.float() * (s[:, None] if qdtype else 1)
    # the product of two gaussians is heavy-tailed: per-token int8 steps are large next to its RMS
    assert rel(deq, ref) < {None: 1e-2, torch.int8: 5e-2, FP8: FP8_TOL}[qdtype]


def test_static_input_scale():
    x = torch.randn(2, 64, device=DEV).bfloat16()
    st = torch.tensor([0.05], device=DEV)
    q, s = norm_quant(x, None, qdtype=torch.int8, static_scale=st)
    assert torch.allclose(s.cpu(), torch.full((2,), 0.05))
    want = (x.float() / 0.05).round().clamp(-127, 127).cpu()
    assert (q.cpu().float() - want).abs().max() <= 1  # ties may round either way (GPU division)


def _shapes():
    if not CUDA:
        return [(1, 48, 64), (5, 40, 80), (17, 64, 96)]
    return [
        (1, 6144, 4096),
        (8, 4096, 14336),
        (33, 1000, 4096),
        (64, 4096, 4096),
        (300, 2048, 1024),
        (1024, 4096, 4096),
    ]


@pytest.mark.parametrize("m,n,k", _shapes())
@pytest.mark.parametrize("wdtype", [torch.int8, pytest.param(FP8, marks=needs_fp8)])
def test_w8a8_gemm(m, n, k, wdtype):
    torch.manual_seed(2)
    if wdtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    else:
        a = torch.randn(m, k, device=DEV).to(FP8)
        w = torch.randn(n, k, device=DEV).to(FP8)
    sa, sw = torch.rand(m, device=DEV) + 0.1, torch.rand(n, 1, device=DEV) + 0.1
    bias = torch.randn(n, device=DEV).bfloat16()
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    c = gemm(a, sa, w, sw, bias=bias, out=out)
    ref = (a.double().cpu() @ w.double().cpu().T) * sa.double().cpu()[:, None] * sw.double().cpu().T + bias.cpu()
    assert rel(c, ref) < 1e-2
    c_free = gemm(a, sa, w, sw, bias=bias)  # free to pick split-K (fp32 output) at small M
    assert rel(c_free, ref) < 1e-2
    if CUDA and wdtype == FP8 and m > 64:
        assert rel(scaled_mm(a, sa, w, sw), ref - bias.cpu()) < 1e-2


@pytest.mark.parametrize("m,n,k", _shapes()[:3])
@pytest.mark.parametrize("wdtype", [torch.int8, pytest.param(FP8, marks=needs_fp8)])
def test_w8a16_gemm(m, n, k, wdtype):
    torch.manual_seed(3)
    a = torch.randn(m, k, device=DEV).to(ACT)
    w = (
        torch.randint(-127, 128, (n, k), device=DEV).to(torch.int8)
        if wdtype == torch.int8
        else torch.randn(n, k, device=DEV).to(FP8)
    )
    sw = torch.rand(n, device=DEV) * 0.01
    c = gemm(a, None, w, sw, out_dtype=ACT)
    ref = (a.double().cpu() @ w.double().cpu().T) * sw.double().cpu()
    assert rel(c, ref) < 1e-2


def rope_ref(x, pos, inv_freq):
    f = torch.outer(pos.double(), inv_freq.double())
    cos, sin = torch.cat([f.cos(), f.cos()], -1), torch.cat([f.sin(), f.sin()], -1)
    x1, x2 = x.double().chunk(2, -1)
    return x.double() * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]


@pytest.mark.parametrize("kv_dtype", [ACT, torch.int8, pytest.param(FP8, marks=[needs_fp8, fp8_cuda_only])])
def test_rope_and_cache(kv_dtype):
    """Prefill RoPE + cache write over several row blocks (26 rows: a masked tail); with an 8-bit cache the k
    and v left in qkv are exactly the cache's dequantized values (what the prefill attention reads)."""
    torch.manual_seed(4)
    bsz, t, h, kv, d, max_len = 2, 13, 4, 2, 16, 40
    qkv = torch.randn(bsz * t, (h + 2 * kv) * d, device=DEV).to(ACT)
    pos = torch.cat([torch.arange(5, 5 + t), torch.arange(t)]).to(torch.int32).to(DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    f = torch.outer(torch.arange(max_len).float(), inv)
    kc = torch.zeros(bsz, kv, max_len, d, dtype=kv_dtype, device=DEV)
    vc = torch.zeros_like(kc)
    ks, vs = torch.rand(kv, device=DEV) * 0.01 + 0.04, torch.rand(kv, device=DEV) * 0.01 + 0.04  # |x| < 5 fits
    orig = qkv.clone().cpu().view(bsz * t, h + 2 * kv, d)
    rope_and_cache(qkv, pos, f.cos().to(DEV), f.sin().to(DEV), kc, vc, ks, vs, h, kv, t)
    got = qkv.cpu().view(bsz * t, h + 2 * kv, d)
    ref = rope_ref(orig[:, : h + kv], pos.cpu(), inv)
    assert rel(got[:, :h], ref[:, :h]) < 2e-2  # bf16 cos/sin and three bf16 roundings per element
    scaled = kv_dtype in (torch.int8, FP8)
    tol = FP8_TOL if kv_dtype == FP8 else 3e-2
    for r in range(bsz * t):
        b, p = r // t, int(pos[r])
        k_ref, v_ref = ref[r, h:], orig[r, h + kv :].double()
        k_got, v_got = kc[b, :, p].float().cpu(), vc[b, :, p].float().cpu()
        if scaled:
            k_got, v_got = k_got * ks.cpu()[:, None], v_got * vs.cpu()[:, None]
            # qkv holds the dequantized cache entries, rounded to bf16 as the reference rounds them (exact on
            # CUDA; the interpreter's fp32 -> bf16 conversion sometimes truncates: one bf16 step there)
            for got_x, want in ((got[r, h : h + kv].float(), k_got), (got[r, h + kv :].float(), v_got)):
                want = want.bfloat16().float()
                assert ((got_x - want).abs() <= (0 if CUDA else 2**-7) * want.abs()).all()
        else:
            assert torch.equal(got[r, h : h + kv].float(), k_got) and torch.equal(got[r, h + kv :], orig[r, h + kv :])
        assert rel(k_got.double(), k_ref) < tol and rel(v_got.double(), v_ref) < tol


@pytest.mark.parametrize("kv_dtype", [ACT, torch.int8, pytest.param(FP8, marks=needs_fp8)])
@pytest.mark.parametrize("h,kv,d", [(4, 2, 16), (3, 1, 32)] if not CUDA else [(32, 8, 128), (9, 3, 64)])
def test_decode_attention(kv_dtype, h, kv, d):
    torch.manual_seed(5)
    bsz, max_len = 3, 40 if not CUDA else 2100
    seq = torch.tensor([1, 17, 33] if not CUDA else [1, 700, 2049], dtype=torch.int32, device=DEV)
    q = torch.randn(bsz, (h + 2 * kv) * d, device=DEV).to(ACT)  # a qkv row: q is its first h*d
    kf = torch.randn(bsz, kv, max_len, d, device=DEV)
    vf = torch.randn(bsz, kv, max_len, d, device=DEV)
    ks = torch.full((kv,), 0.02, device=DEV) if kv_dtype == torch.int8 else torch.full((kv,), 0.5, device=DEV)
    vs = ks.clone()
    if kv_dtype in (torch.int8, FP8):
        qmax = 127 if kv_dtype == torch.int8 else 448
        kc = (kf / ks[None, :, None, None]).clamp(-qmax, qmax)
        vc = (vf / vs[None, :, None, None]).clamp(-qmax, qmax)
        kc, vc = (kc.round(), vc.round()) if kv_dtype == torch.int8 else (kc, vc)
        kc, vc = kc.to(kv_dtype), vc.to(kv_dtype)
        kd, vd = kc.float() * ks[None, :, None, None], vc.float() * vs[None, :, None, None]
    else:
        kc, vc = kf.to(kv_dtype), vf.to(kv_dtype)
        kd, vd = kc.float(), vc.float()
    out = decode_attention(q, kc, vc, ks, vs, seq, h, splits=4 if not CUDA else 16, block_s=16 if not CUDA else 64)
    qh = q[:, : h * d].double().cpu().view(bsz, h, d)
    for b in range(bsz):
        n = int(seq[b])
        kk = kd[b, :, :n].double().cpu().repeat_interleave(h // kv, 0)
        vv = vd[b, :, :n].double().cpu().repeat_interleave(h // kv, 0)
        p = torch.softmax((qh[b, :, None] @ kk.transpose(1, 2)) / d**0.5, -1)
        ref = (p @ vv)[:, 0].reshape(-1)
        assert rel(out[b], ref) < 2e-2, b


@pytest.mark.parametrize("qdtype", [torch.int8, pytest.param(FP8, marks=[needs_fp8, fp8_cuda_only])])
def test_act_quant_bitwise_vs_quant_reference(qdtype):
    """Per-token quantization is bit-exact with quant.reference (scale, round half to even, clamp, e4m3 cast)."""
    from quant.reference import quantize_per_token_fp8, quantize_per_token_int8

    torch.manual_seed(6)
    m, k = (4, 128) if not CUDA else (64, 4096)
    x = (torch.randn(m, k) * 3).bfloat16()
    x[0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])  # scale 1: exact ties, which round to even
    x[1] = 0.0  # an all-zero row: the reference's eps
    ref_q, ref_s = (quantize_per_token_int8 if qdtype == torch.int8 else quantize_per_token_fp8)(x)
    q, s = norm_quant(x.to(DEV), None, qdtype=qdtype)
    assert torch.equal(s.cpu(), ref_s.reshape(-1))
    assert torch.equal(q.cpu().float(), ref_q.float())


@pytest.mark.parametrize("act", ["int", pytest.param("float", marks=[needs_fp8, fp8_cuda_only])])
def test_w8a8_linear_vs_quant_reference(act):
    """Activation quantization + GEMM with fused dequant against quant.reference.QuantLinearRef."""
    from quant.reference import QuantLinearRef, quantize_weight

    torch.manual_seed(7)
    m, n, k = (3, 48, 64) if not CUDA else (5, 1024, 4096)
    x = torch.randn(m, k).bfloat16()
    wq, ws = quantize_weight(torch.randn(n, k) * 0.05, act)
    ref = QuantLinearRef(wq, ws, act)(x)
    q, s = norm_quant(x.to(DEV), None, qdtype=torch.int8 if act == "int" else FP8)
    out = gemm(q, s, wq.to(DEV), ws.to(DEV), out_dtype=torch.bfloat16)
    assert rel(out, ref) < 4e-3  # bf16 output rounding (and fp32 summation order) only


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["int8", "w8a16", pytest.param("fp8", marks=needs_fp8)])
def test_gemv_decode_path(m, kind):
    """The weight-streaming GEMV (decode, M <= GEMV_M) against float64, every config of its candidate list on
    CUDA (the tuner may pick any of them); odd K exercises the masked tail; NaN-poisoned outputs."""
    from gpu_backend.kernels import gemm as G

    torch.manual_seed(8)
    n, k = (40, 200) if not CUDA else (1000, 4160)
    if kind == "int8":
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
        sa = torch.rand(m, device=DEV) + 0.1
    elif kind == "fp8":
        a, w, sa = (
            torch.randn(m, k, device=DEV).to(FP8),
            torch.randn(n, k, device=DEV).to(FP8),
            torch.rand(m, device=DEV),
        )
    else:
        a, w, sa = (
            torch.randn(m, k, device=DEV).to(ACT),
            torch.randint(-127, 128, (n, k), device=DEV).to(torch.int8),
            None,
        )
    sw = torch.rand(n, device=DEV) * 0.01 + 0.001
    bias = torch.randn(n, device=DEV).to(ACT)
    ref = a.double().cpu() @ w.double().cpu().T * sw.double().cpu()
    if sa is not None:
        ref = ref * sa.double().cpu()[:, None]
    ref = ref + bias.double().cpu()
    # every candidate at M = 1 (the decode shape); a few at M > 1 (each config x M is a compile)
    cfgs = (
        (G.GEMV_CANDIDATES if m == 1 else G.GEMV_CANDIDATES[::5])
        if CUDA
        else [G.INTERPRET_GEMV_CONFIG, ("gemv", 8, 64, 1, 1)]
    )
    for cfg in cfgs:
        out = torch.full((m, n), float("nan"), dtype=ACT, device=DEV)
        G._launch(a, sa, w, sw, bias, out, cfg)
        assert rel(out, ref) < 1e-2, cfg
    assert rel(gemm(a, sa, w, sw, bias=bias), ref) < 1e-2  # through the picker (GEMV or tile, never NaN)


def test_gemm_m1_tile_path():
    """M = 1 through the tile kernel too (the tuner may prefer it): plain and split-K."""
    from gpu_backend.kernels import gemm as G

    torch.manual_seed(9)
    m, n, k = 1, 48, 96
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    sa, sw = torch.rand(m, device=DEV) + 0.1, torch.rand(n, device=DEV) + 0.1
    ref = (a.double().cpu() @ w.double().cpu().T) * sa.double().cpu()[:, None] * sw.double().cpu()
    for cfg in (G.INTERPRET_CONFIG, G.INTERPRET_SPLIT_CONFIG):
        assert rel(G._run(a, sa, w, sw, None, cfg), ref) < 1e-2, cfg


def _quant_fusion_cases():
    """GEMV, tile and split-K configs (a few: each config x flags is a compile on CUDA)."""
    if CUDA:
        return [("gemv", 4, 1024, 4, 3), ("gemv", 2, 2048, 4, 1), (16, 64, 256, 1, 4, 3, 1), (16, 64, 256, 1, 4, 4, 4)]
    return [("gemv", 4, 64, 1, 1), (16, 16, 32, 1, 1, 1, 1), (16, 16, 32, 1, 1, 1, 2)]


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("qdtype", [torch.int8, pytest.param(FP8, marks=[needs_fp8, fp8_cuda_only])])
@pytest.mark.parametrize("static", [False, True])
def test_gemm_quantizes_input_on_load(m, qdtype, static):
    """A bf16 input quantized inside the GEMM (scale from the producer's row amax, or static) computes exactly
    what norm_quant + the GEMM compute, for every tile family (GEMV, tile, split-K)."""
    from gpu_backend.kernels import gemm as G

    torch.manual_seed(10)
    n, k = (40, 200) if not CUDA else (1000, 4160)
    a = (torch.randn(m, k, device=DEV) * 2).bfloat16()
    a[0, :3] = torch.tensor([40.0, -2.5, 0.5])
    w = torch.randint(-127, 128, (n, k), device=DEV).to(qdtype)
    sw = torch.rand(n, device=DEV) * 0.01 + 0.001
    st = torch.tensor([0.03], device=DEV) if static else None
    q, s = norm_quant(a, None, qdtype=qdtype, static_scale=st)
    amax = a.float().abs().amax(-1)
    fusion = G.Fusion(qdtype, st if static else amax, static)
    for cfg in _quant_fusion_cases():
        if G.is_gemv(cfg) and m > G.GEMV_M:
            continue
        dt = torch.float32 if not G.is_gemv(cfg) and cfg[-1] > 1 else torch.bfloat16
        want = torch.zeros((m, n), dtype=dt, device=DEV)
        got = torch.full((m, n), float("nan"), dtype=dt, device=DEV)
        if dt == torch.float32:
            got.zero_()
        G._launch(q, s, w, sw, None, want, cfg)
        G._launch(a, None, w, sw, None, got, cfg, fusion)
        if CUDA and dt == torch.bfloat16:
            assert torch.equal(got, want), cfg
        else:  # split-K adds its slices in any order; the interpreter converts loosely
            assert rel(got, want) < 1e-5, cfg


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("kind", ["int8", pytest.param("fp8", marks=[needs_fp8, fp8_cuda_only])])
def test_gemm_silu_epilogue(m, kind):
    """The gate_up GEMM over interleaved rows with the silu epilogue: silu(gate) * up equal to the plain GEMM
    followed by silu_mul_quant, and each row's amax accumulated; GEMV and tile configs, NaN-poisoned output."""
    from gpu_backend.kernels import gemm as G
    from gpu_backend.model import Linear

    torch.manual_seed(11)
    i, k = (24, 200) if not CUDA else (1536, 4096)
    qd = torch.int8 if kind == "int8" else FP8
    lin = Linear(
        torch.randint(-127, 128, (2 * i, k), device=DEV).to(qd),
        torch.rand(2 * i, device=DEV) * 2e-4 + 1e-5,
        act_dtype=qd,
    ).interleave_halves()
    a, sa = norm_quant((torch.randn(m, k, device=DEV) * 2).bfloat16(), None, qdtype=qd)
    cfgs = [c for c in _quant_fusion_cases() if G.is_gemv(c) or c[-1] == 1]
    for cfg in cfgs:
        if G.is_gemv(cfg) and (m > G.GEMV_M or cfg[1] < 2):
            continue
        gu = torch.empty((m, 2 * i), dtype=torch.bfloat16, device=DEV)
        G._launch(a, sa, lin.weight, lin.scale, None, gu, cfg)
        want, _ = silu_mul_quant(gu, None, interleaved=True)
        got = torch.full((m, i), float("nan"), dtype=torch.bfloat16, device=DEV)
        amax = torch.zeros(m, device=DEV)
        G._launch(a, sa, lin.weight, lin.scale, None, got, cfg, G.Fusion(silu=True, amax_out=amax))
        if CUDA:
            assert torch.equal(got, want), cfg
        else:
            assert rel(got, want) < 1e-2, cfg
        assert torch.equal(amax, got.float().abs().amax(-1)), cfg
    # interleaving + the non-interleaved silu kernel's layout agree
    plain = torch.cat([lin.weight[0::2], lin.weight[1::2]]), torch.cat([lin.scale[0::2], lin.scale[1::2]])
    gu = gemm(a, sa, plain[0], plain[1], out_dtype=torch.bfloat16)
    ref, _ = silu_mul_quant(gu, None)
    got, _ = lin.silu(a, sa, torch.zeros(m, device=DEV))
    assert rel(got, ref) < 1e-2


@pytest.mark.parametrize("splits", [1, 2])
def test_decode_attention_amax_and_one_split(splits):
    """With one split the split kernel writes the normalized output itself (the merge kernel is skipped), equal
    to the merged result of more splits over the same keys; the row amax of the output is accumulated."""
    torch.manual_seed(12)
    h, kv, d = (4, 2, 16) if not CUDA else (32, 8, 128)
    bsz, max_len = 3, 40 if not CUDA else 1100
    seq = torch.tensor([1, 17, 33] if not CUDA else [1, 700, 1025], dtype=torch.int32, device=DEV)
    q = torch.randn(bsz, (h + 2 * kv) * d, device=DEV).to(ACT)
    kc = torch.randn(bsz, kv, max_len, d, device=DEV).to(ACT)
    vc = torch.randn(bsz, kv, max_len, d, device=DEV).to(ACT)
    ones = torch.ones(kv, device=DEV)
    bs = 16 if not CUDA else 64
    ref = decode_attention(q, kc, vc, ones, ones, seq, h, splits=4, block_s=bs)
    amax = torch.zeros(bsz, device=DEV)
    out = torch.full_like(ref, float("nan"))
    decode_attention(q, kc, vc, ones, ones, seq, h, out=out, splits=splits, block_s=bs, amax_out=amax)
    assert rel(out, ref) < 1e-2
    assert torch.equal(amax, out.float().abs().amax(-1))


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a16-int8", "bf16"])
@pytest.mark.parametrize("bsz", [1, 3])
def test_decoder_fused_steps_equal_separate_kernels(scheme, bsz):
    """A decode step (and a prefill) with the o-input quantization and silu*up inside the GEMMs, and with the
    attention splits per batch size, gives the logits of the separate kernels (a tiny random model; exactly,
    where both run the same tiles)."""
    from gpu_backend.weights import build_decoder
    from models.config import DecoderConfig

    cfg = DecoderConfig(
        model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    g = torch.Generator().manual_seed(13)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).bfloat16()

    ones = torch.ones(64).bfloat16()
    st = {"model.embed_tokens.weight": rnd(64, 64), "model.norm.weight": ones, "lm_head.weight": rnd(64, 64)}
    for n in range(2):
        p = f"model.layers.{n}."
        for name, shape in (
            ("self_attn.q_proj", (64, 64)),
            ("self_attn.k_proj", (32, 64)),
            ("self_attn.v_proj", (32, 64)),
            ("self_attn.o_proj", (64, 64)),
            ("mlp.gate_proj", (96, 64)),
            ("mlp.up_proj", (96, 64)),
            ("mlp.down_proj", (64, 96)),
        ):
            st[p + name + ".weight"] = rnd(*shape)
        st[p + "input_layernorm.weight"] = st[p + "post_attention_layernorm.weight"] = ones  # fmt: skip
    dec = build_decoder(st, cfg, scheme, "bf16", DEV)
    outs = []
    for fuse, splits in ((("oquant", "silu"), None), ((), 4)):
        dec.fuse, dec.splits = fuse, splits
        dec.allocate(bsz, 32)
        with torch.inference_mode():
            logits = dec.prefill(torch.arange(bsz * 5, device=DEV).view(bsz, 5) % 64, all_logits=True)
            x = dec.embed[torch.arange(bsz, device=DEV) * 7 % 64]
            seq = torch.full((bsz,), 6, dtype=torch.int32, device=DEV)
            h = dec._layers(x.clone(), seq - 1, bsz, 1, seq)
        outs.append((logits.float().cpu(), h.float().cpu()))
    assert torch.isfinite(outs[0][0]).all() and torch.isfinite(outs[0][1]).all()
    if CUDA:  # each fused GEMM is tuned on its own (another tile may sum in another order): bf16-level only
        assert rel(outs[0][0], outs[1][0]) < 3e-2 and rel(outs[0][1], outs[1][1]) < 3e-2
    else:
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_fusion_and_splits_settings(monkeypatch):
    """Q8CHAT_GPU_FUSE / Q8CHAT_GPU_ATTN_SPLITS: defaults are the separate kernels and 16 slices; bad values say
    what to use."""
    from gpu_backend import model
    from gpu_backend.kernels.attention import decode_splits

    monkeypatch.delenv("Q8CHAT_GPU_FUSE", raising=False)
    monkeypatch.delenv("Q8CHAT_GPU_ATTN_SPLITS", raising=False)
    assert model._env_fuse() == () and model._env_splits() == 16
    monkeypatch.setenv("Q8CHAT_GPU_FUSE", "all")
    monkeypatch.setenv("Q8CHAT_GPU_ATTN_SPLITS", "auto")
    assert model._env_fuse() == ("oquant", "silu") and model._env_splits() is None
    monkeypatch.setenv("Q8CHAT_GPU_FUSE", "silu,rope")
    with pytest.raises(ValueError, match="oquant, silu"):
        model._env_fuse()
    monkeypatch.setenv("Q8CHAT_GPU_ATTN_SPLITS", "12")
    with pytest.raises(ValueError, match="power of 2"):
        model._env_splits()
    # about two programs per SM: 16 slices at batch 1, none at batch 32+ (8 kv heads, 132 SMs)
    assert [decode_splits(b, 8, 132) for b in (1, 8, 32, 64)] == [16, 4, 1, 1]
