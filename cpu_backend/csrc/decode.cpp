// The decode step's ops around the GEMVs, one C++ call each, for one token (they replace ~40 small ATen ops per
// layer, which cost more than the attention's arithmetic at these sizes), and the prefill's elementwise ops:
// - add_rmsnorm: the residual add and RMSNorm with the decoder's bf16 rounding points (rows in parallel);
// - silu_mul: silu(gate) * up, rounded as the decoder's bf16 ops round (rows in parallel);
// - rope_rows: a prefill's RoPE and cache write (the rotated queries come back head-major for attention);
// - rope_attend: the attention of one sequence: RoPE on q and k (the lean decode loop's bf16
// rounding points: q*cos, roll(q)*sin and their sum each rounded to bf16), k and v written to the float32
// cache at `pos`, then softmax(q k^T / sqrt(d)) v over positions 0..pos for every query head (grouped-query
// heads share their kv head), float32 throughout, the output rounded to bf16 (the two batched matmuls it
// replaces ran far below the cache's read speed at these shapes).
// Elementwise math is the decoder's bit for bit; sums (the norm's mean of squares, attention) run in their own
// order and exp is ours (~1 ulp), so results can differ from ATen's by a bf16 step now and then.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <vector>
#include "vec.h"
#include "gemv.h"

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

// 16 cache values as float32: the cache is float32 or bf16 (bf16 holds the same values: k after RoPE and v are
// bf16 numbers, so the attention's arithmetic is the same either way, on half the bytes)
Q8_AVX512 inline __m512 load_row(const float* p) { return _mm512_loadu_ps(p); }
Q8_AVX512 inline __m512 load_row(const at::BFloat16* p) { return q8::load16(p, 0xffff); }
Q8_AVX512 inline void store_row(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
Q8_AVX512 inline void store_row(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), q8::to_bf16(v));  // exact: v holds a bf16 value
}

// One query head (float32 [d], rotated) over the rows 0..seq-1 of its kv head; p: scratch for seq (+15) floats.
template <int DV, typename C>
Q8_AVX512 void attend_head(const float* q, const C* k, const C* v, int64_t seq, float scale, float* p,
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
        const C* ks = k + (s0 + i) * d;
        for (int j = 0; j < DV; ++j) acc[i] = _mm512_fmadd_ps(qv[j], load_row(ks + 16 * j), acc[i]);
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
    for (int j = 0; j < DV; ++j) o[j] = _mm512_fmadd_ps(ps, load_row(v + s * d + 16 * j), o[j]);
  }
  for (int j = 0; j < DV; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * j), q8::to_bf16(o[j]));
}

// RoPE of one head: y = bf16(bf16(x cos) + bf16(roll(x, d/2) sin)), d a multiple of 32, stored as float32 or bf16
template <typename Y>
Q8_AVX512 void rope_head(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* sn, int64_t d, Y* y) {
  const int64_t half = d / 2;
  for (int64_t j = 0; j < d; j += 16) {
    const __m512 xv = q8::load16(x + j, 0xffff), rv = q8::load16(x + (j + half) % d, 0xffff);
    const __m512 a = round_bf16(_mm512_mul_ps(xv, q8::load16(c + j, 0xffff)));
    const __m512 b = round_bf16(_mm512_mul_ps(rv, q8::load16(sn + j, 0xffff)));
    store_row(y + j, round_bf16(_mm512_add_ps(a, b)));
  }
}

// y[i] = bf16(float(a[i]) OP float(b[i])) for the decoder's bf16 elementwise ops
Q8_AVX512 inline __m512 load_bf16(const at::BFloat16* p, __mmask16 m) { return q8::load16(p, m); }
Q8_AVX512 inline void store_bf16(at::BFloat16* p, __mmask16 m, __m512 v) {
  _mm256_mask_storeu_epi16(reinterpret_cast<void*>(p), m, q8::to_bf16(v));
}

Q8_AVX512 void add_rmsnorm_row(const at::BFloat16* x, const at::BFloat16* delta, const at::BFloat16* w, int64_t n,
                               float eps, at::BFloat16* x_out, at::BFloat16* y) {
  __m512 ss = _mm512_setzero_ps();
  const at::BFloat16* xs = x;
  if (delta) {  // x + delta, rounded to bf16 (the residual stream is bf16)
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = q8::tail_mask(n - i);
      store_bf16(x_out + i, m, _mm512_add_ps(load_bf16(x + i, m), load_bf16(delta + i, m)));
    }
    xs = x_out;
  }
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = load_bf16(xs + i, q8::tail_mask(n - i));
    ss = _mm512_fmadd_ps(v, v, ss);  // squares of bf16 values are exact in float32
  }
  // x * rsqrt(mean(x^2) + eps) in float32, to bf16, times the bf16 weight, to bf16
  const float r = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
  const __m512 vr = _mm512_set1_ps(r);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = q8::tail_mask(n - i);
    const __m512 xn = round_bf16(_mm512_mul_ps(load_bf16(xs + i, m), vr));
    store_bf16(y + i, m, _mm512_mul_ps(load_bf16(w + i, m), xn));
  }
}

Q8_AVX512 void silu_mul_row(const at::BFloat16* gu, int64_t n, at::BFloat16* y) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = q8::tail_mask(n - i);
    const __m512 g = load_bf16(gu + i, m);
    const __m512 s = round_bf16(_mm512_div_ps(g, _mm512_add_ps(one, q8::exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
    store_bf16(y + i, m, _mm512_mul_ps(s, load_bf16(gu + n + i, m)));
  }
}

template <typename Y>
Q8_AVX512 void copy_row(const at::BFloat16* x, int64_t d, Y* y) {
  for (int64_t j = 0; j < d; j += 16) store_row(y + j, q8::load16(x + j, 0xffff));
}
#endif

}  // namespace

#if defined(__x86_64__)
// rope_attend on raw pointers: x = qkv row, c / sn = cos / signed sin [d], caches [n_kv, max_len, d] -> out [H d]
template <typename C>
void rope_attend_raw(const at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* sn, C* kc, C* vc,
                     int64_t n_kv, int64_t max_len, int64_t d, int64_t pos, int64_t n_heads, at::BFloat16* op) {
  const int64_t g = n_heads / n_kv, seq = pos + 1, seq_pad = (seq + 15) / 16 * 16;
  const float scale = static_cast<float>(std::pow(static_cast<double>(d), -0.5));  // Python's d ** -0.5
  float q_stack[64 * 128];
  std::vector<float> q_heap(n_heads * d > 64 * 128 ? n_heads * d : 0);
  float* q = n_heads * d > 64 * 128 ? q_heap.data() : q_stack;
  for (int64_t h = 0; h < n_heads; ++h) rope_head(x + h * d, c, sn, d, q + h * d);
  for (int64_t h = 0; h < n_kv; ++h) {
    rope_head(x + (n_heads + h) * d, c, sn, d, kc + (h * max_len + pos) * d);
    copy_row(x + (n_heads + n_kv + h) * d, d, vc + (h * max_len + pos) * d);
  }
  // query heads in parallel once there is enough to read (short contexts: one thread, no fork/join)
  at::parallel_for(0, n_heads, seq * d >= 8192 ? 1 : n_heads, [&](int64_t begin, int64_t end) {
    std::vector<float> p(seq_pad);
    for (int64_t h = begin; h < end; ++h) {
      const C* kh = kc + (h / g) * max_len * d;
      const C* vh = vc + (h / g) * max_len * d;
      if (d == 64)
        attend_head<4>(q + h * d, kh, vh, seq, scale, p.data(), op + h * d);
      else
        attend_head<8>(q + h * d, kh, vh, seq, scale, p.data(), op + h * d);
    }
  });
}
#endif

// qkv [1, (H + 2 KV) d] bf16 (q | k | v), cos / sin [d] bf16 (sin with its first half negated: rotate_half as a
// roll), k_cache / v_cache [KV, max_len, d] float32 or bf16 (written at pos) -> attention output [1, H d] bf16.
torch::Tensor rope_attend(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                          torch::Tensor k_cache, torch::Tensor v_cache, int64_t pos, int64_t n_heads) {
  TORCH_CHECK(q8::has_avx512(), "rope_attend needs AVX-512");
  const auto ct = k_cache.scalar_type();
  TORCH_CHECK(k_cache.dim() == 3 && (ct == torch::kFloat || ct == torch::kBFloat16) && k_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == ct && v_cache.is_contiguous(),
              "float32 or bf16 caches [kv_heads, max_len, head_dim]");
  const int64_t n_kv = k_cache.size(0), max_len = k_cache.size(1), d = k_cache.size(2);
  TORCH_CHECK((d == 64 || d == 128) && n_heads % n_kv == 0 && pos >= 0 && pos < max_len, "bad head_dim, heads or position");
  TORCH_CHECK(qkv.scalar_type() == torch::kBFloat16 && qkv.is_contiguous() && qkv.numel() == (n_heads + 2 * n_kv) * d);
  TORCH_CHECK(cos.scalar_type() == torch::kBFloat16 && sin.scalar_type() == torch::kBFloat16 && cos.numel() == d &&
              sin.numel() == d && cos.is_contiguous() && sin.is_contiguous());
  auto out = torch::empty({1, n_heads * d}, torch::dtype(torch::kBFloat16));
#if defined(__x86_64__)
  const at::BFloat16 *x = qkv.data_ptr<at::BFloat16>(), *c = cos.data_ptr<at::BFloat16>(),
                     *sn = sin.data_ptr<at::BFloat16>();
  if (ct == torch::kFloat)
    rope_attend_raw(x, c, sn, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), n_kv, max_len, d, pos, n_heads,
                    out.data_ptr<at::BFloat16>());
  else
    rope_attend_raw(x, c, sn, k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(), n_kv, max_len, d,
                    pos, n_heads, out.data_ptr<at::BFloat16>());
#endif
  return out;
}

// x [M, n] bf16 (+ delta [M, n] bf16) -> (x + delta rounded to bf16, or x itself; rmsnorm(that) * weight, bf16),
// row by row (a decode step's one row, or a prefill's M)
std::tuple<torch::Tensor, torch::Tensor> add_rmsnorm(const torch::Tensor& x, const c10::optional<torch::Tensor>& delta,
                                                     const torch::Tensor& weight, double eps) {
  TORCH_CHECK(q8::has_avx512(), "add_rmsnorm needs AVX-512");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "bf16 rows [M, n]");
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.scalar_type() == torch::kBFloat16 && weight.is_contiguous() && weight.numel() == n);
  const bool has_delta = delta.has_value() && delta->defined();
  if (has_delta)
    TORCH_CHECK(delta->scalar_type() == torch::kBFloat16 && delta->is_contiguous() && delta->numel() == x.numel());
  auto x_out = has_delta ? torch::empty_like(x) : x;
  auto y = torch::empty_like(x);
#if defined(__x86_64__)
  const at::BFloat16 *xp = x.data_ptr<at::BFloat16>(), *dp = has_delta ? delta->data_ptr<at::BFloat16>() : nullptr;
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
  at::BFloat16 *xo = x_out.data_ptr<at::BFloat16>(), *yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      add_rmsnorm_row(xp + r * n, dp ? dp + r * n : nullptr, wp, n, static_cast<float>(eps), xo + r * n, yp + r * n);
  });
#endif
  return {x_out, y};
}

// gate_up [M, 2I] bf16 (gate | up) -> silu(gate) * up [M, I] bf16
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(q8::has_avx512(), "silu_mul needs AVX-512");
  TORCH_CHECK(gate_up.scalar_type() == torch::kBFloat16 && gate_up.is_contiguous() && gate_up.dim() == 2 &&
              gate_up.size(1) % 2 == 0, "bf16 rows [M, 2I]");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto y = torch::empty({rows, n}, gate_up.options());
#if defined(__x86_64__)
  const at::BFloat16* gp = gate_up.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) silu_mul_row(gp + r * 2 * n, n, yp + r * n);
  });
#endif
  return y;
}

// A prefill's RoPE and cache write: qkv [M, (H + 2 KV) d] bf16 for positions start..start+M-1, cos / sin [M, d]
// bf16 (sin with its first half negated); k (rotated) and v go to the bf16 caches [KV, max_len, d] at those
// positions; returns the rotated queries as [H, M, d] bf16 (the layout attention reads). Same rounding as
// rope_attend's (the decoder's bit for bit: elementwise only).
torch::Tensor rope_rows(const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        torch::Tensor k_cache, torch::Tensor v_cache, int64_t start, int64_t n_heads) {
  TORCH_CHECK(q8::has_avx512(), "rope_rows needs AVX-512");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.scalar_type() == torch::kBFloat16 && k_cache.is_contiguous() &&
              v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == torch::kBFloat16 && v_cache.is_contiguous(),
              "bf16 caches [kv_heads, max_len, head_dim]");
  const int64_t n_kv = k_cache.size(0), max_len = k_cache.size(1), d = k_cache.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == torch::kBFloat16 && qkv.is_contiguous() &&
              qkv.size(1) == (n_heads + 2 * n_kv) * d, "qkv [M, (H + 2 KV) d] bf16");
  const int64_t rows = qkv.size(0);
  TORCH_CHECK(d % 32 == 0 && n_heads % n_kv == 0 && start >= 0 && start + rows <= max_len, "bad head_dim, heads or positions");
  TORCH_CHECK(cos.scalar_type() == torch::kBFloat16 && sin.scalar_type() == torch::kBFloat16 && cos.is_contiguous() &&
              sin.is_contiguous() && cos.numel() == rows * d && sin.numel() == rows * d, "cos / sin [M, d] bf16");
  auto q = torch::empty({n_heads, rows, d}, qkv.options());
#if defined(__x86_64__)
  const at::BFloat16 *x = qkv.data_ptr<at::BFloat16>(), *c = cos.data_ptr<at::BFloat16>(),
                     *sn = sin.data_ptr<at::BFloat16>();
  at::BFloat16 *qp = q.data_ptr<at::BFloat16>(), *kc = k_cache.data_ptr<at::BFloat16>(),
               *vc = v_cache.data_ptr<at::BFloat16>();
  const int64_t width = (n_heads + 2 * n_kv) * d;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const at::BFloat16* xr = x + r * width;
      for (int64_t h = 0; h < n_heads; ++h) rope_head(xr + h * d, c + r * d, sn + r * d, d, qp + (h * rows + r) * d);
      for (int64_t h = 0; h < n_kv; ++h) {
        const int64_t at = (h * max_len + start + r) * d;
        rope_head(xr + (n_heads + h) * d, c + r * d, sn + r * d, d, kc + at);
        copy_row(xr + (n_heads + n_kv + h) * d, d, vc + at);
      }
    }
  });
#endif
  return q;
}

// The whole decode step in one call: every layer's residual add + RMSNorm, GEMVs (each linear's own kernel:
// gemv.h), RoPE + cache write + attention and silu * up, then the final norm and the LM head, on buffers held by
// the plan. The same kernels and rounding as the per-op calls it replaces (~250 per step, each ~5 us of Python
// and dispatch on top of its arithmetic). Built once per generator from the model's tensors (CPUGenerator).
struct DecodePlan : torch::CustomClassHolder {
  enum Kind : int64_t { BF16 = 0, W8A16 = 1, W8A8 = 2 };
  struct Linear {
    int64_t kind, n, k;
    torch::Tensor w, comp, scale, bias;
    double static_scale;
  };
  int64_t n_heads;
  double eps;
  std::vector<Linear> linears;       // per layer qkv, o, gate_up, down; then the LM head
  std::vector<torch::Tensor> norms;  // per layer input and post-attention norm; then the final norm
  std::vector<torch::Tensor> k_cache, v_cache;
  std::vector<at::BFloat16> x, h, qkv, attn, delta, gate_up, act;

  DecodePlan(int64_t n_heads, double eps) : n_heads(n_heads), eps(eps) {}

  void add_linear(int64_t kind, torch::Tensor w, c10::optional<torch::Tensor> comp, c10::optional<torch::Tensor> scale,
                  c10::optional<torch::Tensor> bias, double static_scale, int64_t n, int64_t k) {
    TORCH_CHECK(w.is_contiguous(), "contiguous weights");
    if (kind == BF16) {
      TORCH_CHECK(has_avx512bf16() && w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.size(0) == n && w.size(1) == k);
    } else if (kind == W8A16) {
      TORCH_CHECK(q8::has_avx512() && w.scalar_type() == torch::kChar && w.dim() == 2 && w.size(0) == n && w.size(1) == k);
      TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kFloat && scale->is_contiguous() && scale->numel() == n);
    } else {
      TORCH_CHECK(kind == W8A8 && has_vnni() && w.scalar_type() == torch::kChar && w.dim() == 4 && w.size(2) == 16 &&
                  w.size(3) == 4 && w.size(0) * 16 >= n && w.size(1) * 4 >= k && w.size(1) * 4 < k + 4, "bad linear");
      TORCH_CHECK(comp.has_value() && comp->scalar_type() == torch::kInt && comp->numel() == w.size(0) * 16);
      TORCH_CHECK(scale.has_value() && scale->scalar_type() == torch::kFloat && scale->is_contiguous() && scale->numel() == n);
    }
    torch::Tensor b;
    if (bias.has_value() && bias->defined()) {
      b = bias->to(torch::kFloat).contiguous();
      TORCH_CHECK(b.numel() == n);
    }
    linears.push_back({kind, n, k, w, comp.value_or(torch::Tensor()), scale.value_or(torch::Tensor()), b, static_scale});
  }

  void add_norm(torch::Tensor w) {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 1, "bf16 norm weights");
    norms.push_back(w);
  }

  void add_cache(torch::Tensor k, torch::Tensor v) {
    TORCH_CHECK(k.dim() == 3 && k.scalar_type() == torch::kBFloat16 && k.is_contiguous() && v.sizes() == k.sizes() &&
                v.scalar_type() == torch::kBFloat16 && v.is_contiguous(), "bf16 caches [kv_heads, max_len, head_dim]");
    TORCH_CHECK((k.size(2) == 64 || k.size(2) == 128) && n_heads % k.size(0) == 0, "bad head_dim or heads");
    k_cache.push_back(k);
    v_cache.push_back(v);
  }

  void run(const Linear& l, const at::BFloat16* in, at::BFloat16* out) const {
    const float* b = l.bias.defined() ? l.bias.data_ptr<float>() : nullptr;
    if (l.kind == BF16)
      gemv_bf16_raw(in, l.k, l.w.data_ptr<at::BFloat16>(), l.n, b, out);
    else if (l.kind == W8A16)
      gemv_w8a16_raw(in, l.k, l.w.data_ptr<int8_t>(), l.n, l.scale.data_ptr<float>(), b, out);
    else
      gemv_w8a8_raw(in, l.k, l.w.data_ptr<int8_t>(), l.w.size(1), l.w.size(0), l.comp.data_ptr<int32_t>(),
                    l.scale.data_ptr<float>(), b, l.static_scale, l.n, out);
  }

  // x: the token's embedding [1, hidden] bf16; cos / sin [d] bf16 (sin's first half negated) -> logits [1, V] bf16
  torch::Tensor step(torch::Tensor x_in, torch::Tensor cos, torch::Tensor sin, int64_t pos) {
    const int64_t layers = static_cast<int64_t>(k_cache.size());
    TORCH_CHECK(layers > 0 && static_cast<int64_t>(linears.size()) == 4 * layers + 1 &&
                static_cast<int64_t>(norms.size()) == 2 * layers + 1, "incomplete decode plan");
    const int64_t hidden = norms[0].numel(), n_kv = k_cache[0].size(0), max_len = k_cache[0].size(1),
                  d = k_cache[0].size(2);
    TORCH_CHECK(pos >= 0 && pos < max_len, "position past the KV cache");
    TORCH_CHECK(x_in.scalar_type() == torch::kBFloat16 && x_in.is_contiguous() && x_in.numel() == hidden);
    TORCH_CHECK(cos.scalar_type() == torch::kBFloat16 && sin.scalar_type() == torch::kBFloat16 && cos.numel() == d &&
                sin.numel() == d && cos.is_contiguous() && sin.is_contiguous());
    const Linear& head = linears.back();
    auto logits = torch::empty({1, head.n}, torch::dtype(torch::kBFloat16));
#if defined(__x86_64__)
    const int64_t inter = linears[2].n / 2;
    x.assign(x_in.data_ptr<at::BFloat16>(), x_in.data_ptr<at::BFloat16>() + hidden);
    h.resize(hidden), delta.resize(hidden), qkv.resize(linears[0].n), attn.resize(n_heads * d);
    gate_up.resize(2 * inter), act.resize(inter);
    const at::BFloat16 *c = cos.data_ptr<at::BFloat16>(), *sn = sin.data_ptr<at::BFloat16>();
    const float e = static_cast<float>(eps);
    for (int64_t i = 0; i < layers; ++i) {
      const Linear* l = &linears[4 * i];
      add_rmsnorm_row(x.data(), i ? delta.data() : nullptr, norms[2 * i].data_ptr<at::BFloat16>(), hidden, e, x.data(),
                      h.data());
      run(l[0], h.data(), qkv.data());
      rope_attend_raw(qkv.data(), c, sn, k_cache[i].data_ptr<at::BFloat16>(), v_cache[i].data_ptr<at::BFloat16>(), n_kv,
                      max_len, d, pos, n_heads, attn.data());
      run(l[1], attn.data(), delta.data());
      add_rmsnorm_row(x.data(), delta.data(), norms[2 * i + 1].data_ptr<at::BFloat16>(), hidden, e, x.data(), h.data());
      run(l[2], h.data(), gate_up.data());
      silu_mul_row(gate_up.data(), inter, act.data());
      run(l[3], act.data(), delta.data());
    }
    add_rmsnorm_row(x.data(), delta.data(), norms.back().data_ptr<at::BFloat16>(), hidden, e, x.data(), h.data());
    run(head, h.data(), logits.data_ptr<at::BFloat16>());
#endif
    return logits;
  }
};

TORCH_LIBRARY_FRAGMENT(q8chat, m) {
  m.class_<DecodePlan>("DecodePlan")
      .def(torch::init<int64_t, double>())
      .def("add_linear", &DecodePlan::add_linear)
      .def("add_norm", &DecodePlan::add_norm)
      .def("add_cache", &DecodePlan::add_cache)
      .def("step", &DecodePlan::step);
  m.def("add_rmsnorm(Tensor x, Tensor? delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rmsnorm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rope_rows(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, int n_heads) -> Tensor",
        &rope_rows);
  m.def("rope_attend(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, int n_heads) -> Tensor",
        &rope_attend);
}
