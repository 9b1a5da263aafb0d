// The Llama-family decoder (Llama 2/3, Mistral, Qwen2) on the CPU, in FP32 arithmetic.
//
// Weights stay in the memory-mapped checkpoint in their stored dtype (F32, F16 or BF16) and are widened
// exactly inside the matmul kernels; norms and biases are converted to F32 once at load.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "io/config.hpp"
#include "io/safetensors.hpp"

namespace llmq {

// y = x W^T + b with W [out, in] stored row-major in any supported dtype.
struct Linear {
  const TensorView* w = nullptr;
  std::vector<float> bias;  // empty when the layer has none
  int64_t in = 0, out = 0;
  // x: [M, in] floats -> y: [M, out] floats
  void forward(const float* x, int64_t M, float* y) const;
  // Several linears of the same input (same `in`), e.g. q/k/v, in one parallel region.
  static void forward_many(const float* x, int64_t M, std::initializer_list<std::pair<const Linear*, float*>> outs);
};

struct LayerWeights {
  std::vector<float> attn_norm, mlp_norm;  // [hidden]
  Linear q, k, v, o;                       // q: [heads*head_dim, hidden], k/v: [kv_heads*head_dim, hidden]
  Linear gate, up, down;                   // gate/up: [intermediate, hidden], down: [hidden, intermediate]
};

// Key/value cache for n_seq independent sequences of up to `capacity` positions each.
struct KVCache {
  KVCache(const ModelConfig& c, int64_t n_seq, int64_t capacity);
  int64_t n_seq, capacity, layers, kv_dim;
  std::vector<float> k, v;  // [layers][n_seq][capacity][kv_heads*head_dim]
  float* k_at(int64_t layer, int64_t seq, int64_t pos) { return &k[size_t(((layer * n_seq + seq) * capacity + pos) * kv_dim)]; }
  float* v_at(int64_t layer, int64_t seq, int64_t pos) { return &v[size_t(((layer * n_seq + seq) * capacity + pos) * kv_dim)]; }
};

// One token of a batch: which sequence it belongs to, its position there, and whether its logits are wanted.
struct BatchToken {
  int32_t token;
  int32_t seq;
  int32_t pos;
  bool logits;
};

class Model {
 public:
  // Loads config.json and the safetensors, checking every tensor's presence, dtype and shape against the
  // config. Throws llmq::Error naming the file, tensor and shapes.
  explicit Model(const std::string& dir);

  const ModelConfig& config() const { return cfg_; }
  const std::string& dir() const { return dir_; }
  int64_t param_count() const { return params_; }
  uint64_t weight_bytes() const { return weight_bytes_; }  // bytes of all tensors as stored
  // Bytes read per decoded token: every linear weight plus one embedding row (what bandwidth limits).
  uint64_t bytes_per_token() const;
  // FLOPs of the linear layers per token (2 per multiply-add), without attention.
  double flops_per_token() const;

  // Runs the batch through the model: writes K/V of every token into `cache` at (seq, pos), attends over
  // positions <= pos of the same sequence, and writes the logits of the tokens with `logits` set, in batch
  // order, to `logits_out` ([n_wanted, vocab]). Throws llmq::Error for a position outside the cache or a
  // token id outside the vocabulary.
  void forward(const std::vector<BatchToken>& batch, KVCache& cache, float* logits_out) const;

 private:
  void rope_table(int64_t n_pos) const;

  std::string dir_;
  ModelConfig cfg_;
  std::unique_ptr<Checkpoint> ckpt_;
  const TensorView* embed_ = nullptr;  // [vocab, hidden]
  Linear lm_head_;
  std::vector<float> final_norm_;
  std::vector<LayerWeights> layers_;
  std::vector<float> inv_freq_;  // [head_dim/2], after rope scaling
  mutable std::vector<float> cos_, sin_;  // [n_pos][head_dim/2]
  int64_t params_ = 0;
  uint64_t weight_bytes_ = 0;
};

}  // namespace llmq
