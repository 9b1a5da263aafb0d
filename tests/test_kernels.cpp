// Every SIMD kernel against its scalar reference on random data at awkward shapes, outputs poisoned first.
#include <cmath>
#include <random>

#include "backend/cpu/kernels.hpp"
#include "quant/formats/formats.hpp"
#include "test_util.hpp"

using namespace llmq;
using namespace llmq::cpu;

namespace {

std::vector<Isa> simd_isas() {
  std::vector<Isa> v;
  if (int(detected_isa()) >= int(Isa::AVX2)) v.push_back(Isa::AVX2);
  if (int(detected_isa()) >= int(Isa::AVX512)) v.push_back(Isa::AVX512);
  return v;
}

struct IsaGuard {
  Isa saved = active_isa();
  ~IsaGuard() { set_isa(saved); }
};

// Random weights stored in dtype wt, plus the float values they represent.
std::vector<uint8_t> make_weights(DType wt, size_t n, std::mt19937& rng, std::vector<float>& values) {
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<uint8_t> bytes(n * dtype_size(wt));
  values.resize(n);
  for (size_t i = 0; i < n; ++i) {
    float v = nd(rng);
    if (wt == DType::F32) std::memcpy(&bytes[i * 4], &v, 4);
    else if (wt == DType::I8) bytes[i] = uint8_t(int8_t(int(rng() % 255) - 127));
    else if (wt == DType::F8E4M3) {
      uint8_t b;
      do b = uint8_t(rng()); while ((b & 0x7f) == 0x7f);  // every finite code, subnormals included
      bytes[i] = b;
    } else {
      uint16_t h = wt == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
      std::memcpy(&bytes[i * 2], &h, 2);
    }
    values[i] = load_as_f32(bytes.data(), wt, i);
  }
  return bytes;
}

}  // namespace

TEST(Kernels, GemmMatchesReferenceAtAwkwardShapes) {
  if (simd_isas().empty()) GTEST_SKIP() << "no SIMD instruction set on this processor";
  IsaGuard guard;
  std::mt19937 rng(42);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t Ms[] = {1, 2, 3, 5, 6, 7, 13};
  const int64_t Ks[] = {1, 7, 15, 16, 17, 33, 100, 257};
  const int64_t Ns[] = {1, 3, 4, 5, 9, 17, 33};
  int cases = 0;
  for (Isa isa : simd_isas()) {
    for (DType wt : {DType::F32, DType::F16, DType::BF16, DType::I8, DType::F8E4M3}) {
      for (int64_t M : Ms)
        for (int64_t K : Ks)
          for (int64_t N : Ns) {
            const int64_t ldx = K + 3, ldw = K + 1, ldy = N + 2;  // strided rows
            std::vector<float> x(static_cast<size_t>(M * ldx)), wv, bias(static_cast<size_t>(N));
            for (auto& v : x) v = nd(rng);
            for (auto& v : bias) v = nd(rng);
            auto w = make_weights(wt, size_t(N * ldw), rng, wv);
            const float* b = (N % 2) ? bias.data() : nullptr;
            std::vector<float> ref(static_cast<size_t>(M * ldy), NAN), got(static_cast<size_t>(M * ldy), NAN);
            gemm_ref(x.data(), ldx, M, K, w.data(), wt, ldw, 0, N, ref.data(), ldy, b);
            set_isa(isa);
            matmul(x.data(), ldx, M, K, w.data(), wt, ldw, N, got.data(), ldy, b);
            set_isa(Isa::Scalar);
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < N; ++n) {
                // Bound on FP32 summation error in any order: K * eps * sum |x w| (plus the bias add).
                double mag = std::abs(b ? b[n] : 0.f);
                for (int64_t k = 0; k < K; ++k) mag += std::abs(double(x[size_t(m * ldx + k)]) * wv[size_t(n * ldw + k)]);
                const double tol = double(K + 1) * 0x1p-23 * mag + 1e-30;
                const float g = got[size_t(m * ldy + n)];
                ASSERT_TRUE(std::isfinite(g)) << isa_name(isa) << " M" << M << " K" << K << " N" << N;
                ASSERT_LE(std::abs(g - ref[size_t(m * ldy + n)]), tol)
                    << isa_name(isa) << " " << dtype_name(wt) << " M" << M << " K" << K << " N" << N << " at " << m << "," << n;
              }
              for (int64_t n = N; n < ldy; ++n) ASSERT_TRUE(std::isnan(got[size_t(m * ldy + n)])) << "wrote past N";
            }
            ++cases;
          }
    }
  }
  EXPECT_GT(cases, 0);
}

// The prefill path (kGemmPackMinM rows of x and more: weights widened into FP32 panels): rows past the register
// tile, K across packed blocks (256) and not a multiple of the vector width, N cut inside a panel (16 or 32 rows)
// and past a packed block (12 panels), strided rows, bias on and off, every weight type.
TEST(Kernels, PackedGemmMatchesReferenceAtAwkwardShapes) {
  if (simd_isas().empty()) GTEST_SKIP() << "no SIMD instruction set on this processor";
  IsaGuard guard;
  std::mt19937 rng(43);
  std::normal_distribution<float> nd(0.f, 1.f);
  int cases = 0;
  for (Isa isa : simd_isas())
    for (DType wt : {DType::F32, DType::F16, DType::BF16, DType::I8, DType::F8E4M3})
      for (int64_t M : {kGemmPackMinM, kGemmPackMinM + 1, int64_t(41)})
        for (int64_t K : {1, 9, 256, 300, 520})
          for (int64_t N : {1, 15, 17, 33, 200, 420}) {
            if (M > kGemmPackMinM + 1 && N > 33 && K > 256) continue;  // keep the sweep short
            const int64_t ldx = K + 3, ldw = K + 1, ldy = N + 2;
            std::vector<float> x(static_cast<size_t>(M * ldx)), wv, bias(static_cast<size_t>(N));
            for (auto& v : x) v = nd(rng);
            for (auto& v : bias) v = nd(rng);
            auto w = make_weights(wt, size_t(N * ldw), rng, wv);
            const float* b = (N + K) % 2 ? bias.data() : nullptr;
            std::vector<float> ref(static_cast<size_t>(M * ldy), NAN), got(static_cast<size_t>(M * ldy), NAN);
            gemm_ref(x.data(), ldx, M, K, w.data(), wt, ldw, 0, N, ref.data(), ldy, b);
            set_isa(isa);
            gemm_single(x.data(), ldx, M, K, w.data(), wt, ldw, N, got.data(), ldy);  // no bias: single-threaded
            std::vector<float> got_b(static_cast<size_t>(M * ldy), NAN);
            matmul(x.data(), ldx, M, K, w.data(), wt, ldw, N, got_b.data(), ldy, b);  // threaded, with bias
            set_isa(Isa::Scalar);
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < N; ++n) {
                double mag = std::abs(b ? b[n] : 0.f), dot = 0;
                for (int64_t k = 0; k < K; ++k) {
                  const double p = double(x[size_t(m * ldx + k)]) * wv[size_t(n * ldw + k)];
                  mag += std::abs(p), dot += p;
                }
                const double tol = double(K + 2) * 0x1p-23 * mag + 1e-30;
                const std::string at = std::string(isa_name(isa)) + " " + dtype_name(wt) + " M" + std::to_string(M) +
                                       " K" + std::to_string(K) + " N" + std::to_string(N) + " at " + std::to_string(m) +
                                       "," + std::to_string(n);
                ASSERT_LE(std::abs(got[size_t(m * ldy + n)] - dot), tol) << at << " (no bias)";
                ASSERT_LE(std::abs(got_b[size_t(m * ldy + n)] - ref[size_t(m * ldy + n)]), tol) << at;
              }
              for (int64_t n = N; n < ldy; ++n)
                ASSERT_TRUE(std::isnan(got[size_t(m * ldy + n)]) && std::isnan(got_b[size_t(m * ldy + n)])) << "wrote past N";
            }
            ++cases;
          }
  EXPECT_GT(cases, 100);
}

TEST(Kernels, LargeThreadedMatmulMatchesReference) {
  IsaGuard guard;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto [M, K, N] : {std::tuple<int64_t, int64_t, int64_t>{1, 512, 1000}, {37, 300, 130}, {64, 64, 8}}) {
    std::vector<float> x(static_cast<size_t>(M * K)), wv;
    for (auto& v : x) v = nd(rng);
    auto w = make_weights(DType::BF16, size_t(N * K), rng, wv);
    std::vector<float> ref(static_cast<size_t>(M * N), NAN), got(static_cast<size_t>(M * N), NAN);
    gemm_ref(x.data(), K, M, K, w.data(), DType::BF16, K, 0, N, ref.data(), N, nullptr);
    set_isa(detected_isa());
    matmul(x.data(), K, M, K, w.data(), DType::BF16, K, N, got.data(), N, nullptr);
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_NEAR(got[i], ref[i], 1e-3) << "M" << M << " K" << K << " N" << N << " i" << i;
  }
}

// Fused INT4 group GEMM (decode tiles at M = 1, dequantized blocks into the FP32 GEMM above) against the scalar
// reference and a double-precision product of the dequantized weights: group sizes the SIMD paths take (32, 128;
// 16 and 48 only on AVX2, to which AVX-512 hands them) and one they dequantize by the scalar code (6), N past
// and inside the 4-row tiles, M across the packing threshold, strided x and y, bias on and off, poisoned output
// padding; threaded through matmul_q4 over N and over M.
TEST(Kernels, Int4GroupGemmMatchesReference) {
  IsaGuard guard;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<Isa> isas = simd_isas();
  isas.push_back(Isa::Scalar);
  int cases = 0;
  struct Shape { int64_t K, group; };
  for (Isa isa : isas)
    for (Shape sh : {Shape{16, 16}, Shape{96, 32}, Shape{96, 48}, Shape{256, 128}, Shape{48, 6}, Shape{384, 128}})
      for (int64_t M : {int64_t(1), int64_t(2), int64_t(5), kGemmPackMinM, int64_t(23)})
        for (int64_t N : {1, 3, 4, 5, 9, 33, 130}) {
          const int64_t K = sh.K, ng = K / sh.group, ldx = K + 3, ldy = N + 2;
          std::vector<uint8_t> q(static_cast<size_t>(N * K / 2)), zero(static_cast<size_t>(N * ng));
          std::vector<float> scale(static_cast<size_t>(N * ng)), x(static_cast<size_t>(M * ldx)), bias(static_cast<size_t>(N));
          for (auto& b : q) b = uint8_t(rng());
          for (auto& z : zero) z = uint8_t(rng() % 16);
          for (auto& v : scale) v = std::ldexp(0.5f + float(rng() % 1000) / 1000.f, -int(rng() % 6));
          for (auto& v : x) v = nd(rng);
          for (auto& v : bias) v = nd(rng);
          const Q4Matrix w{q.data(), scale.data(), zero.data(), K, sh.group};
          const float* b = (N + M) % 2 ? bias.data() : nullptr;
          std::vector<float> ref(static_cast<size_t>(M * ldy), NAN), got(static_cast<size_t>(M * ldy), NAN);
          gemm_q4_ref(x.data(), ldx, M, w, 0, N, ref.data(), ldy, b);
          set_isa(isa);
          matmul_q4(x.data(), ldx, M, w, N, got.data(), ldy, b);
          set_isa(Isa::Scalar);
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t n = 0; n < N; ++n) {
              // mag bounds the rounding of a sum of x w (the reference, and the SIMD paths from two rows of x on);
              // mag_codes that of the one-token SIMD path, which sums x q and subtracts z sum x per group
              double mag = std::abs(b ? b[n] : 0.f), mag_codes = mag, dot = b ? b[n] : 0.f;
              for (int64_t k = 0; k < K; ++k) {
                const size_t gi = size_t(n * ng + k / sh.group);
                const uint8_t code = quant::unpack_int4(q.data() + n * (K / 2), k);
                const float wk = quant::dequant_int4(code, quant::Int4Params{scale[gi], zero[gi]});
                const double xk = x[size_t(m * ldx + k)], p = xk * wk;
                mag += std::abs(p), dot += p;
                mag_codes += std::abs(xk) * (double(code) + zero[gi]) * scale[gi];
              }
              const double tol = double(K + 2) * 0x1p-23 * mag + 1e-30;
              const double tol_codes = double(K + 2) * 0x1p-23 * mag_codes + 1e-30;
              const std::string at = std::string(isa_name(isa)) + " K" + std::to_string(K) + " g" +
                                     std::to_string(sh.group) + " M" + std::to_string(M) + " N" + std::to_string(N) +
                                     " at " + std::to_string(m) + "," + std::to_string(n);
              ASSERT_LE(std::abs(ref[size_t(m * ldy + n)] - dot), tol) << at << " (reference)";
              const bool code_sums = M == 1 && isa != Isa::Scalar && sh.group % 16 == 0;  // q4_tile's path
              ASSERT_LE(std::abs(got[size_t(m * ldy + n)] - dot), code_sums ? tol_codes : tol) << at;
            }
            for (int64_t n = N; n < ldy; ++n) ASSERT_TRUE(std::isnan(got[size_t(m * ldy + n)])) << "wrote past N";
          }
          ++cases;
        }
  EXPECT_GT(cases, 150);
}

// Attention's weighted sum of V rows: the same FMA chain per output as the reference, so equal to the bit; R past
// the 4-row pass, D past and not a multiple of the 2-vector columns, strided rows, poisoned output padding.
TEST(Kernels, WeightedSumEqualsReference) {
  if (simd_isas().empty()) GTEST_SKIP() << "no SIMD instruction set on this processor";
  IsaGuard guard;
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (Isa isa : simd_isas())
    for (int64_t R : {1, 2, 3, 5, 8})
      for (int64_t n : {1, 7, 130})
        for (int64_t D : {1, 15, 16, 17, 33, 128, 130}) {
          const int64_t ldp = n + 1, ldv = D + 3, ldo = D + 2;
          std::vector<float> p(static_cast<size_t>(R * ldp)), v(static_cast<size_t>(n * ldv));
          for (auto& x : p) x = nd(rng);
          for (auto& x : v) x = nd(rng);
          std::vector<float> ref(static_cast<size_t>(R * ldo), NAN), got(ref);
          wsum_ref(p.data(), ldp, R, n, v.data(), ldv, D, ref.data(), ldo);
          set_isa(isa);
          wsum(p.data(), ldp, R, n, v.data(), ldv, D, got.data(), ldo);
          set_isa(Isa::Scalar);
          for (int64_t r = 0; r < R; ++r) {
            for (int64_t d = 0; d < D; ++d)
              ASSERT_EQ(got[size_t(r * ldo + d)], ref[size_t(r * ldo + d)])
                  << isa_name(isa) << " R" << R << " n" << n << " D" << D << " at " << r << "," << d;
            for (int64_t d = D; d < ldo; ++d) ASSERT_TRUE(std::isnan(got[size_t(r * ldo + d)])) << "wrote past D";
          }
        }
}

TEST(Kernels, DotMatchesReference) {
  IsaGuard guard;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (Isa isa : simd_isas()) {
    for (int64_t n : {1, 5, 8, 15, 16, 17, 31, 32, 33, 100, 128, 1000}) {
      std::vector<float> a(static_cast<size_t>(n)), b(static_cast<size_t>(n));
      for (auto& v : a) v = nd(rng);
      for (auto& v : b) v = nd(rng);
      double mag = 0;
      for (int64_t i = 0; i < n; ++i) mag += std::abs(double(a[size_t(i)]) * b[size_t(i)]);
      set_isa(isa);
      const float d = dot(a.data(), b.data(), n);
      set_isa(Isa::Scalar);
      EXPECT_LE(std::abs(d - dot_ref(a.data(), b.data(), n)), double(n) * 0x1p-23 * mag) << isa_name(isa) << " n" << n;
    }
  }
}

// x in [-127, 127] (the symmetric activation quantizer's range), w any int8 (-128 included): the SIMD paths feed
// |w| and x with w's sign into a u8 x s8 multiply, which a wrong sign or a saturating int16 pair would break.
TEST(Kernels, Int8GemmIsExact) {
  IsaGuard guard;
  std::mt19937 rng(5);
  auto x8 = [&] { return int8_t(int(rng() % 255) - 127); };
  auto w8 = [&] { return int8_t(int(rng() % 256) - 128); };
  for (Isa isa : simd_isas()) {
    for (int64_t M : {1, 2, 3, 5, 9})
      for (int64_t K : {1, 15, 16, 31, 32, 33, 64, 100, 1031})
        for (int64_t N : {1, 3, 4, 7, 70}) {
          const int64_t ldx = K + 1, ldy = N + 3;
          std::vector<int8_t> x(static_cast<size_t>(M * ldx)), w(static_cast<size_t>(N * K));
          for (auto& v : x) v = x8();
          for (auto& v : w) v = w8();
          if (K == 1031) {  // large sums (beyond float's 2^24) at the extremes of both ranges
            for (int64_t i = 0; i < M * ldx; ++i) x[size_t(i)] = i % 3 ? int8_t(-127) : int8_t(127);
            std::fill(w.begin(), w.end(), int8_t(-128));
          }
          std::vector<int32_t> ref(static_cast<size_t>(M * ldy), -1), got(static_cast<size_t>(M * ldy), -1);
          gemm_i8_ref(x.data(), ldx, M, K, w.data(), K, 0, N, ref.data(), ldy);
          set_isa(isa);
          matmul_i8(x.data(), ldx, M, K, w.data(), K, N, got.data(), ldy);
          set_isa(Isa::Scalar);
          ASSERT_EQ(got, ref) << isa_name(isa) << " M" << M << " K" << K << " N" << N;
          if (K == 1031) {
            int64_t sum = 0;
            for (int64_t k = 0; k < K; ++k) sum += int64_t(x[size_t(k)]) * -128;
            EXPECT_EQ(ref[0], sum);
          }
        }
  }
}
