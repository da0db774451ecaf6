// One decode step's attention for one sequence, in one call: RoPE on q and k (the lean decode loop's bf16
// rounding points: q*cos, roll(q)*sin and their sum each rounded to bf16), k and v written to the float32
// cache at `pos`, then softmax(q k^T / sqrt(d)) v over positions 0..pos for every query head (grouped-query
// heads share their kv head), float32 throughout, the output rounded to bf16. Replaces ~20 small ATen ops
// per layer (and two batched matmuls that ran far below the cache's read speed at these shapes).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <vector>
#include "vec.h"

namespace {

#if defined(__x86_64__)
#define Q8_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// float32 -> nearest bf16 -> float32 (ATen's bf16 elementwise ops round every result so)
Q8_AVX512 inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(q8::to_bf16(v)), 16));
}

// r[i] = sum of the lanes of v[i]: a transpose-and-add tree (45 uops for 16 sums, not 16 reductions)
Q8_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
  const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

// One query head (float32 [d], rotated) over the rows 0..seq-1 of its kv head; p: scratch for seq (+15) floats.
template <int DV>
Q8_AVX512 void attend_head(const float* q, const float* k, const float* v, int64_t seq, float scale, float* p,
                           at::BFloat16* out) {
  constexpr int64_t d = DV * 16;
  __m512 qv[DV];
  for (int j = 0; j < DV; ++j) qv[j] = _mm512_loadu_ps(q + 16 * j);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t s0 = 0; s0 < seq; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, seq - s0);
    __m512 acc[16];
    for (int64_t i = 0; i < 16; ++i) {
      acc[i] = _mm512_setzero_ps();
      if (i < n) {
        const float* ks = k + (s0 + i) * d;
        for (int j = 0; j < DV; ++j) acc[i] = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(ks + 16 * j), acc[i]);
      }
    }
    _mm512_storeu_ps(p + s0, _mm512_mul_ps(sum16(acc), vscale));  // p holds seq rounded up to 16
  }
  // softmax: max, exp(x - max) and its sum, times 1 / sum
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t s = 0; s < seq; s += 16) vmax = _mm512_mask_max_ps(vmax, q8::tail_mask(seq - s), vmax, _mm512_loadu_ps(p + s));
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t s = 0; s < seq; s += 16) {
    const __m512 e = _mm512_maskz_mov_ps(q8::tail_mask(seq - s), q8::exp512(_mm512_sub_ps(_mm512_loadu_ps(p + s), mx)));
    _mm512_storeu_ps(p + s, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(vsum);
  // out = sum_s p[s] v[s], then times 1 / sum
  __m512 o[DV];
  for (int j = 0; j < DV; ++j) o[j] = _mm512_setzero_ps();
  for (int64_t s = 0; s < seq; ++s) {
    const __m512 ps = _mm512_set1_ps(p[s] * inv);
    for (int j = 0; j < DV; ++j) o[j] = _mm512_fmadd_ps(ps, _mm512_loadu_ps(v + s * d + 16 * j), o[j]);
  }
  for (int j = 0; j < DV; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * j), q8::to_bf16(o[j]));
}

// RoPE of one head: y = bf16(bf16(x cos) + bf16(roll(x, d/2) sin)) in float32, d a multiple of 32
Q8_AVX512 void rope_head(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* sn, int64_t d, float* y) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 xv = q8::load16(x + j, 0xffff), rv = q8::load16(x + (j + half) % d, 0xffff);
    const __m512 a = round_bf16(_mm512_mul_ps(xv, q8::load16(c + j, 0xffff)));
    const __m512 b = round_bf16(_mm512_mul_ps(rv, q8::load16(sn + j, 0xffff)));
    _mm512_storeu_ps(y + j, round_bf16(_mm512_add_ps(a, b)));
  }
}

Q8_AVX512 void widen_row(const at::BFloat16* x, int64_t d, float* y) {
  for (int64_t j = 0; j < d; j += 16) _mm512_storeu_ps(y + j, q8::load16(x + j, 0xffff));
}
#endif

}  // namespace

// qkv [1, (H + 2 KV) d] bf16 (q | k | v), cos / sin [d] bf16 (sin with its first half negated: rotate_half as a
// roll), k_cache / v_cache [KV, max_len, d] float32 (written at pos) -> attention output [1, H d] bf16.
torch::Tensor rope_attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos, int64_t n_heads) {
  TORCH_CHECK(q8::has_avx512(), "rope_attend needs AVX-512");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.scalar_type() == torch::kFloat && k_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == torch::kFloat && v_cache.is_contiguous(),
              "float32 caches [kv_heads, max_len, head_dim]");
  const int64_t n_kv = k_cache.size(0), max_len = k_cache.size(1), d = k_cache.size(2), half = d / 2;
  TORCH_CHECK((d == 64 || d == 128) && n_heads % n_kv == 0 && pos >= 0 && pos < max_len, "bad head_dim, heads or position");
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16 && qkv.is_contiguous() && qkv.numel() == (n_heads + 2 * n_kv) * d);
  TORCH_CHECK(cos.scalar_type() == torch::kBFloat16 && sin.scalar_type() == torch::kBFloat16 && cos.numel() == d &&
              sin.numel() == d && cos.is_contiguous() && sin.is_contiguous());
  const at::BFloat16* x = qkv.data_ptr<at::BFloat16>();
  const at::BFloat16* c = cos.data_ptr<at::BFloat16>();
  const at::BFloat16* sn = sin.data_ptr<at::BFloat16>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  auto out = torch::empty({1, n_heads * d}, torch::dtype(torch::kBFloat16));
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const int64_t g = n_heads / n_kv, seq = pos + 1, seq_pad = (seq + 15) / 16 * 16;
  const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));  // Python's d ** -0.5
#if defined(__x86_64__)
  std::vector<float> q(n_heads * d);
  for (int64_t h = 0; h < n_heads + n_kv; ++h)
    rope_head(x + h * d, c, sn, d, h < n_heads ? q.data() + h * d : kc + ((h - n_heads) * max_len + pos) * d);
  for (int64_t h = 0; h < n_kv; ++h) widen_row(x + (n_heads + n_kv + h) * d, d, vc + (h * max_len + pos) * d);
  // query heads in parallel once there is enough to read (short contexts: one thread, no fork/join)
  at::parallel_for(0, n_heads, seq * d >= 8192 ? 1 : n_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> p(seq_pad);
    for (int64_t h = begin; h < end; ++h) {
      const float* kh = kc + (h / g) * max_len * d;
      const float* vh = vc + (h / g) * max_len * d;
      if (d == 64)
        attend_head<4>(q.data() + h * d, kh, vh, seq, scale, p.data(), op + h * d);
      else
        attend_head<8>(q.data() + h * d, kh, vh, seq, scale, p.data(), op + h * d);
    }
  });
#endif
  return out;
}

TORCH_LIBRARY_FRAGMENT(q8chat, m) {
  m.def("rope_attend(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int n_heads) -> Tensor",
        &rope_attend);
}
