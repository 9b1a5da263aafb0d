// Perplexity protocol (shared/README.md) on the held-out texts, all windows, against reference.json:
// within 0.05% of transformers' perplexity, with the same token, window and prediction counts.
#include "eval/compare.hpp"
#include "eval/perplexity.hpp"
#include "test_util.hpp"
#include "tokenizer/tokenizer.hpp"

#include <omp.h>

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

// The per-position losses and statistics run on all threads and are added in position order: the results are the
// same bits on one thread as on three (llama-7m-demo, 4 windows of 128 tokens; the model against itself for eval).
TEST(Perplexity, SameBitsOnOneThreadAsOnThree) {
  const std::string dir = test::shared_dir() + "/models/llama-7m-demo";
  Model model(dir);
  Tokenizer tok = Tokenizer::load(dir);
  const auto ids = tok.encode(read_text_file(test::shared_dir() + "/data/eval/docs-en.txt"), false);
  const int saved = omp_get_max_threads();
  PerplexityResult p[2][4];  // [one thread, three][1..4 windows]: every partial total compared, not only the last
  CompareResult c[2];
  for (int i = 0; i < 2; ++i) {
    omp_set_num_threads(i == 0 ? 1 : 3);
    for (int w = 0; w < 4; ++w) p[i][w] = perplexity(model, ids, 128, w + 1, nullptr);
    c[i] = compare(model, model, ids, 128, 4, false, nullptr, "cpu");
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(p[0][3].predicted, 4 * 127);
  for (int w = 0; w < 4; ++w) EXPECT_EQ(p[0][w].mean_nll, p[1][w].mean_nll) << w + 1 << " windows";
  EXPECT_EQ(c[0].predicted, 4 * 127);
  EXPECT_EQ(c[0].ppl, c[1].ppl);
  EXPECT_EQ(c[0].baseline_ppl, c[1].baseline_ppl);
  EXPECT_EQ(c[0].mean_kld, c[1].mean_kld);
  EXPECT_EQ(c[0].kld_p99, c[1].kld_p99);
  EXPECT_EQ(c[0].top1_agreement, c[1].top1_agreement);
  EXPECT_EQ(c[0].rms_delta_p, c[1].rms_delta_p);
  EXPECT_NEAR(c[0].ppl, p[0][3].ppl, 1e-9 * p[0][3].ppl) << "eval's perplexity is the perplexity protocol's";
}
