// config.json of the Llama, Mistral and Qwen2 families, normalized into one struct.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common.hpp"

namespace llmq {

enum class RopeType { Default, Linear, Llama3 };

struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM", "MistralForCausalLM" or "Qwen2ForCausalLM"
  std::string model_type;    // "llama", "mistral", "qwen2"
  int64_t hidden = 0;        // hidden_size
  int64_t intermediate = 0;  // intermediate_size (SwiGLU width)
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;  // explicit head_dim, else hidden / heads
  int64_t vocab = 0;
  int64_t max_positions = 0;
  int64_t sliding_window = 0;  // 0 = full attention
  float rms_eps = 1e-6f;
  bool tie_embeddings = false;
  bool qkv_bias = false;  // Qwen2 always; Llama when attention_bias
  bool o_bias = false;    // Llama attention_bias
  bool mlp_bias = false;  // Llama mlp_bias
  // RoPE
  double rope_theta = 10000.0;
  RopeType rope_type = RopeType::Default;
  double rope_factor = 1.0;
  double rope_low_freq_factor = 1.0;
  double rope_high_freq_factor = 4.0;
  double rope_original_max_positions = 8192;
  DType dtype = DType::BF16;  // dtype / torch_dtype as declared
  int64_t bos_id = -1;
  std::vector<int64_t> eos_ids;
  // quantization_config, verbatim (empty when the model is not quantized)
  std::string quantization;
};

// Parses <dir>/config.json. Throws llmq::Error naming the file and the key for unknown architectures,
// missing or inconsistent fields, and unsupported features (rope types other than default/linear/llama3).
ModelConfig load_config(const std::string& dir);
ModelConfig parse_config(const std::string& json_text, const std::string& where);

}  // namespace llmq
