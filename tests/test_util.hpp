// Helpers shared by the tests.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <nlohmann/json.hpp>
#include <string>

#include "common.hpp"
#include "io/mmap_file.hpp"

namespace llmq::test {

inline std::string shared_dir() { return LLMQ_SHARED_DIR; }

inline nlohmann::json load_json(const std::string& path) {
  return nlohmann::json::parse(llmq::read_text_file(path));
}

// The model directories that carry a reference.json from Hugging Face transformers.
inline std::vector<std::string> reference_models() {
  const std::string s = shared_dir() + "/models/";
  return {s + "llama-27m", s + "llama-7m-demo", s + "tiny/tiny-llama3-rope", s + "tiny/tiny-llama-linear-rope",
          s + "tiny/tiny-qwen2-bias", s + "tiny/tiny-mistral-headdim"};
}

// Expects f() to throw llmq::Error with a one-line message containing every needle.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "multi-line message: " << msg;
  }
}

}  // namespace llmq::test
