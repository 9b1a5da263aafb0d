// Perplexity by the protocol of shared/README.md: non-overlapping windows of ctx tokens (short tail
// dropped), each evaluated from a fresh KV cache without BOS; loss over positions 1..ctx-1 of each window.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/llama.hpp"
#include "runtime/engine.hpp"

namespace llmq {

struct PerplexityResult {
  double ppl = 0, mean_nll = 0;
  int64_t tokens = 0, windows = 0, predicted = 0;
  double seconds = 0;
};

// tokens: the whole tokenized text. max_windows <= 0: all. progress(done, total) after each window.
// Throws llmq::Error when the text is shorter than one window.
PerplexityResult perplexity(Engine& engine, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress);
// The same on the CPU reference engine.
PerplexityResult perplexity(const Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress);

// -log softmax(logits)[target], computed stably in double.
double nll(const float* logits, int64_t n, int32_t target);

}  // namespace llmq
