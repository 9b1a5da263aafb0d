// `llmq eval`: a model against its baseline on the same text, by llama.cpp's definitions: per predicted
// token KL(P_baseline || P_model) over the full vocabulary, top-1 agreement, delta-p of the target token;
// both perplexities. Optionally each linear layer's own relative output error.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/llama.hpp"

namespace llmq {

struct LayerError {
  std::string name;   // model.layers.3.mlp.down_proj
  double rel_error;   // ||Yq - Y|| / ||Y|| with both fed the baseline's input
};

struct CompareResult {
  double ppl = 0, baseline_ppl = 0, delta_ppl_pct = 0;
  double mean_kld = 0, kld_p99 = 0, top1_agreement = 0, rms_delta_p = 0;
  int64_t windows = 0, predicted = 0;
  double seconds = 0;
  std::vector<LayerError> layers;  // sorted, worst first (with per_layer)
};

// tokens: the tokenized text; windows as in the perplexity protocol. per_layer runs the baseline with hooks
// and applies each quantized linear (its input divided by the smoothing factors it was stored with) to
// the same input, so the error is the layer's own, not accumulated from earlier layers. device: where the
// models run ("cpu" or "cuda"; with per_layer the baseline runs on the CPU, where its hooks are).
CompareResult compare(const Model& model, const Model& baseline, const std::vector<int32_t>& tokens, int64_t ctx,
                      int64_t max_windows, bool per_layer, const std::function<void(int64_t, int64_t)>& progress,
                      const std::string& device = "cpu");

}  // namespace llmq
