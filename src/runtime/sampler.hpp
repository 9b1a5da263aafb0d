// Token sampling: greedy, temperature, top-k, top-p; seeded and reproducible across runs and machines.
#pragma once

#include <cstdint>
#include <vector>

namespace llmq {

struct SamplerParams {
  float temperature = 0.f;  // <= 0: greedy (argmax)
  int top_k = 0;            // 0: no limit
  float top_p = 1.f;        // 1: no nucleus cut
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);
  // logits: [n]. Returns the chosen id.
  int32_t sample(const float* logits, int64_t n);
  // An id drawn uniformly from [0, n): the id sample() returns for n equal logits at temperature > 0 without top-k
  // or top-p cuts, from the same draw, without its O(n log n) sort (llmq bench's random prompts).
  int32_t uniform_id(int64_t n);

 private:
  uint64_t next_u64();  // splitmix64: fixed, portable sequence
  double uniform();     // [0, 1)
  SamplerParams p_;
  uint64_t state_;
  std::vector<int32_t> idx_;
  std::vector<double> prob_;
};

int32_t argmax(const float* logits, int64_t n);

// Throws Error naming the first NaN or +Inf among logits[0, n) (a broken checkpoint or kernel): sampling over it
// is undefined (the sort's order breaks down) and its argmax an arbitrary id. -Inf (a masked id) is allowed.
void check_logits(const float* logits, int64_t n);

}  // namespace llmq
