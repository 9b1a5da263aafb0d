// The generation loop: prefill the prompt, then decode token by token with a sampler.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/llama.hpp"
#include "runtime/engine.hpp"
#include "runtime/sampler.hpp"
#include "tokenizer/tokenizer.hpp"

namespace llmq {

struct GenerateResult {
  std::vector<int32_t> ids;  // generated ids (without the prompt)
  std::string text;          // their decoded text
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t decode_steps = 0;  // forward passes after the prompt (one per generated token but the last)
  bool stopped_at_eos = false;
  // Fewer than the requested tokens because the prompt and the continuation filled the model's context.
  bool stopped_at_context = false;
};

// Throws llmq::Error when the prompt is empty or longer than the model's context (generate() checks it too; a
// caller that prints the prompt first checks before printing).
void check_prompt(const ModelConfig& c, const std::vector<int32_t>& prompt);

// Generates up to n_new tokens after `prompt` (ids, BOS included if wanted). Stops early at any id in
// stop_ids. on_text receives text as it becomes complete UTF-8 (may be empty). Throws llmq::Error when the
// prompt is empty or longer than the model's context.
GenerateResult generate(Engine& engine, const Tokenizer& tok, const std::vector<int32_t>& prompt, int64_t n_new,
                        const SamplerParams& sp, const std::vector<int32_t>& stop_ids,
                        const std::function<void(const std::string&)>& on_text);
// The same on the CPU reference engine.
GenerateResult generate(const Model& model, const Tokenizer& tok, const std::vector<int32_t>& prompt, int64_t n_new,
                        const SamplerParams& sp, const std::vector<int32_t>& stop_ids,
                        const std::function<void(const std::string&)>& on_text);

}  // namespace llmq
