// Scalar conversions between F32, F16 and BF16, against hand-computed cases and exhaustive round trips.
#include <cmath>
#include <cstring>
#include <random>

#include "common.hpp"
#include "quant/pack/int4_mma.hpp"
#include "test_util.hpp"

using namespace llmq;

static float bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(Formats, F16ExhaustiveRoundTrip) {
  int checked = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = f16_to_f32(uint16_t(h));
    if (std::isnan(f)) {
      EXPECT_EQ(h & 0x7c00u, 0x7c00u);
      EXPECT_NE(h & 0x3ffu, 0u);
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), uint16_t(h)) << "h=" << h;
    ++checked;
  }
  EXPECT_EQ(checked, 65536 - 2 * 1023);
}

TEST(Formats, F16HandCases) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x7c00), INFINITY);
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie -> even (down)
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // rounds to infinity
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and the smallest subnormal -> 0
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
}

TEST(Formats, Bf16) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(uint16_t(h));
    uint32_t u;
    std::memcpy(&u, &f, 4);
    ASSERT_EQ(u, h << 16);
    if (!std::isnan(f)) {
      ASSERT_EQ(f32_to_bf16(f), h);
    }
  }
  EXPECT_EQ(f32_to_bf16(bits(0x3f808000u)), 0x3f80);  // tie -> even (down)
  EXPECT_EQ(f32_to_bf16(bits(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_EQ(f32_to_bf16(bits(0x3f808001u)), 0x3f81);
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

#include "quant/formats/formats.hpp"

using namespace llmq::quant;

TEST(Formats, Fp8E4M3AllCodesRoundTrip) {
  int finite = 0;
  for (int b = 0; b < 256; ++b) {
    const float f = fp8_to_f32(uint8_t(b));
    if ((b & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(f));
      continue;
    }
    ++finite;
    if (b == 0x80) {  // -0
      EXPECT_EQ(f32_to_fp8(f), 0x80);
      continue;
    }
    EXPECT_EQ(f32_to_fp8(f), uint8_t(b)) << b;
  }
  EXPECT_EQ(finite, 254);
}

// f32_to_fp8 (bit arithmetic) against the format's definition, searched: the nearest of the 127 magnitudes, ties
// to the even code, the sign kept (zeros too), NaN to 0x7F, beyond 448 and infinity to ±448. Inputs: every upper
// half of the float's bits with lower halves 0, 1, 0x7FFF, 0x8000, 0x8001 and 0xFFFF (every rounding decision of
// E4M3 depends on the upper half, and these put each tie exactly, just below and just above: 393,216 floats), and
// random ones.
TEST(Formats, Fp8E4M3MatchesNearestCodeSearch) {
  float mags[0x7F];
  for (int b = 0; b < 0x7F; ++b) mags[b] = fp8_to_f32(uint8_t(b));
  auto nearest = [&](float x) -> uint8_t {
    if (std::isnan(x)) return 0x7F;
    const uint8_t sign = std::signbit(x) ? 0x80 : 0;
    const float a = std::fabs(x);
    if (std::isinf(a)) return sign | 0x7E;
    int best = 0;
    double err = std::fabs(double(a) - mags[0]);
    for (int b = 1; b < 0x7F; ++b) {
      const double e = std::fabs(double(a) - mags[b]);
      if (e < err || (e == err && (b & 1) == 0)) best = b, err = e;
    }
    return sign | uint8_t(best);
  };
  int64_t checked = 0;
  for (uint32_t hi = 0; hi < 0x10000u; ++hi)
    for (uint32_t lo : {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu}) {
      const uint32_t u = hi << 16 | lo;
      float x;
      std::memcpy(&x, &u, 4);
      ASSERT_EQ(f32_to_fp8(x), nearest(x)) << std::hex << "bits 0x" << u;
      ++checked;
    }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> ud(-500.f, 500.f);
  for (int i = 0; i < 200000; ++i) {
    const float x = ud(rng) * (i % 3 == 0 ? 1e-3f : 1.f);
    ASSERT_EQ(f32_to_fp8(x), nearest(x)) << x;
  }
  EXPECT_EQ(checked, 6 * 65536);
}

TEST(Formats, Fp8E4M3HandCases) {
  EXPECT_EQ(fp8_to_f32(0x7E), 448.0f);
  EXPECT_EQ(fp8_to_f32(0x38), 1.0f);            // e=7, m=0
  EXPECT_EQ(fp8_to_f32(0x01), std::ldexp(1.0f, -9));  // smallest subnormal
  EXPECT_EQ(fp8_to_f32(0x08), std::ldexp(1.0f, -6));  // smallest normal
  EXPECT_EQ(f32_to_fp8(500.0f), 0x7E);          // saturates
  EXPECT_EQ(f32_to_fp8(-1e30f), 0xFE);
  EXPECT_EQ(f32_to_fp8(INFINITY), 0x7E);
  EXPECT_EQ(f32_to_fp8(NAN), 0x7F);
  EXPECT_EQ(f32_to_fp8(1.0625f), 0x38);         // halfway between 1 and 1.125: ties to even (1.0)
  EXPECT_EQ(f32_to_fp8(1.1875f), 0x3A);         // halfway between 1.125 and 1.25: ties to even (1.25)
  EXPECT_EQ(f32_to_fp8(std::ldexp(1.0f, -10)), 0x00);  // half the smallest subnormal: ties to even (0)
  EXPECT_EQ(f32_to_fp8(std::ldexp(3.0f, -10)), 0x02);  // 1.5 subnormal steps: ties to even (2)
  EXPECT_EQ(f32_to_fp8(464.0f), 0x7E);          // between 448 and the (absent) 480: saturates
  // every value rounds to the nearest code
  for (float x = -460.f; x < 460.f; x += 0.37f) {
    const float q = fp8_to_f32(f32_to_fp8(x));
    for (int b = 0; b < 256; ++b) {
      const float c = fp8_to_f32(uint8_t(b));
      if (std::isnan(c)) continue;
      ASSERT_LE(std::abs(q - x), std::abs(c - x) + 1e-6f) << x;
    }
  }
}

// The compile-time table behind load_as_f32 against the reference decode, every code.
TEST(Formats, Fp8E4M3TableMatchesReference) {
  for (int b = 0; b < 256; ++b) {
    const float ref = fp8_to_f32(uint8_t(b)), got = llmq::fp8_e4m3_to_f32(uint8_t(b));
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(got)) << b;
    } else {
      uint32_t a, c;
      std::memcpy(&a, &ref, 4);
      std::memcpy(&c, &got, 4);
      EXPECT_EQ(a, c) << b;  // bits, so -0 is told from +0
    }
  }
}

// fp8_round against the round trip through the code: every sign, exponent and 3-bit mantissa with the dropped
// 20 bits at and around the tie, the subnormal grid's ties, out-of-range values, and random floats.
TEST(Formats, Fp8RoundMatchesRoundTrip) {
  auto same = [](float x) {
    const float ref = fp8_to_f32(f32_to_fp8(x)), got = fp8_round(x);
    if (std::isnan(ref)) return std::isnan(got);
    uint32_t a, c;
    std::memcpy(&a, &ref, 4);
    std::memcpy(&c, &got, 4);
    return a == c;
  };
  int checked = 0;
  for (uint32_t hi = 0; hi < 4096; ++hi)
    for (uint32_t lo : {0u, 1u, 0x7FFFFu, 0x80000u, 0x80001u, 0xFFFFFu}) {
      const float x = bits((hi << 20) | lo);
      ASSERT_TRUE(same(x)) << std::hexfloat << x;
      ++checked;
    }
  for (int k = 0; k < 16; ++k)
    for (float d : {-1e-3f, 0.f, 1e-3f}) {
      const float x = (float(k) + 0.5f + d) * 0x1p-9f;
      ASSERT_TRUE(same(x) && same(-x)) << std::hexfloat << x;
    }
  for (float x : {448.f, 449.f, 463.99f, 464.f, 464.01f, 480.f, 1e30f, INFINITY, NAN, 0.f, -0.f})
    ASSERT_TRUE(same(x) && same(-x)) << x;
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const float x = bits(uint32_t(rng()));
    ASSERT_TRUE(same(x)) << std::hexfloat << x;
    ++checked;
  }
  EXPECT_GT(checked, 200000);
}

TEST(Formats, Int8AndInt4) {
  EXPECT_EQ(quant_int8(1.0f, 127.0f), 127);
  EXPECT_EQ(quant_int8(-2.0f, 127.0f), -127);  // clamps symmetric
  EXPECT_EQ(quant_int8(0.5f, 1.0f), 0);        // half to even
  EXPECT_EQ(quant_int8(1.5f, 1.0f), 2);
  EXPECT_EQ(quant_int8(-2.5f, 1.0f), -2);
  EXPECT_EQ(quant_int8(126.5f, 1.0f), 126);
  EXPECT_EQ(quant_int8(INFINITY, 1.0f), 127);
  EXPECT_EQ(quant_int8(NAN, 1.0f), -127);
  // against nearbyint and clamp (the definition) on a dense sweep through the range and past it
  for (float v = -140.f; v <= 140.f; v += 1.0f / 64) {
    const float want = std::fmin(127.f, std::fmax(-127.f, std::nearbyint(v)));
    ASSERT_EQ(quant_int8(v, 1.0f), int8_t(want)) << v;
  }
  uint8_t packed[2] = {pack_int4(3, 12), pack_int4(15, 0)};
  EXPECT_EQ(unpack_int4(packed, 0), 3);
  EXPECT_EQ(unpack_int4(packed, 1), 12);
  EXPECT_EQ(unpack_int4(packed, 2), 15);
  EXPECT_EQ(unpack_int4(packed, 3), 0);
  Int4Params p = int4_params(-1.0f, 2.0f, false);
  EXPECT_FLOAT_EQ(p.scale, 0.2f);
  EXPECT_EQ(p.zero, 5);
  EXPECT_EQ(quant_int4(-1.0f, p), 0);
  EXPECT_EQ(quant_int4(2.0f, p), 15);
  EXPECT_FLOAT_EQ(dequant_int4(quant_int4(0.0f, p), p), 0.0f);  // zero is exact
  Int4Params s = int4_params(-0.7f, 0.35f, true);
  EXPECT_FLOAT_EQ(s.scale, 0.1f);
  EXPECT_EQ(quant_int4(-0.7f, s), 1);  // -7 + 8
  // round trip error within half a step
  for (float x = -1.0f; x <= 2.0f; x += 0.013f) EXPECT_LE(std::abs(dequant_int4(quant_int4(x, p), p) - x), p.scale / 2 + 1e-6f);
}

// The INT4 tensor-core layout (quant/pack/int4_mma.hpp): a permutation of the codes, and, decoded the way the
// CUDA GEMM decodes it, the A operand of mma.m16n8k16 as PTX defines its fragments, multiplied with the B
// operand the GEMM loads (activations at k = k0 + 4t + 2r + e), gives the plain row-major product.
TEST(Formats, Int4MmaLayout) {
  std::mt19937 rng(3);
  for (auto [N, K] : std::vector<std::pair<int64_t, int64_t>>{{1, 16}, {16, 64}, {17, 80}, {33, 192}, {40, 130}}) {
    std::vector<uint8_t> codes(static_cast<size_t>(N * (K / 2)));
    for (auto& b : codes) b = uint8_t(rng() & 0xFF);
    const std::vector<uint8_t> packed = pack::int4_mma_pack(codes.data(), N, K);
    ASSERT_EQ(int64_t(packed.size()), pack::int4_mma_bytes(N, K));
    EXPECT_EQ(pack::int4_mma_unpack(packed.data(), N, K), codes) << N << "x" << K;
    if (K % 16) continue;
    std::vector<float> x(static_cast<size_t>(K));
    for (auto& v : x) v = float(int(rng() % 7) - 3);
    const int64_t units = pack::int4_mma_units(K);
    for (int64_t b = 0; b < pack::int4_mma_row_blocks(N); ++b) {
      double y[16] = {};
      for (int64_t u = 0; u < units; ++u)
        for (int s = 0; s < 4; ++s) {
          const int64_t k0 = u * 64 + 16 * s;
          if (k0 >= K) break;
          double A[16][16] = {}, B[16] = {};
          for (int lane = 0; lane < 32; ++lane) {
            const int g = lane / 4, t = lane % 4;
            uint32_t w;
            std::memcpy(&w, &packed[size_t((((b * units + u) * 32 + lane) * 4 + s) * 4)], 4);
            for (int r = 0; r < 4; ++r) {
              const uint32_t reg = ((w >> (4 * r)) & 0x000F000Fu) | 0x43004300u;  // the GEMM's decode
              for (int e = 0; e < 2; ++e) {
                const float v = bf16_to_f32(uint16_t(reg >> (16 * e))) - 128.f;  // the code
                // PTX m16n8k16 A fragment: a{2r+e}: row g (+8 for odd r), column 2t + e (+8 for r >= 2).
                A[g + 8 * (r & 1)][2 * t + e + 8 * (r >> 1)] = v;
              }
            }
            // B fragment b{2r+e} (column g = 0 here): row 2t + e + 8r; the GEMM loads x[k0 + 4t + 2r + e].
            if (g == 0)
              for (int r = 0; r < 2; ++r)
                for (int e = 0; e < 2; ++e) B[2 * t + e + 8 * r] = x[size_t(k0 + 4 * t + 2 * r + e)];
          }
          for (int i = 0; i < 16; ++i)
            for (int c = 0; c < 16; ++c) y[i] += A[i][c] * B[c];
        }
      for (int i = 0; i < 16 && b * 16 + i < N; ++i) {
        const int64_t n = b * 16 + i;
        double want = 0;
        for (int64_t k = 0; k < K; ++k) want += double((codes[size_t(n * (K / 2) + k / 2)] >> ((k & 1) * 4)) & 0xF) * x[size_t(k)];
        ASSERT_EQ(y[i], want) << "row " << n << " of " << N << "x" << K;
      }
    }
  }
}

// The INT4 scale/zero-point records (pack::int4_sz_pack), read the way wgemm_i4_kernel reads them: lane 4g + t
// takes the float2 at byte 8g of record (b, q) as the scales of rows 16b + g and 16b + g + 8, and the uint16 at
// byte 64 + 2g as their zero points (low byte row g). Rows past N read as zero.
TEST(Formats, Int4ScaleZeroRecords) {
  std::mt19937 rng(5);
  for (auto [N, G] : std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {16, 3}, {37, 2}, {64, 5}}) {
    std::vector<float> scale(static_cast<size_t>(N * G));
    std::vector<uint8_t> zero(scale.size());
    for (auto& v : scale) v = float(rng() % 1000) / 7.f;
    for (auto& z : zero) z = uint8_t(rng() % 16);
    const std::vector<uint8_t> rec = pack::int4_sz_pack(scale.data(), zero.data(), N, G);
    ASSERT_EQ(int64_t(rec.size()), pack::int4_sz_bytes(N, G));
    ASSERT_EQ(int64_t(rec.size()), (N + 15) / 16 * G * 80);
    for (int64_t b = 0; b < (N + 15) / 16; ++b)
      for (int64_t q = 0; q < G; ++q)
        for (int g = 0; g < 8; ++g) {
          const uint8_t* r = rec.data() + (b * G + q) * pack::kInt4SzRecord;
          float s2[2];
          uint16_t z2;
          std::memcpy(s2, r + 8 * g, 8);
          std::memcpy(&z2, r + 64 + 2 * g, 2);
          for (int h = 0; h < 2; ++h) {
            const int64_t n = b * 16 + g + 8 * h;
            const float ws = n < N ? scale[size_t(n * G + q)] : 0.f;
            const int wz = n < N ? zero[size_t(n * G + q)] : 0;
            EXPECT_EQ(s2[h], ws) << "row " << n << " group " << q;
            EXPECT_EQ((z2 >> (8 * h)) & 0xFF, wz) << "row " << n << " group " << q;
          }
        }
  }
  EXPECT_THROW(pack::int4_sz_pack(nullptr, nullptr, 0, 1), Error);
}
