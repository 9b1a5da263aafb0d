#include "bench/bench.hpp"

#include <algorithm>
#include <chrono>

#include "backend/cpu/kernels.hpp"
#include "runtime/sampler.hpp"

namespace llmq {

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

BenchResult bench(Engine& engine, const BenchParams& p) {
  const Model& model = engine.model();
  const ModelConfig& c = model.config();
  if (p.batch < 1 || p.prompt_len < 1 || p.gen_len < 1) throw Error("--batch, --prompt-len and --gen-len must be positive");
  if (p.prompt_len + p.gen_len > c.max_positions)
    throw Error("--prompt-len + --gen-len exceeds the model's context of " + std::to_string(c.max_positions));
  BenchResult r;
  r.threads = num_threads();
  r.isa = cpu::isa_name(cpu::active_isa());
  r.device = engine.device();
  r.weight_bytes = model.weight_bytes();
  r.peak_gbps = engine.measure_peak_gbps();
  r.peak_gflops = engine.measure_peak_gflops();
  engine.restart_peak_memory();  // this run's peak, not that of an earlier run of the same process
  // The cache first: a batch too large for the device's memory is refused before its prompts are made.
  engine.reset(p.batch, p.prompt_len + p.gen_len);

  // Random prompts, uniform over the vocabulary. (Through sample() over equal logits they cost a sort of the
  // vocabulary a token: ~45 s of host time before a batch-64, 128-token prompt of a 128,256-token model.)
  Sampler rng_src({1.0f, 0, 1.0f, p.seed});
  std::vector<std::vector<int32_t>> prompts(size_t(p.batch));
  for (auto& pr : prompts)
    for (int64_t i = 0; i < p.prompt_len; ++i) pr.push_back(rng_src.uniform_id(c.vocab));

  std::vector<int32_t> next(static_cast<size_t>(p.batch));  // greedy: the engine's argmax of each sequence
  std::vector<double> prefill_s, decode_s;
  using clock = std::chrono::steady_clock;
  for (int rep = 0; rep <= p.repeats; ++rep) {
    if (rep > 0) engine.reset(p.batch, p.prompt_len + p.gen_len);  // (the warm-up uses the one made above)
    std::vector<BatchToken> batch;
    for (int64_t s = 0; s < p.batch; ++s)
      for (int64_t i = 0; i < p.prompt_len; ++i)
        batch.push_back({prompts[size_t(s)][size_t(i)], int32_t(s), int32_t(i), i + 1 == p.prompt_len});
    auto t0 = clock::now();
    engine.forward_argmax(batch, next.data());
    auto t1 = clock::now();
    for (int64_t step = 0; step < p.gen_len; ++step) {
      std::vector<BatchToken> dec;
      for (int64_t s = 0; s < p.batch; ++s) dec.push_back({next[size_t(s)], int32_t(s), int32_t(p.prompt_len + step), true});
      engine.forward_argmax(dec, next.data());
    }
    auto t2 = clock::now();
    if (rep == 0) continue;  // warm-up
    prefill_s.push_back(std::chrono::duration<double>(t1 - t0).count());
    decode_s.push_back(std::chrono::duration<double>(t2 - t1).count());
  }
  const double pf = median(prefill_s), dc = median(decode_s);
  r.prefill_tokens_per_s = double(p.batch * p.prompt_len) / pf;
  r.decode_tokens_per_s = double(p.batch * p.gen_len) / dc;
  r.ttft_ms = pf * 1e3;
  r.tpot_ms = dc / double(p.gen_len) * 1e3;
  // Attention FLOPs: QK^T and PV, 2 * 2 * heads * head_dim per (query, key) pair.
  const double att_per_pair = 4.0 * double(c.heads * c.head_dim) * double(c.layers);
  const double prefill_pairs = double(p.batch) * double(p.prompt_len) * double(p.prompt_len + 1) / 2;
  r.prefill_gflops = (model.flops_per_token() * double(p.batch * p.prompt_len) + att_per_pair * prefill_pairs) / pf / 1e9;
  r.decode_gflops = model.flops_per_token() * r.decode_tokens_per_s / 1e9;
  // Every decode step reads all linear weights once (shared by the batch) plus each sequence's KV cache.
  const double kv_bytes_per_step = double(p.batch) * 2.0 * double(c.layers * c.kv_heads * c.head_dim) * engine.kv_bytes_per_value() *
                                   (double(p.prompt_len) + double(p.gen_len) / 2);
  const double steps_per_s = double(p.gen_len) / dc;
  r.achieved_gbps = (double(model.bytes_per_token()) + kv_bytes_per_step) * steps_per_s / 1e9;
  r.peak_memory_bytes = engine.peak_memory_bytes();
  r.roofline_pct = r.peak_gbps > 0 ? 100.0 * r.achieved_gbps / r.peak_gbps : 0;
  r.prefill_pct_of_peak = r.peak_gflops > 0 ? 100.0 * r.prefill_gflops / r.peak_gflops : 0;
  return r;
}

}  // namespace llmq
