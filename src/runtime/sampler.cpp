#include "runtime/sampler.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "common.hpp"

namespace llmq {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return int32_t(best);
}

void check_logits(const float* logits, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (std::isnan(logits[i]) || logits[i] == INFINITY)
      throw Error("the model produced a " + std::string(std::isnan(logits[i]) ? "NaN" : "+Inf") + " logit (token id " +
                  std::to_string(i) + "): its weights or a kernel are broken; try `llmq eval` against the unquantized "
                  "model, or --device cpu");
}

Sampler::Sampler(const SamplerParams& p) : p_(p), state_(p.seed) {
  if (!(p.top_p > 0.f && p.top_p <= 1.f)) throw Error("--top-p must be in (0, 1]");
  if (p.top_k < 0) throw Error("--top-k must not be negative");
  if (std::isnan(p.temperature)) throw Error("--temp must be a number");
}

uint64_t Sampler::next_u64() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double Sampler::uniform() { return double(next_u64() >> 11) * 0x1.0p-53; }

int32_t Sampler::uniform_id(int64_t n) {
  // sample() over n equal probabilities draws r = u * n and subtracts 1.0 per id until r < 0: floor(r), exactly.
  const int64_t i = int64_t(uniform() * double(n));
  return int32_t(i < n ? i : n - 1);
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  check_logits(logits, n);
  if (p_.temperature <= 0.f) return argmax(logits, n);
  idx_.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) idx_[size_t(i)] = int32_t(i);
  // Order by logit descending, ties by id, so the candidate list is deterministic.
  auto cmp = [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; };
  int64_t keep = n;
  if (p_.top_k > 0 && p_.top_k < n) {
    keep = p_.top_k;
    std::partial_sort(idx_.begin(), idx_.begin() + keep, idx_.end(), cmp);
  } else {
    std::sort(idx_.begin(), idx_.end(), cmp);
  }
  prob_.resize(size_t(keep));
  const double mx = logits[idx_[0]];
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    prob_[size_t(i)] = std::exp((double(logits[idx_[size_t(i)]]) - mx) / double(p_.temperature));
    sum += prob_[size_t(i)];
  }
  if (p_.top_p < 1.f) {
    double cum = 0;
    int64_t cut = keep;
    for (int64_t i = 0; i < keep; ++i) {
      cum += prob_[size_t(i)] / sum;
      if (cum >= double(p_.top_p)) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    sum = 0;
    for (int64_t i = 0; i < keep; ++i) sum += prob_[size_t(i)];
  }
  double r = uniform() * sum;
  for (int64_t i = 0; i < keep; ++i) {
    r -= prob_[size_t(i)];
    if (r < 0) return idx_[size_t(i)];
  }
  return idx_[size_t(keep - 1)];
}

}  // namespace llmq
