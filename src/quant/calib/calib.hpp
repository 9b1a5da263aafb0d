// Calibration: reading the user's text, and the observers that collect activation statistics on every
// linear layer's input while the model runs over it.
#pragma once

#include <cstdint>
#include <array>
#include <functional>
#include <string>
#include <vector>

#include "model/llama.hpp"
#include "tokenizer/tokenizer.hpp"

namespace llmq::quant {

// Reads FILE (plain text, or JSONL with a "text" field per line) and returns n_samples sequences of
// seq_len tokens, taken in order from the tokenized text (documents joined by blank lines). Reads only as
// much as needed. Throws llmq::Error for a missing/empty file or fewer than seq_len tokens (saying how many
// were found and needed); returns fewer samples than asked when the text runs out (the caller reports it).
std::vector<std::vector<int32_t>> load_calibration(const std::string& path, const Tokenizer& tok, int64_t n_samples,
                                                   int64_t seq_len, int64_t* tokens_found);

// Statistics of one input site of one layer.
struct SiteStats {
  int64_t dim = 0, tokens = 0;
  std::vector<float> absmax;      // [dim] per-channel max |x|
  std::vector<double> abs_sum;    // [dim] per-channel sum |x| (mean = abs_sum / tokens)
  std::vector<double> hessian;    // [dim, dim] X^T X summed over all tokens (only when asked)
  float tensor_absmax() const;
};

struct CalibStats {
  std::vector<std::array<SiteStats, kNumSites>> sites;  // [layer][site]
  std::vector<std::vector<float>> k_absmax, v_absmax;   // [layer][kv_dim] per-channel max |k|, |v|
  int64_t samples = 0, tokens = 0;
};

// Runs the model over the samples with observers attached; with_hessian also accumulates X^T X (FP32
// products per sample, FP64 across samples). Throws llmq::Error naming the layer when an activation is NaN
// or infinite. progress(done, total) after each sample.
CalibStats calibrate(const Model& model, const std::vector<std::vector<int32_t>>& samples, bool with_hessian,
                     const std::function<void(int64_t, int64_t)>& progress);

// Layer-by-layer calibration, as GPTQ and AWQ do it: the hidden states of every sample are kept at the
// current layer boundary (samples x seq_len x hidden floats), so each layer is calibrated on the outputs of
// the layers before it as they were quantized (install them with Model::set_layer_dense before advance()).
class SequentialCalibrator {
 public:
  SequentialCalibrator(const Model& model, const std::vector<std::vector<int32_t>>& samples);
  // Statistics of layer l's inputs (and its K/V) into st.sites[l], st.k_absmax[l], st.v_absmax[l].
  void observe(int64_t l, bool with_hessian, CalibStats& st);
  // Moves the hidden states through layer l with its current weights.
  void advance(int64_t l);

 private:
  const Model& model_;
  std::vector<std::vector<BatchToken>> batches_;
  std::vector<std::vector<float>> x_;  // [sample][seq_len * hidden]
};

// Empty statistics sized for the model.
CalibStats make_stats(const Model& model);

}  // namespace llmq::quant
