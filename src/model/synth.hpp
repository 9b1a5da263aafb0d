// `llmq synth`: random-initialized Hugging Face checkpoints of published model shapes, for benchmarks that
// need a model's size and layout but not its knowledge (llama-2-7b, llama-3-8b, mistral-7b, qwen2-7b).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace llmq {

struct SynthShape {
  std::string name, architecture, model_type;
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab, max_positions;
  double rope_theta, rms_eps;
  bool qkv_bias;
  int64_t sliding_window;  // 0: none
};

// The shapes `llmq synth` knows (the four above and "tiny", a 2-layer model for tests).
const std::vector<SynthShape>& synth_shapes();

struct SynthResult {
  int64_t params = 0;
  uint64_t bytes = 0;
};

// Writes config.json and BF16 safetensors shards (+ index) of `shape` into out_dir, which must not exist
// (written to a temporary directory and renamed at the end). Weights are N(0, 0.02^2) (Irwin-Hall
// approximation, deterministic for a seed), norms 1: activations stay finite through every layer.
// tokenizer: optional tokenizer.json to copy in (its ids must fit the shape's vocabulary). layers > 0 keeps
// only that many decoder layers (every matrix keeps its shape: per-kernel benchmarks at a fraction of the size).
SynthResult synth_model(const std::string& shape, const std::string& out_dir, uint64_t seed,
                        const std::string& tokenizer, const std::function<void(const std::string&)>& log,
                        int64_t layers = 0);

}  // namespace llmq
