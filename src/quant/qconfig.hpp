// The quantization_config llmq writes into config.json (docs/FORMAT.md), parsed.
#pragma once

#include <cstdint>
#include <string>

namespace llmq {

enum class WeightFormat { Dense, Int8Channel, Fp8Channel, Int4Group };
enum class ActQuant { None, Int8Token, Int8Tensor, Fp8Tensor };
enum class KvFormat { None, Fp8, Int8 };

struct QuantConfig {
  std::string method;  // fp8, int8-sq, w8a16, w4a16-rtn, w4a16-awq, w4a16-gptq
  WeightFormat weights = WeightFormat::Dense;
  int64_t group_size = 0;  // Int4Group
  bool symmetric = false;  // Int4Group: zero point fixed at 8
  ActQuant acts = ActQuant::None;
  KvFormat kv = KvFormat::None;
  // The output projection's weights: Dense (kept as stored, the default, as TensorRT-LLM does) or Int8Channel
  // (INT8 rows, per-channel scales, BF16/FP32 activations, whatever `weights` is; `llmq quantize --lm-head int8`).
  WeightFormat lm_head = WeightFormat::Dense;
};

// Parses quantization_config JSON text; throws llmq::Error (naming `where`) for formats llmq does not know.
QuantConfig parse_quant_config(const std::string& json_text, const std::string& where);
// The JSON object written for a config (method-specific extras are added by the writer).
std::string quant_config_json(const QuantConfig& q);

const char* kv_format_name(KvFormat k);

}  // namespace llmq
