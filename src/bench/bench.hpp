// `llmq bench`: prefill and decode speed in roofline units (achieved GB/s and GFLOP/s against the peak
// measured on this machine in the same run).
#pragma once

#include <cstdint>
#include <string>

#include "model/llama.hpp"
#include "runtime/engine.hpp"

namespace llmq {

struct BenchParams {
  int64_t batch = 1, prompt_len = 128, gen_len = 128;
  int repeats = 3;  // median of this many timed runs, after one warm-up
  uint64_t seed = 0;
};

struct BenchResult {
  double prefill_tokens_per_s = 0, decode_tokens_per_s = 0, ttft_ms = 0, tpot_ms = 0;
  double prefill_gflops = 0, decode_gflops = 0, achieved_gbps = 0;
  double peak_gflops = 0, peak_gbps = 0, roofline_pct = 0, prefill_pct_of_peak = 0;
  uint64_t weight_bytes = 0;
  uint64_t peak_memory_bytes = 0;  // device memory high-water mark (GPU), 0 on the CPU
  int threads = 0;
  std::string device, isa;
};

BenchResult bench(Engine& engine, const BenchParams& p);

}  // namespace llmq
