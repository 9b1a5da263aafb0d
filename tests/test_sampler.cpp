// Sampling: greedy is argmax; seeded runs repeat; top-k/top-p cut as defined; frequencies follow softmax.
#include <cmath>
#include <set>

#include "runtime/sampler.hpp"
#include "test_util.hpp"

using namespace llmq;

TEST(Sampler, GreedyIsArgmax) {
  const std::vector<float> l = {0.1f, 3.0f, -1.0f, 2.9f};
  Sampler s({0.f, 0, 1.f, 1});
  EXPECT_EQ(s.sample(l.data(), 4), 1);
  EXPECT_EQ(argmax(l.data(), 4), 1);
}

TEST(Sampler, SeededRunsRepeatAndSeedsDiffer) {
  std::vector<float> l(100);
  for (int i = 0; i < 100; ++i) l[size_t(i)] = float(i % 7) * 0.3f;
  auto run = [&](uint64_t seed) {
    Sampler s({1.0f, 0, 1.f, seed});
    std::vector<int32_t> out;
    for (int i = 0; i < 50; ++i) out.push_back(s.sample(l.data(), 100));
    return out;
  };
  EXPECT_EQ(run(5), run(5));
  EXPECT_NE(run(5), run(6));
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> l = {0.5f, 0.4f, 2.0f, 1.9f};
  Sampler k1({5.0f, 1, 1.f, 3});
  Sampler p0({5.0f, 0, 1e-6f, 3});
  for (int i = 0; i < 100; ++i) {
    EXPECT_EQ(k1.sample(l.data(), 4), 2);
    EXPECT_EQ(p0.sample(l.data(), 4), 2);
  }
}

TEST(Sampler, FrequenciesFollowTemperatureSoftmax) {
  // p(1) = 3/4 at temperature 1; at temperature 2 the logits halve: p(1) = sqrt3/(1+sqrt3).
  const std::vector<float> l = {0.f, std::log(3.0f)};
  for (auto [temp, want] : {std::pair{1.0f, 0.75}, std::pair{2.0f, std::sqrt(3.0) / (1 + std::sqrt(3.0))}}) {
    Sampler s({temp, 0, 1.f, 11});
    int ones = 0;
    const int n = 40000;
    for (int i = 0; i < n; ++i) ones += s.sample(l.data(), 2) == 1;
    EXPECT_NEAR(double(ones) / n, want, 0.01) << "temp " << temp;
  }
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  // probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps {0, 1}, never 2
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler s({1.0f, 0, 0.7f, 9});
  int count[3] = {};
  for (int i = 0; i < 20000; ++i) ++count[s.sample(l.data(), 3)];
  EXPECT_EQ(count[2], 0);
  EXPECT_NEAR(double(count[0]) / 20000, 0.625, 0.015);
}

TEST(Sampler, InvalidParametersAreErrors) {
  EXPECT_THROW(Sampler({1.0f, 0, 0.f, 0}), Error);
  EXPECT_THROW(Sampler({1.0f, 0, 1.5f, 0}), Error);
  EXPECT_THROW(Sampler({1.0f, -1, 1.f, 0}), Error);
}

TEST(Sampler, UniformIdIsSampleOverEqualLogits) {
  // llmq bench draws its prompts with uniform_id: the same ids as sample() over equal logits from the same seed.
  for (const int64_t n : {int64_t(1), int64_t(7), int64_t(1000), int64_t(128256)}) {
    const std::vector<float> zero(size_t(n), 0.f);
    Sampler a({1.0f, 0, 1.f, 11}), b({1.0f, 0, 1.f, 11});
    std::vector<int32_t> seen;
    for (int i = 0; i < 300; ++i) {
      const int32_t u = a.uniform_id(n);
      ASSERT_EQ(u, b.sample(zero.data(), n)) << "n " << n << " draw " << i;
      ASSERT_GE(u, 0);
      ASSERT_LT(u, n);
      seen.push_back(u);
    }
    if (n >= 1000) {
      EXPECT_GT(std::set<int32_t>(seen.begin(), seen.end()).size(), 250u) << n;  // spread, not stuck
    }
  }
}

TEST(Sampler, NonFiniteLogitsAreAnError) {
  // NaN breaks the sort's ordering (undefined behaviour) and makes argmax arbitrary: both paths refuse it by name.
  std::vector<float> l = {0.5f, 1.0f, -INFINITY, 0.25f};
  Sampler greedy({0.f, 0, 1.f, 1}), hot({1.0f, 0, 1.f, 1});
  EXPECT_EQ(greedy.sample(l.data(), 4), 1);  // -Inf is a masked id, not an error
  EXPECT_NO_THROW(hot.sample(l.data(), 4));
  l[3] = std::nanf("");
  for (Sampler* s : {&greedy, &hot}) test::expect_error([&] { s->sample(l.data(), 4); }, {"NaN logit (token id 3)"});
  l[3] = INFINITY;
  test::expect_error([&] { hot.sample(l.data(), 4); }, {"+Inf logit (token id 3)"});
}
