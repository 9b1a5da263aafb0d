// Quantization methods on float working copies of the weights: round-to-nearest (INT8, FP8, INT4 groups),
// SmoothQuant and AWQ scale migration (searched or formula, folded into the preceding op), AWQ clipping,
// and GPTQ. Each turns (weights, calibration statistics) into the tensors of the quantized checkpoint.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "io/safetensors.hpp"

namespace llmq::quant {

// A linear layer's weight as float, row-major [out, in], with its bias.
struct FLinear {
  std::string name;  // "model.layers.3.mlp.down_proj"
  int64_t out = 0, in = 0;
  std::vector<float> w;     // [out, in]
  std::vector<float> bias;  // [out] or empty
};

// INT4 groups of `group` input channels: codes [out, in] (0..15), scale and zero [out, in/group].
struct Int4Weights {
  int64_t out = 0, in = 0, group = 0;
  bool symmetric = false;
  std::vector<uint8_t> codes;
  std::vector<float> scale;
  std::vector<uint8_t> zero;
};

// Round to nearest; `clip` ([out, in/group] ratios in (0, 1], or empty) shrinks each group's range.
Int4Weights rtn_int4(const FLinear& l, int64_t group, bool symmetric, const std::vector<float>& clip = {});
// Dequantized INT4 weights [out, in].
std::vector<float> dequant(const Int4Weights& q);

// Tensors of the checkpoint (docs/FORMAT.md) for one linear.
void emit_int4(const std::string& name, const Int4Weights& q, std::vector<TensorData>& out);
void emit_int8_channel(const FLinear& l, std::vector<TensorData>& out);  // scale = row absmax / 127
void emit_fp8_channel(const FLinear& l, std::vector<TensorData>& out);   // scale = row absmax / 448
void emit_f32(const std::string& name, const std::vector<float>& v, std::vector<int64_t> shape,
              std::vector<TensorData>& out);
void emit_bias(const FLinear& l, std::vector<TensorData>& out);

// Squared output error of replacing l.w by wq ([out, in]) on inputs whose X^T X is h ([in, in], float):
// sum over rows r of (w_r - wq_r)^T H (w_r - wq_r).
double output_error(const FLinear& l, const std::vector<float>& wq, const std::vector<float>& h);

// AWQ clipping: for each (row, group), the ratio in {1, 0.95, ..., 0.55} that minimizes the group's output
// error under the diagonal block of h. Returns [out, in/group] ratios.
std::vector<float> awq_clip_search(const FLinear& l, int64_t group, bool symmetric, const std::vector<float>& h);

struct GptqResult {
  Int4Weights q;
  bool fell_back_to_rtn = false;  // the Cholesky failed even with raised dampening
  double damp_used = 0;           // relative dampening that worked (0.01 unless raised)
};

// GPTQ (Frantar et al. 2022): columns quantized in order (or by descending Hessian diagonal with act_order,
// groups then fixed up front from the original weights), each column's rounding error spread over the
// not-yet-quantized columns through the upper Cholesky factor of H^-1; lazy block updates of `block` columns.
// h: X^T X [in, in] in FP64; dampening `damp` (default 1%) of the mean diagonal, raised x10 on failure (up
// to 10x the mean diagonal).
GptqResult gptq(const FLinear& l, const std::vector<double>& h, int64_t group, bool symmetric, bool act_order,
                int64_t block = 128, double damp = 0.01);

}  // namespace llmq::quant
