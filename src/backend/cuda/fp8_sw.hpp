// E4M3FN codes to floats without FP8 hardware (below sm_89), host and device: the code that runs on Ampere, and
// the one its test (test_cuda.cpp, no GPU needed) checks against the CPU reference for every code.
//
// The library's software conversion (cuda_fp8.h), expanded into every unrolled FP8 loop, made NVVM take ~7 min
// and 2.8 GB on gemv.cu for compute_80 alone (most of CI's CUDA build). Here the code's 7 exponent/mantissa bits
// go under an FP16 exponent (1 + 4 + 3 bits -> 1 + 5 + 10): a half of exactly value / 256 for every finite code,
// subnormals included (the formats' exponent biases, 7 and 15, are 8 apart, and so are their subnormal steps,
// 2^-9 and 2^-17 after the shift), scaled back by 256 in FP32 (exact); the NaN codes (S.1111.111) are restored
// by hand.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LLMQ_HOST_DEVICE __host__ __device__
#else
#define LLMQ_HOST_DEVICE
#endif

namespace llmq::cuda {

// Two E4M3FN codes (bits 0-7 and 8-15 of `codes`) to two floats, exactly.
LLMQ_HOST_DEVICE inline float2 fp8x2_to_float2_sw(uint32_t codes) {
  const uint32_t x = (codes & 0xFFu) | ((codes & 0xFF00u) << 8);  // code 0 in bits 0-7, code 1 in bits 16-23
  const uint32_t h = ((x & 0x007F007Fu) << 7) | ((x & 0x00800080u) << 8);
  __half2_raw r;
  r.x = static_cast<unsigned short>(h & 0xFFFFu);
  r.y = static_cast<unsigned short>(h >> 16);
  float2 f = __half22float2(__half2(r));
  const uint32_t nan_bits = 0x7FC00000u;
  float nan;
  memcpy(&nan, &nan_bits, sizeof nan);
  f.x = (x & 0x7Fu) == 0x7Fu ? nan : f.x * 256.f;
  f.y = (x & 0x7F0000u) == 0x7F0000u ? nan : f.y * 256.f;
  return f;
}

}  // namespace llmq::cuda
