// AVX2 + FMA + F16C kernels; compiled with -mavx2 -mfma -mf16c, called only when the processor has them.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "backend/cpu/kernels.hpp"

namespace llmq::cpu::avx2 {
namespace {

struct V {
  using T = __m256;
  static constexpr int W = 8;
  static T zero() { return _mm256_setzero_ps(); }
  static T set1(float a) { return _mm256_set1_ps(a); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm256_add_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T load_partial(const float* p, int n) {
    alignas(32) float buf[8] = {};
    std::memcpy(buf, p, size_t(n) * 4);
    return _mm256_load_ps(buf);
  }
  static T widen(__m128i h, DType wt) {
    return wt == DType::BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                             : _mm256_cvtph_ps(h);
  }
  template <DType WT>
  static T loadw(const void* w, int64_t off) {
    if constexpr (WT == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(w) + off);
    else return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + off)), WT);
  }
  template <DType WT>
  static T loadw_partial(const void* w, int64_t off, int n) {
    if constexpr (WT == DType::F32) return load_partial(static_cast<const float*>(w) + off, n);
    alignas(16) uint16_t buf[8] = {};
    std::memcpy(buf, static_cast<const uint16_t*>(w) + off, size_t(n) * 2);
    return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), WT);
  }
  static float reduce(T v) {
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    q = _mm_add_ss(q, _mm_movehdup_ps(q));
    return _mm_cvtss_f32(q);
  }
  static void reduce4(T a0, T a1, T a2, T a3, float* out) {
    T h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
};
constexpr int MR = 2;  // 2x4 accumulators + 4 weight vectors + 1 x vector = 13 of 16 registers

}  // namespace
}  // namespace llmq::cpu::avx2

#define LLMQ_ISA_NS avx2
#include "backend/cpu/gemm_simd.inl"
