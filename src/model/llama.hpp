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
#include "model/linear.hpp"
#include "quant/qconfig.hpp"

namespace llmq {

struct LayerWeights {
  std::vector<float> attn_norm, mlp_norm;  // [hidden]
  Linear q, k, v, o;                       // q: [heads*head_dim, hidden], k/v: [kv_heads*head_dim, hidden]
  Linear gate, up, down;                   // gate/up: [intermediate, hidden], down: [hidden, intermediate]
  std::vector<float> k_scale, v_scale;     // [kv_heads]: KV-cache quantization scales (empty: full precision)
};

// Where a linear layer's input comes from. Linears of one site share their input (q/k/v; gate/up).
enum class Site { AttnIn, AttnOut, MlpIn, MlpDown };
constexpr int kNumSites = 4;
const char* site_name(Site s);
// The tensor-name suffixes of the linears reading a site, in site_linears() order ("self_attn.q_proj", ...).
std::vector<std::string> site_linear_names(Site s);

// Observers of the forward pass (calibration, per-layer error). Called on the forward's thread with the
// activations of the whole batch, before any activation quantization.
struct ForwardHooks {
  virtual ~ForwardHooks() = default;
  // x: [T, dim] input of the linears at `site` of `layer`
  virtual void linear_input(int64_t layer, Site site, const float* x, int64_t T, int64_t dim) {}
  // k, v: [T, kv_heads*head_dim] after RoPE, as stored in the cache
  virtual void kv(int64_t layer, const float* k, const float* v, int64_t T) {}
  // x: [T, hidden] the final-normed rows the lm_head reads (the tokens whose logits are wanted)
  virtual void head_input(const float* x, int64_t T, int64_t dim) {}
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
  // Loads config.json and the safetensors (dense, or quantized by `llmq quantize`: docs/FORMAT.md), checking
  // every tensor's presence, dtype and shape against the config. Throws llmq::Error naming the file, tensor
  // and shapes.
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
  void forward(const std::vector<BatchToken>& batch, KVCache& cache, float* logits_out,
               ForwardHooks* hooks = nullptr) const;

  // The forward pass in pieces (calibration runs it layer by layer): embeddings of the batch's tokens into
  // x [T, hidden]; one decoder layer updating x in place; final norm and lm_head.
  void embed_tokens(const std::vector<BatchToken>& batch, std::vector<float>& x) const;
  void forward_layer(int64_t l, const std::vector<BatchToken>& batch, KVCache& cache, std::vector<float>& x,
                     ForwardHooks* hooks = nullptr, bool check = true) const;
  void head(const std::vector<BatchToken>& batch, const std::vector<float>& x, float* logits_out,
            ForwardHooks* hooks = nullptr) const;
  // Replaces layer l's linear weights by dense F32 copies (owned by the model) and its norms; used to run
  // already-quantized layers (dequantized) while calibrating the next ones.
  void set_layer_dense(int64_t l, const std::vector<std::pair<Linear*, std::vector<float>>>& weights,
                       const std::vector<float>& attn_norm, const std::vector<float>& mlp_norm);

  // Throws llmq::Error for a token outside the vocabulary or a (seq, pos) outside a cache of n_seq sequences
  // of `capacity` positions; returns the largest position. Every engine checks its batches with it.
  int64_t validate_batch(const std::vector<BatchToken>& batch, int64_t n_seq, int64_t capacity) const;
  // RoPE cos/sin tables for positions [0, n_pos): [n_pos][head_dim/2] each, as the CPU forward uses them.
  void rope_tables(int64_t n_pos, std::vector<float>& cos, std::vector<float>& sin) const;

  const std::vector<LayerWeights>& layers() const { return layers_; }
  std::vector<LayerWeights>& mutable_layers() { return layers_; }
  const Linear& lm_head() const { return lm_head_; }
  const TensorView& embed() const { return *embed_; }
  const std::vector<float>& final_norm() const { return final_norm_; }
  const QuantConfig& quant() const { return quant_; }
  const Checkpoint& checkpoint() const { return *ckpt_; }
  // The linears reading the input of `site` in layer l (q/k/v for AttnIn, ...).
  std::vector<const Linear*> site_linears(int64_t l, Site site) const;

 private:
  void rope_table(int64_t n_pos) const;
  int64_t check_batch(const std::vector<BatchToken>& batch, const KVCache& cache) const;
  std::vector<std::unique_ptr<std::pair<TensorView, std::vector<float>>>> owned_;  // set_layer_dense storage

  std::string dir_;
  ModelConfig cfg_;
  std::unique_ptr<Checkpoint> ckpt_;
  QuantConfig quant_;
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
