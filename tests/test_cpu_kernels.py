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
