// The one-row GEMVs of gemv.cpp on raw pointers (no tensors, no checks: callers check once), for the C++ decode
// step (decode.cpp's DecodePlan). Each writes y [n] bf16 and splits the rows over the OpenMP threads.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

bool has_vnni();
bool has_avx512bf16();
void gemv_bf16_raw(const at::BFloat16* x, int64_t k, const at::BFloat16* w, int64_t n, const float* bias,
                   at::BFloat16* y);
void gemv_w8a16_raw(const at::BFloat16* x, int64_t k, const int8_t* w, int64_t n, const float* w_scale,
                    const float* bias, at::BFloat16* y);
void gemv_w8a8_raw(const at::BFloat16* x, int64_t k, const int8_t* packed, int64_t kg_count, int64_t nblocks,
                   const int32_t* comp, const float* w_scale, const float* bias, double static_scale, int64_t n,
                   at::BFloat16* y);
