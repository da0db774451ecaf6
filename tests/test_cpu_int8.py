"""CPU INT8 kernels and engine against the quantizer's reference numerics (quant/reference.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpu_backend import kernels
from cpu_backend.engine import CPUEngine, CPUGenerator, load_quantized
from cpu_backend.linear import Int8Linear, Int8WeightOnlyLinear, fuse_int8
from models.backend import RequestError, SamplingParams
from models.chat import build_prompt
from models.generate import Generator
from quant.checkpoint import load_checkpoint
from quant.reference import QuantLinearRef, quantize_per_token_int8, quantize_weight

ROOT = Path(__file__).resolve().parents[1]


def activations(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)[torch.randperm(k, generator=g)]
    x[0, :7] = 0.0  # ties and zeros exercise rounding
    return x.bfloat16()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [576, 583, 5])  # 583, 5: a vector tail (AVX-512 works 16 at a time)
def test_per_token_quantization_is_bit_exact_with_the_reference(dtype, k):
    x = activations(33, k).to(dtype)
    x[5] = 0.0  # an all-zero row must not divide by zero
    ref_q, ref_s = quantize_per_token_int8(x)
    q, s = kernels.quantize_per_token(x, 0)
    assert torch.equal(q, ref_q) and torch.equal(s, ref_s)
    qu, su = kernels.quantize_per_token(x, 128)
    assert qu.dtype == torch.uint8 and torch.equal(qu.int() - 128, ref_q.int()) and torch.equal(su, ref_s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_tensor_quantization_is_bit_exact_with_the_reference(dtype):
    x = activations(9, 323).to(dtype)
    scale = torch.tensor(0.021)
    ref = torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)
    assert torch.equal(kernels.quantize_per_tensor(x, float(scale), 0), ref)
    assert torch.equal(kernels.quantize_per_tensor(x, float(scale), 128).int() - 128, ref.int())


def near_halves(scale: torch.Tensor, n: int = 127) -> torch.Tensor:
    """float32 values whose quotient by ``scale`` is a half-integer or a few ulps either side of one (where a
    quantizer that multiplies by 1 / scale instead of dividing would round the other way)."""
    x = (torch.arange(-n, n, dtype=torch.float32) + 0.5) * scale
    steps = [x]
    up, down = x, x
    for _ in range(3):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(float("-inf")))
        steps += [up, down]
    return torch.cat(steps)


@pytest.mark.parametrize("scale", [0.021, 0.1, 1 / 3, 7.3e-5])
def test_quantization_rounds_near_half_integers_as_the_reference(scale):
    """Values where multiplying by 1 / scale instead of dividing rounds the other way (~3% of them): per token
    (scale = amax / 127) and per tensor, the quantizers must round as the reference's division does."""
    s = torch.tensor(scale, dtype=torch.float32)
    x = near_halves(s)
    ref = torch.round(x / s).clamp(-127, 127).to(torch.int8)
    assert torch.equal(kernels.quantize_per_tensor(x.reshape(1, -1), scale, 0), ref.reshape(1, -1))
    rows = near_halves(s, 126).reshape(-1, 36)  # per token: a row amax of 127 * scale makes the row's scale `scale`
    rows = torch.cat([rows, torch.full((rows.shape[0], 1), 127.0) * s], 1)
    ref_q, ref_s = quantize_per_token_int8(rows)
    q, qs = kernels.quantize_per_token(rows, 0)
    assert torch.equal(q, ref_q) and torch.equal(qs, ref_s)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequantize_is_bit_exact_with_the_reference(static, with_bias):
    """The W8A8 prefill epilogue: (acc * x_scale) * w_scale + bias in float32, each step rounded (no FMA)."""
    g = torch.Generator().manual_seed(3)
    m, n = 37, 1003
    acc = torch.randint(-(2**22), 2**22, (m, n), generator=g, dtype=torch.int32)
    acc[0, 0] = 2**24 + 1  # past float32's integers: rounded once, as .float() does
    xs = torch.tensor(0.021) if static else torch.rand(m, 1, generator=g) * 0.1
    ws = torch.rand(n, generator=g) * 0.01
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = (acc.float() * xs) * ws.reshape(1, -1)
    if bias is not None:
        ref = ref + bias
    assert torch.equal(kernels.dequantize(acc, xs, ws, bias), ref.to(torch.bfloat16))


def test_w8a8_prefill_exact_past_float32_integers():
    """Products past 2**24 (where float32 stops holding every integer) are rounded once, as the reference's
    int32 -> float32 conversion rounds them: the prefill GEMM must hand over exact int32 values."""
    k, n = 2048, 64
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    w[:, :5] = torch.arange(5, dtype=torch.int8)  # not every product a multiple of a power of two
    ws = torch.rand(n, 1) * 0.01
    x = torch.ones(9, k).bfloat16()  # every row quantizes to +127: |acc| ~ 2048 * 127 * 127 = 3.3e7 > 2**24
    x[:, :5] = torch.tensor([0.3, -0.7, 0.9, 0.1, -1.0]).bfloat16()
    expected = QuantLinearRef(w, ws, "int", None, None)(x)
    got = Int8Linear(w, ws, None, None)(x)
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=0)


def test_int8_linear_fuses_from_either_layout():
    """fuse_int8 reads each part's weight back (from the VNNI layout where only that is held): the fused linear
    computes what the parts compute, side by side."""
    from cpu_backend.linear import fuse_int8

    parts = [Int8Linear(*quantize_weight(torch.randn(n, 576), "int")) for n in (192, 64, 64)]
    for p, n in zip(parts, (192, 64, 64), strict=True):
        assert p.weight.shape == (n, 576) and p.weight.dtype == torch.int8
    fused = fuse_int8(parts)
    x = activations(7, 576)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=1), atol=0, rtol=0)
    torch.testing.assert_close(fused(x[:1]), torch.cat([p(x[:1]) for p in parts], dim=1), atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n", [192, 1536])  # 192: the small-N shape where oneDNN's s8 path is a reference kernel
def test_w8a8_linear_matches_reference(rows, static, n):
    k = 576
    w, ws = quantize_weight(torch.randn(n, k), "int")
    bias = torch.randn(n)
    xs = torch.tensor([0.03]) if static else None
    x = activations(rows, k, seed=rows)
    expected = QuantLinearRef(w, ws, "int", xs, bias)(x)
    got = Int8Linear(w, ws, xs, bias)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0, rtol=0)


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_w8a16_linear_matches_reference(rows):
    w, ws = quantize_weight(torch.randn(960, 576), "int")
    x = activations(rows, 576)
    expected = QuantLinearRef(w, ws, None)(x).float()
    got = Int8WeightOnlyLinear(w, ws)(x).float()
    # decode and prefill kernels round the unscaled product to BF16 before our float32 scale (one bf16 step)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=8e-3)


def test_fused_projections_equal_separate_ones():
    x = activations(3, 64)
    parts = [Int8Linear(*quantize_weight(torch.randn(n, 64), "int")) for n in (64, 32, 32)]
    fused = fuse_int8(parts)
    assert fused.out_features == 128
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], -1), atol=0, rtol=0)
    static = [Int8Linear(*quantize_weight(torch.randn(8, 64), "int"), torch.tensor([s])) for s in (0.1, 0.2)]
    assert fuse_int8(static) is None  # different calibrated scales cannot share one quantization


@pytest.fixture(scope="module")
def checkpoints(embedded_folder, tmp_path_factory):
    import quant

    out = tmp_path_factory.mktemp("ckpt")
    small = dict(samples=4, seq_len=128, search_samples=2, search_tokens=256)
    return {
        "w8a8-int8": quant.build("smollm2-135m", "w8a8-int8", alpha=0.5, out=out / "sq", **small),
        "w8a16-int8": quant.build("smollm2-135m", "w8a16-int8", out=out / "wo", **small),
    }


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a16-int8"])
def test_engine_logits_match_reference_decoder(checkpoints, scheme):
    from quant.reference import reference_decoder

    ours = load_quantized(checkpoints[scheme], scheme)
    ref = reference_decoder(load_checkpoint(checkpoints[scheme]), dtype=torch.bfloat16)
    ids = torch.randint(100, 40000, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        c1, c2 = ours.new_cache(1, 32), ref.new_cache(1, 32)
        a = torch.cat([ours(ids[:, :20], c1, 0)] + [ours(ids[:, i : i + 1], c1, i) for i in range(20, 24)], 1)
        b = torch.cat([ref(ids[:, :20], c2, 0)] + [ref(ids[:, i : i + 1], c2, i) for i in range(20, 24)], 1)
    if scheme == "w8a8-int8":
        torch.testing.assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)  # prefill: bit-exact
        # decode: every INT8 linear is bit-exact, but the BF16 LM head runs our AVX512-BF16 GEMV where the CPU has
        # it (float32 sums in another order than oneDNN's): at most one bf16 rounding step apart
        torch.testing.assert_close(a[:, 20:], b[:, 20:], atol=0, rtol=2**-7)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    else:  # BF16 rounding of the unscaled products (decode and prefill): close, not bit-exact
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
        assert ((a - b).norm() / b.norm()).item() < 2e-2


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a16-int8"])
def test_engine_answers_on_int8(checkpoints, scheme):
    engine = CPUEngine("smollm2-135m", scheme, checkpoint=checkpoints[scheme])
    ids = build_prompt(engine.tokenizer, "What is the capital of France? Answer in one short sentence.").ids
    events = list(engine.generate_ids(ids, SamplingParams(max_new_tokens=32)))
    assert "Paris" in "".join(e.text for e in events)


def test_fp8_is_refused_on_cpu_with_the_reason():
    with pytest.raises(RequestError, match="FP8 has no CPU kernels"):
        CPUEngine("smollm2-135m", "w8a8-fp8")


def test_wrong_checkpoint_for_the_scheme_is_refused(checkpoints):
    with pytest.raises(RequestError, match="not w8a16-int8"):
        CPUEngine("smollm2-135m", "w8a16-int8", checkpoint=checkpoints["w8a8-int8"])


@pytest.mark.parametrize("path", ["decode without VNNI", "prefill"])
def test_onednn_runs_a_jit_int8_kernel_not_the_reference_one(path):
    """oneDNN's int8 GEMM where we use it: decode on CPUs without our VNNI GEMV (u8 in, dequantized bf16 out) and
    prefill on CPUs with VNNI (u8 in, exact products as f32 out): a JIT kernel, never oneDNN's reference one."""
    if path == "prefill" and not kernels.has_vnni():
        pytest.skip("prefill runs torch._int_mm on CPUs without VNNI")
    no_vnni = "kernels.has_vnni = lambda: False\n" if path != "prefill" else ""
    rows = 1 if path != "prefill" else 64
    code = (
        "import torch\n"
        "from cpu_backend import kernels\n"
        "from cpu_backend.linear import Int8Linear\n"
        "from quant.reference import quantize_weight\n"
        f"{no_vnni}"
        "m = Int8Linear(*quantize_weight(torch.randn(192, 576), 'int'), torch.tensor([0.03]))\n"
        f"m(torch.randn({rows}, 576).bfloat16())\n"
    )
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    execs = [line.split(",") for line in out.stdout.splitlines() if ",exec,cpu," in line and "reorder" not in line]
    assert execs, out.stdout[-2000:]
    impl = execs[-1][6]
    assert "ref" not in impl and any(isa in impl for isa in ("amx", "vnni", "avx10", "avx512")), impl
    dst = "dst:bf16" if path != "prefill" else "dst:f32"
    assert execs[-1][8].startswith("src:u8") and dst in execs[-1][8], execs[-1]


@pytest.mark.parametrize("scheme", ["w8a8-int8", "bf16"])
@pytest.mark.parametrize("fused", [False, True])
def test_lean_decode_step_follows_the_decoder(checkpoints, scheme, fused):
    """The lean step in ATen ops is the decoder's math bit for bit; with the C++ ops between the GEMVs (sums in
    their own order, our exp) it stays within a few bf16 steps of it and picks the same tokens."""
    engine = CPUEngine("smollm2-135m", scheme, checkpoint=checkpoints.get(scheme), max_context=64)
    gen = engine.generator
    assert gen.projections_fused
    if fused and not gen.cpp_step:
        pytest.skip("this CPU has no AVX-512: the lean step runs ATen ops")
    if not fused:  # the ATen step, on the float32 cache it gets where the C++ step does not run
        gen = CPUGenerator(gen.model, gen.max_len, cache_dtype=torch.float32)
        gen.cpp_step = False
    else:  # the C++ step reads a bf16 cache (the same values as float32: RoPE'd k and v are bf16)
        assert gen.cache.k.dtype == torch.bfloat16
    ids = torch.randint(100, 40000, (1, 28), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        cache = gen.model.new_cache(1, gen.max_len, torch.float32)
        gen.model(ids[:, :20], cache, 0)
        expected = [gen.model(ids[:, i : i + 1], cache, i)[0, -1] for i in range(20, 28)]
        Generator.prefill(gen, ids[:, :20])  # the decoder's prefill: this test is about the decode step
        got = [gen.decode(int(ids[0, i]), i) for i in range(20, 28)]
    for a, b in zip(got, expected, strict=True):
        if fused:
            assert int(a.argmax()) == int(b.argmax())
            assert (a - b).abs().max() <= 0.03 * b.abs().max(), ((a - b).abs().max(), b.abs().max())
        else:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


TEXT = (
    "The river rises in the hills north of the town and runs south through farmland for about forty miles before "
    "it reaches the sea. In the nineteenth century mills were built along its banks, and the town grew around "
    "them; today most of the mills are gone, but the old stone bridge still carries the main road across"
)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "bf16"])
def test_fused_prefill_follows_the_decoder(checkpoints, scheme):
    """The prefill with the C++ row ops (RMSNorm, RoPE + cache write, silu * up) between the GEMMs: the decoder's
    elementwise rounding and attention, the norm's sums in their own order. On real text, the prefill's logits and
    those of the decode steps that continue from its cache stay within a few bf16 steps of the decoder's (float32
    cache) and pick its tokens wherever the decoder's top two are not a near tie; so does a prefill in two chunks
    (against the decoder's two chunks, within 6%: a bf16 step that differs in one layer spreads through the later
    ones, and in W8A8 it can move a quantized activation by a whole step; chunking alone moves W8A8 logits ~3%)."""
    engine = CPUEngine("smollm2-135m", scheme, checkpoint=checkpoints.get(scheme), max_context=96)
    gen = engine.generator
    if not gen.cpp_step:
        pytest.skip("this CPU has no AVX-512: prefill runs the decoder's ATen ops")
    ids = torch.tensor([engine.tokenizer.encode(TEXT)])
    n = ids.shape[1]
    p = n - 6
    with torch.inference_mode():
        cache = gen.model.new_cache(1, gen.max_len, torch.float32)
        expected = [gen.model(ids[:, :p], cache, 0)[0, -1]]
        expected += [gen.model(ids[:, i : i + 1], cache, i)[0, -1] for i in range(p, n)]
        got = [gen.prefill(ids[:, :p])] + [gen.decode(int(ids[0, i]), i) for i in range(p, n)]
        # in two chunks, the second after cached tokens (a chat's next turn), against the decoder's two chunks
        gen.prefill(ids[:, : p // 2])
        got.append(gen.prefill(ids[:, p // 2 : p], p // 2))
        cache = gen.model.new_cache(1, gen.max_len, torch.float32)
        gen.model(ids[:, : p // 2], cache, 0)
        expected.append(gen.model(ids[:, p // 2 : p], cache, p // 2)[0, -1])
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        tol = (0.06 if i == len(got) - 1 else 0.03) * b.abs().max()
        assert (a - b).abs().max() <= tol
        top2 = b.topk(2).values
        if top2[0] - top2[1] > tol:
            assert int(a.argmax()) == int(b.argmax())
