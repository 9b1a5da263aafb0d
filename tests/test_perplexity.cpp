// Perplexity protocol (shared/README.md) on the held-out texts, all windows, against reference.json:
// within 0.05% of transformers' perplexity, with the same token, window and prediction counts.
#include "eval/perplexity.hpp"
#include "test_util.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace llmq;

class Perplexity : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(Perplexity, MatchesTransformersWithinPointZeroFivePercent) {
  const auto& [model_name, file] = GetParam();
  const std::string dir = test::shared_dir() + "/models/" + model_name;
  const auto ref = test::load_json(dir + "/reference.json")["perplexity"][file];
  Model model(dir);
  Tokenizer tok = Tokenizer::load(dir);
  const auto ids = tok.encode(read_text_file(test::shared_dir() + "/data/eval/" + file), false);
  EXPECT_EQ(int64_t(ids.size()), ref["tokens"].get<int64_t>());
  PerplexityResult r = perplexity(model, ids, ref["ctx"].get<int64_t>(), 0, nullptr);
  EXPECT_EQ(r.windows, ref["windows"].get<int64_t>());
  EXPECT_EQ(r.predicted, ref["predicted"].get<int64_t>());
  const double want = ref["ppl"].get<double>();
  EXPECT_LE(std::abs(r.ppl - want) / want, 5e-4) << "ppl " << r.ppl << " vs transformers " << want;
  std::printf("%s %s: ppl %.6f (transformers %.6f, %+.5f%%) in %.1f s\n", model_name.c_str(), file.c_str(), r.ppl,
              want, 100 * (r.ppl - want) / want, r.seconds);
}

INSTANTIATE_TEST_SUITE_P(Shared, Perplexity,
                         ::testing::Values(std::make_pair("llama-27m", "docs-en.txt"),
                                           std::make_pair("llama-27m", "code-py.txt")),
                         [](const auto& param_info) {
                           std::string n = param_info.param.first + "_" + param_info.param.second;
                           for (char& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });
