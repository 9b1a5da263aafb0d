// Quantization methods against their definitions: GPTQ and AWQ clipping lower the output error that RTN
// leaves on the calibration inputs; the error measure is the one the methods minimize.
#include <cmath>
#include <random>

#include "backend/cpu/kernels.hpp"
#include "quant/formats/formats.hpp"
#include "quant/methods/methods.hpp"
#include "test_util.hpp"

using namespace llmq;
using namespace llmq::quant;

namespace {

struct Problem {
  FLinear l;
  std::vector<float> x;  // [T, in]
  std::vector<double> h;  // X^T X
  std::vector<float> hf;
  int64_t T;
};

// Inputs with correlated channels and a few large ones, as real activations have.
Problem make_problem(int64_t out, int64_t in, int64_t T, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  Problem p{{"test", out, in, std::vector<float>(static_cast<size_t>(out * in)), {}}, std::vector<float>(static_cast<size_t>(T * in)), {}, {}, T};
  for (auto& v : p.l.w) v = 0.05f * nd(rng);
  std::vector<float> mix(static_cast<size_t>(in * 8));
  for (auto& v : mix) v = nd(rng);
  for (int64_t t = 0; t < T; ++t) {
    float z[8];
    for (auto& v : z) v = nd(rng);
    for (int64_t j = 0; j < in; ++j) {
      float v = 0.3f * nd(rng);
      for (int k = 0; k < 8; ++k) v += mix[size_t(j * 8 + k)] * z[k];
      if (j % 37 == 0) v *= 8.f;  // outlier channels
      p.x[size_t(t * in + j)] = v;
    }
  }
  p.h.assign(static_cast<size_t>(in * in), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < in; ++i)
      for (int64_t j = 0; j < in; ++j) p.h[size_t(i * in + j)] += double(p.x[size_t(t * in + i)]) * p.x[size_t(t * in + j)];
  p.hf.assign(p.h.begin(), p.h.end());
  return p;
}

// ||X W^T - X Wq^T||^2 computed directly
double direct_error(const Problem& p, const std::vector<float>& wq) {
  double e = 0;
  for (int64_t t = 0; t < p.T; ++t)
    for (int64_t r = 0; r < p.l.out; ++r) {
      double d = 0;
      for (int64_t j = 0; j < p.l.in; ++j)
        d += double(p.x[size_t(t * p.l.in + j)]) * (double(p.l.w[size_t(r * p.l.in + j)]) - wq[size_t(r * p.l.in + j)]);
      e += d * d;
    }
  return e;
}

}  // namespace

TEST(QuantMethods, OutputErrorIsTheDirectError) {
  Problem p = make_problem(24, 64, 200, 1);
  auto wq = dequant(rtn_int4(p.l, 32, false));
  const double direct = direct_error(p, wq);
  EXPECT_NEAR(output_error(p.l, wq, p.hf), direct, 1e-3 * direct);
}

TEST(QuantMethods, RtnInt4WithinHalfAStep) {
  Problem p = make_problem(8, 64, 4, 2);
  for (bool sym : {false, true}) {
    Int4Weights q = rtn_int4(p.l, 16, sym);
    auto wq = dequant(q);
    for (int64_t r = 0; r < 8; ++r)
      for (int64_t k = 0; k < 64; ++k) {
        const float s = q.scale[size_t(r * 4 + k / 16)];
        EXPECT_LE(std::abs(wq[size_t(r * 64 + k)] - p.l.w[size_t(r * 64 + k)]), s / 2 + 1e-7f);
      }
  }
}

TEST(QuantMethods, GptqBeatsRtnOnItsCalibrationInputs) {
  Problem p = make_problem(32, 256, 1024, 3);
  for (bool act_order : {false, true}) {
    for (int64_t group : {32, 128}) {
      const double rtn = direct_error(p, dequant(rtn_int4(p.l, group, false)));
      GptqResult g = gptq(p.l, p.h, group, false, act_order, 64);
      ASSERT_FALSE(g.fell_back_to_rtn);
      const double e = direct_error(p, dequant(g.q));
      std::printf("group %lld act_order %d: rtn %.4g gptq %.4g (%.2fx)\n", (long long)group, act_order, rtn, e, rtn / e);
      EXPECT_LT(e, 0.8 * rtn);
    }
  }
}

TEST(QuantMethods, AwqClipNeverWorseThanNoClip) {
  Problem p = make_problem(16, 128, 512, 4);
  const double plain = output_error(p.l, dequant(rtn_int4(p.l, 32, false)), p.hf);
  const auto clip = awq_clip_search(p.l, 32, false, p.hf);
  const double clipped = output_error(p.l, dequant(rtn_int4(p.l, 32, false, clip)), p.hf);
  EXPECT_LE(clipped, plain * 1.0001);
}

TEST(QuantMethods, GptqFallsBackWhenTheHessianIsBroken) {
  Problem p = make_problem(4, 32, 64, 5);
  std::vector<double> bad(p.h.size(), std::nan(""));
  GptqResult g = gptq(p.l, bad, 16, false, false);
  EXPECT_TRUE(g.fell_back_to_rtn);
  EXPECT_EQ(dequant(g.q), dequant(rtn_int4(p.l, 16, false)));
}

TEST(QuantMethods, GptqUsesTheRequestedDampening) {
  Problem p = make_problem(8, 64, 256, 6);
  GptqResult a = gptq(p.l, p.h, 32, false, false, 64, 0.01), b = gptq(p.l, p.h, 32, false, false, 64, 1.0);
  EXPECT_DOUBLE_EQ(a.damp_used, 0.01);
  EXPECT_DOUBLE_EQ(b.damp_used, 1.0);
  // Heavy dampening makes H^-1 nearly diagonal: less error compensation, so a larger output error.
  EXPECT_LT(direct_error(p, dequant(a.q)), direct_error(p, dequant(b.q)));
}
