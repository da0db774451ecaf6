// AVX-512 helpers shared by the CPU kernels: float32 loads from float/bf16, round-to-nearest-even bf16 stores,
// and the per-row INT8 quantizer with quant/reference.py's numerics (IEEE division, round half to even, clamp).
#pragma once
#include <ATen/ATen.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <cmath>
#include <type_traits>

namespace q8 {

inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

inline bool has_avx512() {
  static const bool ok = cpu_has_avx512();
  return ok;
}

// Scalar versions (any CPU, and double inputs): the reference's per-element math.
template <typename T>
float amax_scalar(const T* x, int64_t k) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
  return amax;
}

template <typename T, typename Q>
void quantize_scalar(const T* x, int64_t k, float scale, int zp, Q* out) {
  for (int64_t i = 0; i < k; ++i)
    out[i] = static_cast<Q>(std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(x[i]) / scale))) + zp);
}

#if defined(__x86_64__)
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
}

// float32 -> bfloat16 bits, round to nearest even (c10::BFloat16's rounding, NaN -> 0x7fc0).
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(r);
}

// exp(x), float32, ~1 ulp: x = n ln2 + r (Cody-Waite), Cephes' degree-6 polynomial for exp(r), times 2^n.
__attribute__((target("avx512f"))) inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  // exp below that is 0 in float32 (and scalef takes it there)
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl"))) float amax_avx512(const T* x, int64_t k) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    // abs(v) first: max_ps returns its second operand when one is NaN, as std::max(amax, |v|) keeps amax
    __m512 a = _mm512_abs_ps(load16(x + i, tail_mask(k - i)));
    m = _mm512_max_ps(a, m);
  }
  return _mm512_reduce_max_ps(m);
}

template <typename T, typename Q>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void quantize_avx512(const T* x, int64_t k, float scale, int zp,
                                                                           Q* out) {
  const __m512 vs = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  const __m512i vzp = _mm512_set1_epi32(zp);
  for (int64_t i = 0; i < k; i += 16) {
    const __mmask16 m = tail_mask(k - i);
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x + i, m), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(hi, _mm512_max_ps(q, lo));  // NaN -> -127, as the scalar min(127, max(-127, nan))
    _mm512_mask_cvtepi32_storeu_epi8(out + i, m, _mm512_add_epi32(_mm512_cvtps_epi32(q), vzp));
  }
}
#endif

// Row amax and quantization: AVX-512 for float/bf16 rows where the CPU has it, else the scalar loops.
template <typename T>
float row_amax(const T* x, int64_t k) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>)
    if (has_avx512()) return amax_avx512(x, k);
#endif
  return amax_scalar(x, k);
}

template <typename T, typename Q>
void quantize_row_values(const T* x, int64_t k, float scale, int zp, Q* out) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>)
    if (has_avx512()) return quantize_avx512(x, k, scale, zp, out);
#endif
  quantize_scalar(x, k, scale, zp, out);
}

}  // namespace q8
