#include "eval/perplexity.hpp"

#include <chrono>
#include <cmath>

namespace llmq {

double nll(const float* logits, int64_t n, int32_t target) {
  float mx = logits[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, logits[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(logits[i]) - double(mx));
  return std::log(sum) + double(mx) - double(logits[target]);
}

PerplexityResult perplexity(const Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress) {
  auto engine = make_cpu_engine(model);
  return perplexity(*engine, tokens, ctx, max_windows, progress);
}

PerplexityResult perplexity(Engine& engine, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress) {
  const ModelConfig& c = engine.config();
  if (ctx < 2) throw Error("--ctx must be at least 2");
  if (ctx > c.max_positions)
    throw Error("--ctx " + std::to_string(ctx) + " is longer than the model's context of " + std::to_string(c.max_positions));
  int64_t windows = int64_t(tokens.size()) / ctx;
  if (windows == 0)
    throw Error("the text has " + std::to_string(tokens.size()) + " tokens, fewer than one window of " +
                std::to_string(ctx));
  if (max_windows > 0) windows = std::min(windows, max_windows);
  PerplexityResult r;
  r.tokens = int64_t(tokens.size());
  r.windows = windows;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<float> logits(static_cast<size_t>(ctx * c.vocab));
  std::vector<double> pos_nll(static_cast<size_t>(ctx - 1));
  engine.reset(1, ctx);
  double total = 0;
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<BatchToken> batch;
    for (int64_t i = 0; i < ctx; ++i) batch.push_back({tokens[size_t(w * ctx + i)], 0, int32_t(i), i + 1 < ctx});
    engine.forward(batch, logits.data());
    // Each position's loss on its own thread (a vocabulary of exponentials each), added in position order, so
    // that the total does not depend on the thread count.
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < ctx - 1; ++i)
      pos_nll[size_t(i)] = nll(&logits[size_t(i * c.vocab)], c.vocab, tokens[size_t(w * ctx + i + 1)]);
    for (int64_t i = 0; i + 1 < ctx; ++i) total += pos_nll[size_t(i)];
    r.predicted += ctx - 1;
    if (progress)
      progress(w + 1, windows, std::exp(total / double(r.predicted)));
  }
  r.mean_nll = total / double(r.predicted);
  r.ppl = std::exp(r.mean_nll);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace llmq
