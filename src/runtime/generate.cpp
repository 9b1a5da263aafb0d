#include "runtime/generate.hpp"

#include <algorithm>
#include <chrono>

namespace llmq {

GenerateResult generate(const Model& model, const Tokenizer& tok, const std::vector<int32_t>& prompt, int64_t n_new,
                        const SamplerParams& sp, const std::vector<int32_t>& stop_ids,
                        const std::function<void(const std::string&)>& on_text) {
  auto engine = make_cpu_engine(model);
  return generate(*engine, tok, prompt, n_new, sp, stop_ids, on_text);
}

void check_prompt(const ModelConfig& c, const std::vector<int32_t>& prompt) {
  if (prompt.empty()) throw Error("the prompt is empty (nothing to condition on)");
  if (int64_t(prompt.size()) > c.max_positions)
    throw Error("the prompt has " + std::to_string(prompt.size()) + " tokens, longer than the model's context of " +
                std::to_string(c.max_positions));
}

GenerateResult generate(Engine& engine, const Tokenizer& tok, const std::vector<int32_t>& prompt, int64_t n_new,
                        const SamplerParams& sp, const std::vector<int32_t>& stop_ids,
                        const std::function<void(const std::string&)>& on_text) {
  const ModelConfig& c = engine.config();
  check_prompt(c, prompt);
  const int64_t room = c.max_positions - int64_t(prompt.size());
  const bool capped = n_new > room;
  n_new = std::max<int64_t>(0, std::min<int64_t>(n_new, room));
  engine.reset(1, int64_t(prompt.size()) + n_new);
  Sampler sampler(sp);
  StreamDecoder stream(tok);
  std::vector<float> logits(static_cast<size_t>(c.vocab));
  // Greedy decoding takes the argmax from the engine (on the GPU: no logits cross to the host).
  const bool greedy = sp.temperature <= 0.f;
  int32_t next = 0;
  GenerateResult r;
  r.prompt_tokens = int64_t(prompt.size());
  using clock = std::chrono::steady_clock;

  auto t0 = clock::now();
  std::vector<BatchToken> batch;
  for (size_t i = 0; i < prompt.size(); ++i) batch.push_back({prompt[i], 0, int32_t(i), i + 1 == prompt.size()});
  // The prompt is run even when nothing is to be generated (-n 0), as llama.cpp does: the prefill time (and its
  // tokens/s) is then a measurement, not the time of an empty step.
  if (greedy) engine.forward_argmax(batch, &next);
  else engine.forward(batch, logits.data());
  auto t1 = clock::now();
  r.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  int64_t pos = int64_t(prompt.size());
  for (int64_t i = 0; i < n_new; ++i) {
    const int32_t id = greedy ? next : sampler.sample(logits.data(), c.vocab);
    r.ids.push_back(id);
    if (std::find(stop_ids.begin(), stop_ids.end(), id) != stop_ids.end()) {
      r.stopped_at_eos = true;
      break;
    }
    std::string piece = stream.push(id);
    r.text += piece;
    if (on_text && !piece.empty()) on_text(piece);
    if (i + 1 < n_new) {
      if (greedy) engine.forward_argmax({{id, 0, int32_t(pos), true}}, &next);
      else engine.forward({{id, 0, int32_t(pos), true}}, logits.data());
      ++pos;
      ++r.decode_steps;
    }
  }
  r.stopped_at_context = capped && !r.stopped_at_eos;
  std::string rest = stream.finish();
  r.text += rest;
  if (on_text && !rest.empty()) on_text(rest);
  r.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return r;
}

}  // namespace llmq
