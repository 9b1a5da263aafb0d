// `llmq quantize`: calibrate on the user's text, apply a method, write a quantized checkpoint atomically.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "quant/qconfig.hpp"

namespace llmq::quant {

struct QuantizeOptions {
  std::string method;  // fp8, int8-sq, w8a16, w4a16-rtn, w4a16-awq, w4a16-gptq
  std::string calib;   // plain text or JSONL with "text"; required when the method or --kv-cache needs data
  int64_t calib_samples = 128, calib_seq_len = 512;
  int64_t group_size = 128;
  bool symmetric = false;  // INT4: symmetric [-8, 7] instead of zero points
  KvFormat kv = KvFormat::None;
  float sq_alpha = 0.5f;
  bool act_static = false;  // int8-sq: per-tensor static activation scales instead of per-token dynamic
  bool act_order = false;   // GPTQ
  double damp = 0.01;       // GPTQ: dampening, relative to the mean Hessian diagonal
  // Static FP8 scales (fp8 activations, FP8 KV cache) map this many times the calibration absmax to 448: text
  // unlike the calibration set can exceed its absmax, and E4M3 saturates there, while one binade less at the top
  // only moves values below absmax/28672 into subnormals. 1 = plain absmax.
  float fp8_headroom = 2.0f;
  // The output projection: Dense keeps it as stored (the default; TensorRT-LLM and vLLM checkpoints do too),
  // Int8Channel stores INT8 rows with per-row scales, read with unquantized activations (half the bytes of the
  // BF16 matrix every decoded token reads: 0.5 of Llama 3 8B's 1.05 GB; llama.cpp's Q4/Q8 files quantize it too).
  WeightFormat lm_head = WeightFormat::Dense;
};

struct QuantizeReport {
  std::string method;
  double seconds = 0, calib_seconds = 0;
  uint64_t bytes_in = 0, bytes_out = 0;
  double bits_per_weight = 0;  // over the quantized linear layers: weights + scales + zero points
  int64_t calib_samples = 0, calib_tokens = 0;
  std::vector<std::string> notes;  // fallbacks and adjustments the user should know about
};

extern const std::vector<std::string> kMethods;

// Quantizes the dense checkpoint in `in_dir` into `out_dir`, which must not exist: everything is written to a
// temporary directory beside it and renamed at the end, so an interrupted run leaves nothing that loads.
// Deterministic: the same inputs give byte-identical files. log() receives progress lines.
QuantizeReport quantize_model(const std::string& in_dir, const std::string& out_dir, const QuantizeOptions& opt,
                              const std::function<void(const std::string&)>& log);

}  // namespace llmq::quant
