"""Our C++ CPU kernels (cpu_backend/csrc) against their reference versions, at small shapes."""

import pytest
import torch

from cpu_backend import kernels
from cpu_backend.linear import Int8Linear
from quant.reference import QuantLinearRef, quantize_weight

needs_vnni = pytest.mark.skipif(not kernels.has_vnni(), reason="this CPU has no AVX512-VNNI")


def row(k, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g) * torch.logspace(-2, 1, k)[torch.randperm(k, generator=g)]
    x[0, :3] = 0.0
    return x.to(dtype)


def test_vnni_packing_layout():
    w = torch.randint(-127, 128, (20, 10), dtype=torch.int8)
    packed, comp = kernels.pack_vnni(w)
    assert packed.shape == (2, 3, 16, 4) and comp.shape == (32,)
    for n, k in [(0, 0), (5, 7), (19, 9), (16, 3)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    assert packed[1, :, 4:].abs().sum() == 0 and packed[:, 2, :, 2:].abs().sum() == 0  # zero padding
    assert torch.equal(comp[:20], w.int().sum(1) * 128) and comp[20:].abs().sum() == 0


@needs_vnni
@pytest.mark.parametrize("n,k", [(16, 64), (960, 576), (576, 1536), (37, 13), (5, 3)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_w8a8_is_bit_exact_with_the_reference(n, k, static, with_bias):
    w, ws = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), "int")
    bias = torch.randn(n) if with_bias else None
    xs = torch.tensor([0.05]) if static else None
    ref = QuantLinearRef(w, ws, "int", xs, bias)
    packed, comp = kernels.pack_vnni(w)
    for seed, dtype in [(0, torch.bfloat16), (1, torch.float32)]:
        x = row(k, seed, dtype)
        expected = ref(x.bfloat16() if dtype == torch.bfloat16 else x).to(torch.bfloat16)
        got = kernels.gemv_w8a8(x, packed, comp, ws.reshape(-1), bias, n, float(xs) if static else 0.0)
        assert got.dtype == torch.bfloat16 and got.shape == (1, n)
        assert torch.equal(got, expected)


@needs_vnni
def test_gemv_w8a8_extremes():
    """Saturated weights and activations (largest int32 sums) and an all-zero row."""
    k, n = 1536, 48
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    ws = torch.rand(n, 1) * 0.01 + 1e-3
    packed, comp = kernels.pack_vnni(w)
    ref = QuantLinearRef(w, ws, "int")
    for x in (torch.full((1, k), 3.0), torch.full((1, k), -3.0), torch.zeros(1, k)):
        x = x.bfloat16()
        assert torch.equal(kernels.gemv_w8a8(x, packed, comp, ws.reshape(-1), None, n), ref(x))


@needs_vnni
def test_int8_linear_decodes_on_the_vnni_gemv():
    w, ws = quantize_weight(torch.randn(96, 64), "int")
    m = Int8Linear(w, ws)
    assert m.vnni and m.plain is None  # two layouts only: the GEMV's and oneDNN's prefill copy
    x = row(64, 3).reshape(1, 1, 64)
    assert torch.equal(m(x), QuantLinearRef(w, ws, "int")(x))


@pytest.mark.skipif(not kernels.has_avx512bf16(), reason="this CPU has no AVX512-BF16 (BF16Linear stays on oneDNN)")
@pytest.mark.parametrize("n,k", [(576, 576), (3072, 576), (576, 1536), (7, 70), (5, 33)])
def test_gemv_bf16_matches_float64_and_onednn(n, k):
    """The decode GEMV: float32 accumulation of exact bf16 products, one rounding at the end (odd N and K
    exercise the row and k tails)."""
    from cpu_backend.linear import BF16Linear

    torch.manual_seed(n + k)
    w, x, b = torch.randn(n, k).bfloat16(), torch.randn(1, k).bfloat16(), torch.randn(n).bfloat16()
    ref = x.double() @ w.double().T + b.double()
    y = kernels.gemv_bf16(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (1, n)
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3).all()  # one bf16 rounding (+ float32 sums)
    onednn = torch.nn.functional.linear(x, w, b)
    assert ((y.float() - onednn.float()).abs() <= onednn.float().abs() * 2**-7).all()
    rows = torch.randn(3, k).bfloat16()
    for lin in (BF16Linear(w, b), BF16Linear(w, b, prefill_copy=False)):
        assert torch.equal(lin(x), y) and torch.equal(lin(x[None]), y[None])  # one row: the GEMV
        # more rows: oneDNN (on its blocked copy, or on the plain weight without one)
        torch.testing.assert_close(lin(rows), torch.nn.functional.linear(rows, w, b), atol=0, rtol=2**-7)


@pytest.mark.skipif(not kernels.has_avx512(), reason="this CPU has no AVX-512 (W8A16 decode stays on ATen)")
@pytest.mark.parametrize("n,k", [(576, 576), (3072, 576), (576, 1536), (7, 70), (5, 33)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_w8a16_matches_float64_and_the_aten_path(n, k, with_bias):
    """The W8A16 decode GEMV: exact products summed in float32, rounded to bf16, then scale (+ bias) in float32
    and one more bf16 rounding (odd N and K exercise the row and k tails)."""
    from cpu_backend.linear import Int8WeightOnlyLinear

    w, ws = quantize_weight(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), "int")
    bias = torch.randn(n) if with_bias else None
    x = row(k, 5)
    unscaled = (x.double() @ w.double().T).bfloat16()  # the sum rounded once (float64: no summation error)
    ref = unscaled.double() * ws.double().T + (0 if bias is None else bias.double())
    y = kernels.gemv_w8a16(x, w, ws.reshape(-1), bias)
    assert y.dtype == torch.bfloat16 and y.shape == (1, n)
    # float32 sums may land on the neighbouring bf16 of the unscaled sum: two bf16 steps in all
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-7 + 1e-6).all()
    agree = (y == ref.bfloat16()).float().mean()
    assert agree > 0.95, agree
    lin = Int8WeightOnlyLinear(w, ws, bias)
    assert lin.gemv and torch.equal(lin(x), y) and torch.equal(lin(x[None]), y[None])  # one row: the GEMV
    two = torch.cat([x, x])  # two rows: _weight_int8pack_mm (oneDNN for K % 16 != 0), same numerics up to sum order
    torch.testing.assert_close(lin(two)[:1].float(), y.float(), atol=1e-6, rtol=2**-7)


def attention_reference(qkv, cos, sin, kc, vc, pos, n_heads):
    """The lean decode loop's ATen formulation (cpu_backend.engine.CPUGenerator._attention)."""
    n_kv, _, d = kc.shape
    qk = qkv[:, : (n_heads + n_kv) * d].view(n_heads + n_kv, d)
    qk = qk * cos + qk.roll(d // 2, -1) * sin
    kc[:, pos].copy_(qk[n_heads:])
    vc[:, pos].copy_(qkv[0, (n_heads + n_kv) * d :].view(n_kv, d))
    k, v = kc[:, : pos + 1], vc[:, : pos + 1]
    q = qk[:n_heads].float().view(n_kv, n_heads // n_kv, d)
    probs = (torch.matmul(q, k.transpose(-1, -2)) * d**-0.5).softmax(-1)
    return torch.matmul(probs, v).to(torch.bfloat16).view(1, n_heads * d)


@pytest.mark.skipif(not kernels.has_avx512(), reason="this CPU has no AVX-512 (decode attention stays on ATen)")
@pytest.mark.parametrize("n_heads,n_kv,d", [(9, 3, 64), (32, 8, 128), (4, 4, 64)])
@pytest.mark.parametrize("pos", [0, 5, 16, 31, 200])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_attend_matches_the_aten_attention(n_heads, n_kv, d, pos, cache_dtype):
    """RoPE and the cache writes bit for bit; the attention output to bf16 rounding (float32 sums in another
    order, our exp); positions around multiples of 16 exercise the score blocks' tails. A bf16 cache holds the
    same values as a float32 one (RoPE'd k and v are bf16 numbers), so it gives the very same output."""
    g = torch.Generator().manual_seed(pos + d)
    qkv = (torch.randn(1, (n_heads + 2 * n_kv) * d, generator=g) * 3).bfloat16()
    cos, sin = torch.randn(1, d, generator=g).bfloat16(), torch.randn(1, d, generator=g).bfloat16()
    kc = torch.randn(n_kv, 256, d, generator=g).bfloat16().float()  # cache contents: bf16 values
    vc = torch.randn(n_kv, 256, d, generator=g).bfloat16().float()
    kc2, vc2 = kc.to(cache_dtype), vc.to(cache_dtype)
    expected = attention_reference(qkv, cos, sin, kc, vc, pos, n_heads)
    got = kernels.rope_attend(qkv, cos, sin, kc2, vc2, pos, n_heads)
    assert torch.equal(kc2.float(), kc) and torch.equal(vc2.float(), vc)
    if cache_dtype == torch.bfloat16:
        assert torch.equal(got, kernels.rope_attend(qkv, cos, sin, kc.clone(), vc.clone(), pos, n_heads))
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-3, rtol=2**-7)
    assert (got == expected).float().mean() > 0.95


@pytest.mark.skipif(not kernels.has_avx512(), reason="this CPU has no AVX-512")
def test_rope_attend_refuses_what_it_does_not_run():
    qkv, rot = torch.zeros(1, 5 * 32).bfloat16(), torch.zeros(1, 32).bfloat16()
    cache = torch.zeros(1, 8, 32)
    with pytest.raises(RuntimeError, match="head_dim"):
        kernels.rope_attend(qkv, rot, rot, cache, cache.clone(), 0, 3)
    cache = torch.zeros(1, 8, 64)
    with pytest.raises(RuntimeError, match="position"):
        kernels.rope_attend(torch.zeros(1, 5 * 64).bfloat16(), torch.zeros(1, 64).bfloat16(),
                            torch.zeros(1, 64).bfloat16(), cache, cache.clone(), 8, 3)  # fmt: skip


@pytest.mark.skipif(not kernels.has_avx512(), reason="this CPU has no AVX-512")
@pytest.mark.parametrize("n", [576, 2048, 70])
@pytest.mark.parametrize("rows", [1, 37])  # a decode step's row, a prefill's rows (in parallel)
def test_add_rmsnorm_and_silu_mul_match_the_decoder(n, rows):
    """The decoder's bf16 rounding points; the mean of squares and exp are ours, so a bf16 step now and then."""
    from models.decoder import RMSNorm

    g = torch.Generator().manual_seed(n)
    x, delta = (torch.randn(rows, n, generator=g) * 4).bfloat16(), torch.randn(rows, n, generator=g).bfloat16()
    norm = RMSNorm(n, 1e-5).to(torch.bfloat16)
    norm.weight.data = torch.rand(n, generator=g).bfloat16() + 0.5
    x_out, y = kernels.add_rmsnorm(x, delta, norm.weight.data, 1e-5)
    assert torch.equal(x_out, x + delta)
    with torch.no_grad():
        expected = norm(x + delta)
    torch.testing.assert_close(y.float(), expected.float(), atol=0, rtol=2**-7)
    assert (y == expected).float().mean() > 0.98
    same, y2 = kernels.add_rmsnorm(x, None, norm.weight.data, 1e-5)
    assert same.data_ptr() == x.data_ptr()  # no delta: x itself comes back
    with torch.no_grad():
        torch.testing.assert_close(y2.float(), norm(x).float(), atol=0, rtol=2**-7)

    gu = (torch.randn(rows, 2 * n, generator=g) * 3).bfloat16()
    gate, up = gu.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = kernels.silu_mul(gu)
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=2**-7)
    assert (got == expected).float().mean() > 0.98


@pytest.mark.skipif(not kernels.has_avx512(), reason="this CPU has no AVX-512 (prefill RoPE stays on ATen)")
@pytest.mark.parametrize("n_heads,n_kv,d", [(9, 3, 64), (32, 8, 128)])
@pytest.mark.parametrize("start", [0, 7])
def test_rope_rows_is_the_decoders_rope_bit_for_bit(n_heads, n_kv, d, start):
    """A prefill's RoPE (rotate_half, the decoder's bf16 rounding), the rotated k and v in the cache at their
    positions (nothing else touched), the queries head-major."""
    from models.decoder import rotate_half

    g = torch.Generator().manual_seed(d + start)
    t = 21
    qkv = (torch.randn(t, (n_heads + 2 * n_kv) * d, generator=g) * 3).bfloat16()
    cos, sin = torch.randn(t, d, generator=g).bfloat16(), torch.randn(t, d, generator=g).bfloat16()
    kc, vc = torch.randn(n_kv, 64, d, generator=g).bfloat16(), torch.randn(n_kv, 64, d, generator=g).bfloat16()
    kc0, vc0 = kc.clone(), vc.clone()
    signed = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), -1)
    q = kernels.rope_rows(qkv, cos, signed, kc, vc, start, n_heads)
    heads = qkv.view(t, n_heads + 2 * n_kv, d).transpose(0, 1)  # [heads, t, d]
    rotated = heads[: n_heads + n_kv] * cos + rotate_half(heads[: n_heads + n_kv]) * sin
    assert q.shape == (n_heads, t, d) and torch.equal(q, rotated[:n_heads])
    assert torch.equal(kc[:, start : start + t], rotated[n_heads:])
    assert torch.equal(vc[:, start : start + t], heads[n_heads + n_kv :])
    for cache, before in ((kc, kc0), (vc, vc0)):
        assert torch.equal(cache[:, :start], before[:, :start])
        assert torch.equal(cache[:, start + t :], before[:, start + t :])
    with pytest.raises(RuntimeError, match="positions"):
        kernels.rope_rows(qkv, cos, signed, kc, vc, 64 - t + 1, n_heads)
