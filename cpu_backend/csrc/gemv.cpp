// One-token (decode) GEMVs. gemv_bf16: BF16 x BF16 with `vdpbf16ps` on the plain weight (below). gemv_w8a16:
// BF16 activation x INT8 weight (plain layout, shared with prefill), exact float32 products (below). gemv_w8a8:
// W8A8 INT8 GEMV for one token: quantize the activation row (per token, or with a static scale),
// then y = (acc * x_scale) * w_scale (+ bias) in float32, rounded to BF16 -- the numerics of
// quant/reference.py, with the int32 accumulation done by AVX512-VNNI `vpdpbusd` (u8 x s8).
//
// Weights are prepacked once (cpu_backend/linear.py: pack_vnni) as [N/16, K/4, 16, 4] int8: one 64-byte
// vector holds 4 consecutive k of 16 output columns, so the kernel streams the weight sequentially. The
// activation goes in as u8 (q + 128); `comp` holds 128 * sum_k w[n, k] to subtract, which keeps the int32
// accumulator exactly the s8 x s8 dot product.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include "vec.h"
#include "gemv.h"

namespace {

bool cpu_has_vnni() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// Software prefetch: the weight streams from DRAM (or a shared L3) and the hardware prefetcher alone kept the
// GEMVs at ~16 GB/s on the Xeon; requesting ~18 KiB ahead of the reads took them to ~25-30 GB/s. Prefetches
// never fault, so the few past a thread's rows (or the tensor's end) are harmless.
constexpr int64_t PREFETCH_BYTES = 18432;

// rows ahead, in blocks of four, for rows of row_bytes
inline int64_t prefetch_rows(int64_t row_bytes) {
  return std::min<int64_t>(64, std::max<int64_t>(4, (PREFETCH_BYTES / std::max<int64_t>(row_bytes, 1) + 3) / 4 * 4));
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void gemv_blocks(
    const uint8_t* xq, const int8_t* w, const int32_t* comp, const float* ws, const float* bias, float xs,
    int64_t kg_count, int64_t n, int64_t nb_begin, int64_t nb_end, at::BFloat16* y) {
  const int32_t* x32 = reinterpret_cast<const int32_t*>(xq);
  const __m512 vxs = _mm512_set1_ps(xs);
  for (int64_t nb = nb_begin; nb < nb_end; ++nb) {
    const int8_t* wp = w + nb * kg_count * 64;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t kg = 0;
    for (; kg + 4 <= kg_count; kg += 4) {
      const char* pf = reinterpret_cast<const char*>(wp + kg * 64) + PREFETCH_BYTES;  // the blocks are one stream
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
      _mm_prefetch(pf + 128, _MM_HINT_T0);
      _mm_prefetch(pf + 192, _MM_HINT_T0);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x32[kg]), _mm512_loadu_si512(wp + kg * 64));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(x32[kg + 1]), _mm512_loadu_si512(wp + kg * 64 + 64));
      a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(x32[kg + 2]), _mm512_loadu_si512(wp + kg * 64 + 128));
      a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(x32[kg + 3]), _mm512_loadu_si512(wp + kg * 64 + 192));
    }
    for (; kg < kg_count; ++kg)
      a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x32[kg]), _mm512_loadu_si512(wp + kg * 64));
    __m512i acc = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
    acc = _mm512_sub_epi32(acc, _mm512_loadu_si512(comp + nb * 16));
    const int64_t n0 = nb * 16;
    const int64_t valid = std::min<int64_t>(16, n - n0);
    const __mmask16 mask = valid == 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << valid) - 1);
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), vxs);
    f = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(mask, ws + n0));
    if (bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mask, bias + n0));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y + n0), mask, q8::to_bf16(f));
  }
}

// BF16 GEMV on the plain [N, K] weight: four rows at a time, 32 k per `vdpbf16ps` (float32 accumulation),
// one horizontal sum per row at the end. xp is the activation row zero-padded to kpad (a multiple of 32).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void gemv_bf16_rows(
    const uint16_t* xp, const uint16_t* w, const float* bias, int64_t k, int64_t row_begin,
    int64_t row_end, at::BFloat16* y) {
  const int64_t kfull = k / 32 * 32, ahead = prefetch_rows(2 * k);
  const __mmask32 tail = static_cast<__mmask32>((k - kfull) == 0 ? 0 : ((1ull << (k - kfull)) - 1));
  int64_t r = row_begin;
  for (; r + 4 <= row_end; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const uint16_t* wr = w + r * k;
    const char* pf = reinterpret_cast<const char*>(w + (r + ahead) * k);
    for (int64_t kk = 0; kk < kfull; kk += 32) {
      _mm_prefetch(pf + 2 * kk, _MM_HINT_T0);
      _mm_prefetch(pf + 2 * (k + kk), _MM_HINT_T0);
      _mm_prefetch(pf + 2 * (2 * k + kk), _MM_HINT_T0);
      _mm_prefetch(pf + 2 * (3 * k + kk), _MM_HINT_T0);
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + kk);
      a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_loadu_si512(wr + kk));
      a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_loadu_si512(wr + k + kk));
      a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_loadu_si512(wr + 2 * k + kk));
      a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_loadu_si512(wr + 3 * k + kk));
    }
    if (tail) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xp + kfull);
      a0 = _mm512_dpbf16_ps(a0, xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + kfull));
      a1 = _mm512_dpbf16_ps(a1, xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + k + kfull));
      a2 = _mm512_dpbf16_ps(a2, xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + 2 * k + kfull));
      a3 = _mm512_dpbf16_ps(a3, xv, (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + 3 * k + kfull));
    }
    float out[4] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                    _mm512_reduce_add_ps(a3)};
    for (int i = 0; i < 4; ++i) y[r + i] = static_cast<at::BFloat16>(out[i] + (bias ? bias[r + i] : 0.f));
  }
  for (; r < row_end; ++r) {
    __m512 acc = _mm512_setzero_ps();
    const uint16_t* wr = w + r * k;
    for (int64_t kk = 0; kk < kfull; kk += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(xp + kk), (__m512bh)_mm512_loadu_si512(wr + kk));
    if (tail)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(xp + kfull),
                             (__m512bh)_mm512_maskz_loadu_epi16(tail, wr + kfull));
    y[r] = static_cast<at::BFloat16>(_mm512_reduce_add_ps(acc) + (bias ? bias[r] : 0.f));
  }
}

// 16 int8 weights as float32 (exact)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 widen(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 widen(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// W8A16 GEMV on the plain int8 [N, K] weight: four rows at a time, 16 k per step (the int8 weights widened to
// float32 and multiplied with the float32 activation: exact products, float32 sums), then the epilogue of
// Int8WeightOnlyLinear: the unscaled sum rounded to bf16, times the channel scale (+ bias) in float32, to bf16.
// xf is the activation row in float32, zero-padded to a multiple of 16.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void gemv_w8a16_rows(
    const float* xf, const int8_t* w, const float* ws, const float* bias, int64_t k, int64_t row_begin,
    int64_t row_end, at::BFloat16* y) {
  const int64_t kfull = k / 16 * 16, ahead = prefetch_rows(k);
  const __mmask16 tail = k == kfull ? 0 : q8::tail_mask(k - kfull);
  auto finish = [&](int64_t row, float acc) {
    float v = static_cast<float>(static_cast<at::BFloat16>(acc)) * ws[row];
    if (bias) v += bias[row];
    y[row] = static_cast<at::BFloat16>(v);
  };
  int64_t r = row_begin;
  for (; r + 4 <= row_end; r += 4) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int8_t* wr = w + r * k;
    const char* pf = reinterpret_cast<const char*>(w + (r + ahead) * k);
    for (int64_t kk = 0; kk < kfull; kk += 16) {
      if (kk % 64 == 0) {
        _mm_prefetch(pf + kk, _MM_HINT_T0);
        _mm_prefetch(pf + k + kk, _MM_HINT_T0);
        _mm_prefetch(pf + 2 * k + kk, _MM_HINT_T0);
        _mm_prefetch(pf + 3 * k + kk, _MM_HINT_T0);
      }
      const __m512 xv = _mm512_loadu_ps(xf + kk);
      a0 = _mm512_fmadd_ps(widen(wr + kk), xv, a0);
      a1 = _mm512_fmadd_ps(widen(wr + k + kk), xv, a1);
      a2 = _mm512_fmadd_ps(widen(wr + 2 * k + kk), xv, a2);
      a3 = _mm512_fmadd_ps(widen(wr + 3 * k + kk), xv, a3);
    }
    if (tail) {
      const __m512 xv = _mm512_loadu_ps(xf + kfull);
      a0 = _mm512_fmadd_ps(widen(wr + kfull, tail), xv, a0);
      a1 = _mm512_fmadd_ps(widen(wr + k + kfull, tail), xv, a1);
      a2 = _mm512_fmadd_ps(widen(wr + 2 * k + kfull, tail), xv, a2);
      a3 = _mm512_fmadd_ps(widen(wr + 3 * k + kfull, tail), xv, a3);
    }
    finish(r, _mm512_reduce_add_ps(a0));
    finish(r + 1, _mm512_reduce_add_ps(a1));
    finish(r + 2, _mm512_reduce_add_ps(a2));
    finish(r + 3, _mm512_reduce_add_ps(a3));
  }
  for (; r < row_end; ++r) {
    __m512 acc = _mm512_setzero_ps();
    const int8_t* wr = w + r * k;
    for (int64_t kk = 0; kk < kfull; kk += 16) acc = _mm512_fmadd_ps(widen(wr + kk), _mm512_loadu_ps(xf + kk), acc);
    if (tail) acc = _mm512_fmadd_ps(widen(wr + kfull, tail), _mm512_loadu_ps(xf + kfull), acc);
    finish(r, _mm512_reduce_add_ps(acc));
  }
}

bool cpu_has_avx512bf16() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}
#else
bool cpu_has_avx512bf16() { return false; }
#endif

// Quantize one row into u8 (q + 128), padded with 128 (q = 0) to kpad; returns the scale used.
template <typename scalar_t>
float quantize_row(const scalar_t* xp, int64_t k, int64_t kpad, double static_scale, uint8_t* out) {
  const float scale =
      static_scale > 0 ? static_cast<float>(static_scale) : std::max(q8::row_amax(xp, k), 1e-6f) / 127.f;
  q8::quantize_row_values(xp, k, scale, 128, out);
  for (int64_t i = k; i < kpad; ++i) out[i] = 128;
  return scale;
}

}  // namespace

bool has_vnni() {
  static const bool ok = cpu_has_vnni();
  return ok;
}

// One row x [K] through the VNNI-blocked weight (packed [nblocks, kg_count, 16, 4]) into y [n] bf16.
template <typename scalar_t>
void gemv_w8a8_row(const scalar_t* x, int64_t k, const int8_t* wp, int64_t kg_count, int64_t nblocks,
                   const int32_t* cp, const float* sp, const float* bp, double static_scale, int64_t n,
                   at::BFloat16* yp) {
  uint8_t xq_stack[8192];
  std::vector<uint8_t> xq_heap(kg_count * 4 > 8192 ? kg_count * 4 : 0);
  uint8_t* xq = kg_count * 4 > 8192 ? xq_heap.data() : xq_stack;
  const float xs = quantize_row<scalar_t>(x, k, kg_count * 4, static_scale, xq);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(kg_count, 1));  // >= ~256 KiB of weight
#if defined(__x86_64__)
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    gemv_blocks(xq, wp, cp, sp, bp, xs, kg_count, n, begin, end, yp);
  });
#endif
}

void gemv_w8a8_raw(const at::BFloat16* x, int64_t k, const int8_t* packed, int64_t kg_count, int64_t nblocks,
                   const int32_t* comp, const float* w_scale, const float* bias, double static_scale, int64_t n,
                   at::BFloat16* y) {
  gemv_w8a8_row(x, k, packed, kg_count, nblocks, comp, w_scale, bias, static_scale, n, y);
}

// x [1, K] (float/bf16), packed [N/16 padded, K/4 padded, 16, 4] int8, comp [Npad] int32, w_scale [N] float,
// bias [N] float or None, static_scale > 0 for a calibrated per-tensor scale (else per token) -> y [1, N] bf16.
torch::Tensor gemv_w8a8(const torch::Tensor& x_in, const torch::Tensor& packed, const torch::Tensor& comp,
                        const torch::Tensor& w_scale, const c10::optional<torch::Tensor>& bias, double static_scale,
                        int64_t n) {
  TORCH_CHECK(has_vnni(), "gemv_w8a8 needs AVX512-VNNI");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1, "gemv_w8a8 expects one row [1, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 && packed.is_contiguous());
  const int64_t k = x_in.size(1), nblocks = packed.size(0), kg_count = packed.size(1);
  TORCH_CHECK(kg_count * 4 >= k && kg_count * 4 < k + 4, "packed weight does not match K");
  TORCH_CHECK(nblocks * 16 >= n && comp.numel() == nblocks * 16 && w_scale.numel() == n);
  auto x = x_in.contiguous();
  auto y = torch::empty({1, n}, torch::dtype(torch::kBFloat16));
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous().to(torch::kFloat);
    TORCH_CHECK(b.numel() == n);
    bp = b.data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "gemv_w8a8", [&] {
    gemv_w8a8_row<scalar_t>(x.data_ptr<scalar_t>(), k, packed.data_ptr<int8_t>(), kg_count, nblocks,
                            comp.data_ptr<int32_t>(), w_scale.data_ptr<float>(), bp, static_scale, n,
                            y.data_ptr<at::BFloat16>());
  });
  return y;
}

bool has_avx512bf16() {
  static const bool ok = cpu_has_avx512bf16();
  return ok;
}

void gemv_bf16_raw(const at::BFloat16* x, int64_t k, const at::BFloat16* w, int64_t n, const float* bias,
                   at::BFloat16* y) {
  const int64_t kpad = (k + 31) / 32 * 32;
  uint16_t xp_stack[8192];
  std::vector<uint16_t> xp_heap(kpad > 8192 ? kpad : 0);
  uint16_t* xp = kpad > 8192 ? xp_heap.data() : xp_stack;
  std::memcpy(xp, x, k * sizeof(uint16_t));
  std::fill(xp + k, xp + kpad, 0);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w);
  const int64_t grain = std::max<int64_t>(4, 131072 / std::max<int64_t>(k, 1)) / 4 * 4;  // >= ~256 KiB of weight
#if defined(__x86_64__)
  at::parallel_for(0, (n + 3) / 4, grain / 4, [&](int64_t begin, int64_t end) {
    gemv_bf16_rows(xp, wp, bias, k, begin * 4, std::min(end * 4, n), y);
  });
#endif
}

// x [1, K] bf16, w [N, K] bf16 (plain, contiguous), bias [N] float or None -> y [1, N] bf16
// (float32 accumulation, one rounding to bf16 at the end, like oneDNN's; only the summation order differs).
torch::Tensor gemv_bf16(const torch::Tensor& x_in, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(has_avx512bf16(), "gemv_bf16 needs AVX512-BF16");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1 && x_in.scalar_type() == torch::kBFloat16, "one bf16 row [1, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.size(1) == x_in.size(1));
  const int64_t n = w.size(0), k = w.size(1);
  auto x = x_in.contiguous();
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous().to(torch::kFloat);
    TORCH_CHECK(b.numel() == n);
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({1, n}, torch::dtype(torch::kBFloat16));
  gemv_bf16_raw(x.data_ptr<at::BFloat16>(), k, w.data_ptr<at::BFloat16>(), n, bp, y.data_ptr<at::BFloat16>());
  return y;
}

bool has_avx512() { return q8::has_avx512(); }

void gemv_w8a16_raw(const at::BFloat16* x, int64_t k, const int8_t* w, int64_t n, const float* w_scale,
                    const float* bias, at::BFloat16* y) {
  const int64_t kpad = (k + 15) / 16 * 16;
  float xf_stack[8192];
  std::vector<float> xf_heap(kpad > 8192 ? kpad : 0);
  float* xf = kpad > 8192 ? xf_heap.data() : xf_stack;
  for (int64_t i = 0; i < k; ++i) xf[i] = static_cast<float>(x[i]);
  std::fill(xf + k, xf + kpad, 0.f);
  const int64_t groups = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));  // >= ~256 KiB of weight
#if defined(__x86_64__)
  at::parallel_for(0, (n + 3) / 4, groups, [&](int64_t begin, int64_t end) {
    gemv_w8a16_rows(xf, w, w_scale, bias, k, begin * 4, std::min(end * 4, n), y);
  });
#endif
}

// x [1, K] bf16, w [N, K] int8 (plain, contiguous), w_scale [N] float, bias [N] float or None -> y [1, N] bf16:
// bf16(bf16(sum_k x[k] * w[n, k]) * w_scale[n] (+ bias[n])), the sum in float32 (exact products).
torch::Tensor gemv_w8a16(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& w_scale,
                         const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(has_avx512(), "gemv_w8a16 needs AVX-512");
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1 && x_in.scalar_type() == torch::kBFloat16, "one bf16 row [1, K]");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kChar && w.is_contiguous() && w.size(1) == x_in.size(1));
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(w_scale.scalar_type() == torch::kFloat && w_scale.is_contiguous() && w_scale.numel() == n);
  auto x = x_in.contiguous();
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous().to(torch::kFloat);
    TORCH_CHECK(b.numel() == n);
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({1, n}, torch::dtype(torch::kBFloat16));
  gemv_w8a16_raw(x.data_ptr<at::BFloat16>(), k, w.data_ptr<int8_t>(), n, w_scale.data_ptr<float>(), bp,
                 y.data_ptr<at::BFloat16>());
  return y;
}

TORCH_LIBRARY_FRAGMENT(q8chat, m) {
  m.def("has_avx512() -> bool", &has_avx512);
  m.def("gemv_w8a16(Tensor x, Tensor w, Tensor w_scale, Tensor? bias) -> Tensor", &gemv_w8a16);
  m.def("has_avx512bf16() -> bool", &has_avx512bf16);
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? bias) -> Tensor", &gemv_bf16);
  m.def("has_vnni() -> bool", &has_vnni);
  m.def(
      "gemv_w8a8(Tensor x, Tensor packed, Tensor comp, Tensor w_scale, Tensor? bias, float static_scale, int n) -> Tensor",
      &gemv_w8a8);
}
