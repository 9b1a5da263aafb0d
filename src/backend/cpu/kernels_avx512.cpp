// AVX-512 (F, BW, VL) kernels; compiled with -mavx512*, called only when the processor has them.
#include <immintrin.h>

#include <algorithm>

#include "backend/cpu/kernels.hpp"

namespace llmq::cpu::avx512 {
namespace {

struct V {
  using T = __m512;
  static constexpr int W = 16;
  static T zero() { return _mm512_setzero_ps(); }
  static T set1(float a) { return _mm512_set1_ps(a); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T add(T a, T b) { return _mm512_add_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static __mmask16 mask(int n) { return __mmask16((1u << n) - 1u); }
  static T load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static T widen(__m256i h, DType wt) {
    return wt == DType::BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                             : _mm512_cvtph_ps(h);
  }
  template <DType WT>
  static T loadw(const void* w, int64_t off) {
    if constexpr (WT == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(w) + off);
    else return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + off)), WT);
  }
  template <DType WT>
  static T loadw_partial(const void* w, int64_t off, int n) {
    if constexpr (WT == DType::F32) return _mm512_maskz_loadu_ps(mask(n), static_cast<const float*>(w) + off);
    else return widen(_mm256_maskz_loadu_epi16(mask(n), static_cast<const uint16_t*>(w) + off), WT);
  }
  static float reduce(T v) { return _mm512_reduce_add_ps(v); }
  // out[i] = sum of the lanes of ai
  static void reduce4(T a0, T a1, T a2, T a3, float* out) {
    T t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));  // a0 a1 a0 a1 per lane
    T t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    T t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
                        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(t), _mm512_extractf32x8_ps(t, 1));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, q);
  }
};
constexpr int MR = 6;  // 6x4 accumulators + 4 weight vectors + 1 x vector = 29 of 32 registers

}  // namespace
}  // namespace llmq::cpu::avx512

#define LLMQ_ISA_NS avx512
#include "backend/cpu/gemm_simd.inl"
