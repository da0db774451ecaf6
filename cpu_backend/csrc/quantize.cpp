// Per-token symmetric INT8 quantization of activations in one pass (what quant/reference.py does in
// eight PyTorch ops). zero_point 128 returns uint8 (x_q + 128): oneDNN's fast int8 GEMMs want u8 inputs.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

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
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t m = begin; m < end; ++m) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) {
          row[k] = static_cast<float>(xp[m * K + k]);
          amax = std::max(amax, std::fabs(row[k]));
        }
        const float scale = std::max(amax, 1e-6f) / 127.f;
        sp[m] = scale;
        if (zero_point) {
          uint8_t* out = q.data_ptr<uint8_t>() + m * K;
          for (int64_t k = 0; k < K; ++k)
            out[k] = static_cast<uint8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / scale))) + 128.f);
        } else {
          int8_t* out = q.data_ptr<int8_t>() + m * K;
          for (int64_t k = 0; k < K; ++k)
            out[k] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(row[k] / scale))));
        }
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
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(static_cast<float>(xp[i]) / scale)));
        if (zero_point)
          q.data_ptr<uint8_t>()[i] = static_cast<uint8_t>(v + 128.f);
        else
          q.data_ptr<int8_t>()[i] = static_cast<int8_t>(v);
      }
    });
  });
  return q;
}

TORCH_LIBRARY(q8chat, m) {
  m.def("quantize_per_token(Tensor x, int zero_point) -> Tensor[]", &quantize_per_token);
  m.def("quantize_per_tensor(Tensor x, float scale, int zero_point) -> Tensor", &quantize_per_tensor);
}
