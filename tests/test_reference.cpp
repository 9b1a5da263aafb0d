// Exactness against Hugging Face transformers (float32, eager attention) through the reference.json fixtures:
// every position's top-1 and top-10, the last position's full logits, and the greedy continuation.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "model/llama.hpp"
#include "runtime/engine.hpp"
#include "runtime/generate.hpp"
#include "test_util.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace llmq;
using nlohmann::json;

class Reference : public ::testing::TestWithParam<std::string> {};

TEST_P(Reference, LogitsTop10AndGreedyMatchTransformers) {
  const std::string dir = GetParam();
  const json ref = test::load_json(dir + "/reference.json");
  Model model(dir);
  Tokenizer tok = Tokenizer::load(dir);
  const int64_t V = model.config().vocab;
  if (ref.contains("params")) {
    EXPECT_EQ(model.param_count(), ref["params"].get<int64_t>());
  }
  ASSERT_FALSE(ref["prompts"].empty());
  for (const json& p : ref["prompts"]) {
    const std::vector<int32_t> ids = p["ids"].get<std::vector<int32_t>>();
    SCOPED_TRACE(dir + " prompt of " + std::to_string(ids.size()) + " tokens");
    const std::string text = p["text"].get<std::string>();
    if (text.rfind("<first ", 0) == 0) {  // "<first 1023 tokens of data/eval/docs-en.txt, BOS first>"
      std::vector<int32_t> want = tok.encode(read_text_file(test::shared_dir() + "/data/eval/docs-en.txt"), false);
      want.resize(ids.size() - 1);
      want.insert(want.begin(), tok.bos_id());
      EXPECT_EQ(want, ids) << "tokenizer disagrees with transformers";
    } else {
      EXPECT_EQ(tok.encode(text, true), ids) << "tokenizer disagrees with transformers";
    }

    const int64_t T = int64_t(ids.size());
    KVCache cache(model.config(), 1, T);
    std::vector<BatchToken> batch;
    for (int64_t i = 0; i < T; ++i) batch.push_back({ids[size_t(i)], 0, int32_t(i), true});
    std::vector<float> logits(static_cast<size_t>(T * V), std::nanf(""));
    model.forward(batch, cache, logits.data());

    const auto& top_ids = p["top10_ids"];
    const auto& top_logits = p["top10_logits"];
    ASSERT_EQ(int64_t(top_ids.size()), T);
    int mismatches = 0;
    for (int64_t t = 0; t < T; ++t) {
      const float* row = &logits[size_t(t * V)];
      std::vector<int32_t> ours(static_cast<size_t>(V));
      std::iota(ours.begin(), ours.end(), 0);
      std::partial_sort(ours.begin(), ours.begin() + 10, ours.end(), [&](int32_t a, int32_t b) { return row[a] > row[b]; });
      const auto hf = top_ids[size_t(t)].get<std::vector<int32_t>>();
      const auto hl = top_logits[size_t(t)].get<std::vector<double>>();
      for (size_t r = 0; r < 10; ++r) {
        // HF's logit for this id agrees with ours (values, not just ranks)
        if (std::abs(row[hf[r]] - hl[r]) > 1e-3 * std::max(1.0, std::abs(hl[r]))) ++mismatches;
        if (ours[r] == hf[r]) continue;
        // A different id at rank r is allowed only as a swap between logits closer than 1e-4.
        auto it = std::find(hf.begin(), hf.end(), ours[r]);
        const double other = it != hf.end() ? hl[size_t(it - hf.begin())] : double(row[ours[r]]);
        if (std::abs(other - hl[r]) >= 1e-4) {
          ++mismatches;
          ADD_FAILURE() << "position " << t << " rank " << r << ": ours " << ours[r] << " (" << row[ours[r]]
                        << "), transformers " << hf[r] << " (" << hl[r] << ")";
        }
      }
    }
    EXPECT_EQ(mismatches, 0);

    const auto last = p["last_logits"].get<std::vector<double>>();
    ASSERT_EQ(int64_t(last.size()), V);
    double max_abs = 0, max_err = 0;
    for (int64_t i = 0; i < V; ++i) {
      max_abs = std::max(max_abs, std::abs(last[size_t(i)]));
      max_err = std::max(max_err, std::abs(double(logits[size_t((T - 1) * V + i)]) - last[size_t(i)]));
    }
    EXPECT_LE(max_err, 1e-3 * max_abs) << "last-position logits";

    const auto greedy = p["greedy_ids"].get<std::vector<int32_t>>();
    GenerateResult g = generate(model, tok, ids, int64_t(greedy.size()), SamplerParams{}, {}, nullptr);
    EXPECT_EQ(g.ids, greedy) << "greedy continuation";
    if (p.contains("greedy_text")) {
      EXPECT_EQ(tok.decode(g.ids), p["greedy_text"].get<std::string>());
    }
  }
}

// The CPU engine, counting the tokens it is asked to run.
class CountingEngine final : public Engine {
 public:
  explicit CountingEngine(const Model& m) : Engine(m), inner_(make_cpu_engine(m)) {}
  void reset(int64_t n_seq, int64_t capacity) override { inner_->reset(n_seq, capacity); }
  void forward(const std::vector<BatchToken>& batch, float* logits_out) override {
    tokens += int64_t(batch.size());
    inner_->forward(batch, logits_out);
  }
  void forward_argmax(const std::vector<BatchToken>& batch, int32_t* ids_out) override {
    tokens += int64_t(batch.size());
    inner_->forward_argmax(batch, ids_out);
  }
  std::string device() const override { return inner_->device(); }
  double kv_bytes_per_value() const override { return inner_->kv_bytes_per_value(); }
  double measure_peak_gbps() override { return inner_->measure_peak_gbps(); }
  double measure_peak_gflops() override { return inner_->measure_peak_gflops(); }
  int64_t tokens = 0;

 private:
  std::unique_ptr<Engine> inner_;
};

// generate() runs the prompt once and then one token a step, the last generated token never (nothing reads its
// logits); with nothing to generate it still runs the prompt, so that its prefill time is a measurement.
TEST(Generate, RunsThePromptOnceAndOneTokenAStep) {
  const std::string dir = test::shared_dir() + "/models/llama-7m-demo";
  Model model(dir);
  Tokenizer tok = Tokenizer::load(dir);
  const std::vector<int32_t> prompt = tok.encode("The quick brown fox", true);
  ASSERT_GT(prompt.size(), 2u);
  for (bool greedy : {true, false}) {
    SamplerParams sp;
    sp.temperature = greedy ? 0.f : 0.8f;
    for (int64_t n : {0, 1, 5}) {
      CountingEngine e(model);
      GenerateResult r = generate(e, tok, prompt, n, sp, {}, nullptr);
      EXPECT_EQ(int64_t(r.ids.size()), n) << "greedy " << greedy;
      EXPECT_EQ(e.tokens, int64_t(prompt.size()) + std::max<int64_t>(0, n - 1)) << "n " << n << ", greedy " << greedy;
      EXPECT_EQ(r.decode_steps, std::max<int64_t>(0, n - 1));
    }
  }
}

// The CPU engine counts its KV cache before allocating it: a batch larger than the machine's memory is an
// llmq::Error with the sizes, and one that fits still runs.
TEST(Engine, CpuResetRefusesACacheLargerThanMemory) {
  Model model(test::shared_dir() + "/models/llama-7m-demo");
  auto e = make_cpu_engine(model);
  try {
    e->reset(int64_t(1) << 32, 2048);  // ~2.6e16 bytes of cache
    FAIL() << "no error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("of memory available"), std::string::npos) << err.what();
    EXPECT_NE(std::string(err.what()).find("4294967296 sequence(s) of 2048 positions"), std::string::npos) << err.what();
  }
  e->reset(2, 8);
  std::vector<int32_t> ids(2);
  e->forward_argmax({{5, 0, 0, true}, {9, 1, 0, true}}, ids.data());
  EXPECT_GE(ids[0], 0);
}

// Batched decoding of several sequences at once gives the same logits as one at a time.
TEST(Batch, SeveralSequencesMatchSingle) {
  Model model(test::shared_dir() + "/models/llama-7m-demo");
  const int64_t V = model.config().vocab;
  const std::vector<std::vector<int32_t>> seqs = {{0, 5, 9, 13, 200, 17}, {0, 400}, {0, 1000, 7, 8}};
  std::vector<std::vector<float>> single;
  for (auto& s : seqs) {
    KVCache c(model.config(), 1, 8);
    std::vector<BatchToken> b;
    for (size_t i = 0; i < s.size(); ++i) b.push_back({s[i], 0, int32_t(i), i + 1 == s.size()});
    std::vector<float> l(static_cast<size_t>(V));
    model.forward(b, c, l.data());
    single.push_back(l);
  }
  // Prefill all but the last token of each sequence in one batch, then decode the last tokens together.
  KVCache c(model.config(), 3, 8);
  std::vector<BatchToken> pre, dec;
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (size_t i = 0; i + 1 < seqs[s].size(); ++i) pre.push_back({seqs[s][i], int32_t(s), int32_t(i), false});
    dec.push_back({seqs[s].back(), int32_t(s), int32_t(seqs[s].size() - 1), true});
  }
  model.forward(pre, c, nullptr);
  std::vector<float> l(static_cast<size_t>(3 * V));
  model.forward(dec, c, l.data());
  for (size_t s = 0; s < 3; ++s)
    for (int64_t i = 0; i < V; ++i) ASSERT_NEAR(l[s * size_t(V) + size_t(i)], single[s][size_t(i)], 1e-4) << s << " " << i;
}

INSTANTIATE_TEST_SUITE_P(Models, Reference, ::testing::ValuesIn(test::reference_models()),
                         [](const auto& param_info) {
                           std::string n = param_info.param.substr(param_info.param.find_last_of('/') + 1);
                           for (char& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });
