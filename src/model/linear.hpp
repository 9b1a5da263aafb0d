// A linear layer y = x W^T + b whose weight may be dense (F32/F16/BF16) or quantized, with an optional
// activation-quantization spec. The model calls forward(); the format decides the kernel.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "io/safetensors.hpp"
#include "quant/qconfig.hpp"

namespace llmq {

struct Linear {
  WeightFormat fmt = WeightFormat::Dense;
  ActQuant act = ActQuant::None;
  // Dense: F32/F16/BF16 [out, in]; Int8Channel: I8 [out, in]; Fp8Channel: F8E4M3 [out, in];
  // Int4Group: U8 [out, in/2], two 4-bit values per byte (quant/formats/formats.hpp).
  const TensorView* w = nullptr;
  std::vector<float> w_scale;   // Int8/Fp8: [out]; Int4Group: [out, in/group]
  std::vector<uint8_t> w_zero;  // Int4Group: [out, in/group] (8 everywhere when symmetric)
  int64_t group = 0;
  float act_scale = 0.f;        // static per-tensor activation scale (Int8Tensor, Fp8Tensor)
  std::vector<float> smooth;    // [in] or empty: weight columns were multiplied by smooth (input divided by it)
  std::vector<float> bias;      // [out] or empty
  int64_t in = 0, out = 0;

  // x: [M, in] -> y: [M, out]. Quantized formats compute exactly what the format defines: INT8 x INT8 with
  // INT32 accumulation, FP8 products in FP32, INT4 dequantized per group.
  void forward(const float* x, int64_t M, float* y) const;
  // Several linears of the same input (same `in`), e.g. q/k/v, in one parallel region when dense.
  static void forward_many(const float* x, int64_t M, std::initializer_list<std::pair<const Linear*, float*>> outs);
  // Rows [r0, r1) of the weight as float, dequantized: [r1 - r0, in].
  void dequantize_rows(int64_t r0, int64_t r1, float* out) const;
  uint64_t weight_bytes() const;  // bytes of the stored weight and its scales/zeros
};

// Quantize-dequantize of activations, as the W8A8 paths see them.
void fake_quant_fp8(const float* x, int64_t n, float scale, float* out);

}  // namespace llmq
