// INT8 activation quantization and the GEMM epilogue of W8A8 prefill, with quant/reference.py's numerics.
// quantize_per_token: per-row symmetric INT8 in one pass (what the reference does in eight PyTorch ops);
// zero_point 128 returns uint8 (x_q + 128) for oneDNN's u8 x s8 kernels. dequantize: exact int32 products to
// bf16 as (acc * x_scale) * w_scale + bias in float32, one pass (the reference's order; PyTorch needs five);
// also W8A16 prefill's epilogue (bf16 products times the channel scale, plus bias).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "vec.h"

std::vector<torch::Tensor> quantize_per_token(const torch::Tensor& x_in, int64_t zero_point) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token expects [tokens, features]");
  TORCH_CHECK(zero_point == 0 || zero_point == 128, "zero_point must be 0 (int8) or 128 (uint8)");
  auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = torch::empty({M, K}, torch::dtype(zero_point ? torch::kUInt8 : torch::kInt8));
  auto s = torch::empty({M, 1}, torch::dtype(torch::kFloat));
  float* sp = s.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "quantize_per_token", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float scale = std::max(q8::row_amax(xp + m * K, K), 1e-6f) / 127.f;
        sp[m] = scale;
        if (zero_point)
          q8::quantize_row_values(xp + m * K, K, scale, 128, q.data_ptr<uint8_t>() + m * K);
        else
          q8::quantize_row_values(xp + m * K, K, scale, 0, q.data_ptr<int8_t>() + m * K);
      }
    });
  });
  return {q, s};
}

// Static per-tensor INT8 quantization with a calibrated scale: round(x / scale), clamped to +-127, plus zero_point.
torch::Tensor quantize_per_tensor(const torch::Tensor& x_in, double scale_d, int64_t zero_point) {
  TORCH_CHECK(zero_point == 0 || zero_point == 128, "zero_point must be 0 (int8) or 128 (uint8)");
  auto x = x_in.contiguous();
  const int64_t n = x.numel();
  const float scale = static_cast<float>(scale_d);
  auto q = torch::empty(x.sizes(), torch::dtype(zero_point ? torch::kUInt8 : torch::kInt8));
  AT_DISPATCH_FLOATING_TYPES_AND(at::ScalarType::BFloat16, x.scalar_type(), "quantize_per_tensor", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      if (zero_point)
        q8::quantize_row_values(xp + begin, end - begin, scale, 128, q.data_ptr<uint8_t>() + begin);
      else
        q8::quantize_row_values(xp + begin, end - begin, scale, 0, q.data_ptr<int8_t>() + begin);
    });
  });
  return q;
}

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_acc(const int32_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, p));
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_acc(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load_acc(const at::BFloat16* p, __mmask16 m) {
  return q8::load16(p, m);
}

template <typename A>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dequantize_row_avx512(
    const A* acc, float xs, const float* ws, const float* bias, int64_t n, at::BFloat16* y) {
  const __m512 vxs = _mm512_set1_ps(xs);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = q8::tail_mask(n - i);
    __m512 f = _mm512_mul_ps(load_acc(acc + i, m), vxs);
    f = _mm512_mul_ps(f, _mm512_maskz_loadu_ps(m, ws + i));
    if (bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(m, bias + i));
    _mm256_mask_storeu_epi16(reinterpret_cast<void*>(y + i), m, q8::to_bf16(f));
  }
}
#endif

// acc [M, N] int32 (or float32 holding converted int32 values; or bf16: W8A16's unscaled products, x_scale 1),
// x_scale [M] (per token) or [1] (static), w_scale [N] float, bias [N] or None -> [M, N] bf16.
torch::Tensor dequantize(const torch::Tensor& acc_in, const torch::Tensor& x_scale_in, const torch::Tensor& w_scale_in,
                         const c10::optional<torch::Tensor>& bias) {
  const auto at = acc_in.scalar_type();
  TORCH_CHECK(acc_in.dim() == 2 && (at == torch::kInt || at == torch::kFloat || at == torch::kBFloat16),
              "dequantize expects int32, float32 or bf16 [M, N]");
  auto acc = acc_in.contiguous();
  const int64_t M = acc.size(0), N = acc.size(1);
  auto xs = x_scale_in.to(torch::kFloat).contiguous();
  auto ws = w_scale_in.to(torch::kFloat).contiguous();
  TORCH_CHECK(xs.numel() == M || xs.numel() == 1, "x_scale: one per row or one for all");
  TORCH_CHECK(ws.numel() == N, "w_scale: one per column");
  torch::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N);
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, torch::dtype(torch::kBFloat16));
  const float *xp = xs.data_ptr<float>(), *wp = ws.data_ptr<float>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const bool per_row = xs.numel() == M;
  auto run = [&](auto* ap) {
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float s = xp[per_row ? m : 0];
#if defined(__x86_64__)
        if (q8::has_avx512()) {
          dequantize_row_avx512(ap + m * N, s, wp, bp, N, yp + m * N);
          continue;
        }
#endif
        for (int64_t n = 0; n < N; ++n) {
          const float f = static_cast<float>(ap[m * N + n]) * s * wp[n];
          yp[m * N + n] = static_cast<at::BFloat16>(bp ? f + bp[n] : f);
        }
      }
    });
  };
  if (at == torch::kInt)
    run(acc.data_ptr<int32_t>());
  else if (at == torch::kFloat)
    run(acc.data_ptr<float>());
  else
    run(acc.data_ptr<at::BFloat16>());
  return y;
}

TORCH_LIBRARY(q8chat, m) {
  m.def("quantize_per_token(Tensor x, int zero_point) -> Tensor[]", &quantize_per_token);
  m.def("quantize_per_tensor(Tensor x, float scale, int zero_point) -> Tensor", &quantize_per_tensor);
  m.def("dequantize(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor? bias) -> Tensor", &dequantize);
}
