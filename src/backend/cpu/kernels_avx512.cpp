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
  static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T fnma(T a, T b, T c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static __mmask16 mask(int n) { return __mmask16((1u << n) - 1u); }
  static T load_partial(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static T widen(__m256i h, DType wt) {
    return wt == DType::BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                             : _mm512_cvtph_ps(h);
  }
  // 16 bytes: I8 -> exact integers; F8E4M3 -> exact values times 2^-8 (the E4M3 bits shifted into F16
  // position, subnormals included; the tile multiplies its sums by kWidenScale = 256, exactly).
  static T widen8(__m128i b, DType wt) {
    if (wt == DType::I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    // Each byte into the high half of a 16-bit lane, shifted right arithmetically by one, bit 14 (a copy of
    // the sign) cleared: s 0eeee mmm0000000, the F16 of value * 2^-8.
    const __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
    const __m256i f16 = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(int16_t(0xBFFF)));
    return _mm512_cvtph_ps(f16);
  }
  template <DType WT>
  static T loadw(const void* w, int64_t off) {
    if constexpr (WT == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(w) + off);
    else if constexpr (WT == DType::I8 || WT == DType::F8E4M3)
      return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(w) + off)), WT);
    else return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + off)), WT);
  }
  template <DType WT>
  static T loadw_partial(const void* w, int64_t off, int n) {
    if constexpr (WT == DType::F32) return _mm512_maskz_loadu_ps(mask(n), static_cast<const float*>(w) + off);
    else if constexpr (WT == DType::I8 || WT == DType::F8E4M3)
      return widen8(_mm_maskz_loadu_epi8(mask(n), static_cast<const uint8_t*>(w) + off), WT);
    else return widen(_mm256_maskz_loadu_epi16(mask(n), static_cast<const uint16_t*>(w) + off), WT);
  }
  // W bytes of INT4 codes (2W codes, low nibble first) as two vectors: the even codes (low nibbles) and the
  // odd codes (high nibbles), values 0..15. One widening load, no shuffle.
  static void q4(const uint8_t* p, T* even, T* odd) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    *even = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0f)));
    *odd = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
  // Integer dot products, KI int8 pairs a step. maddubs multiplies unsigned by signed bytes, so w goes in as |w|
  // (unsigned, so -128 is 128) and x negated where w < 0 (x in [-127, 127]: no overflow; where w = 0 the product
  // is 0 either way); two products add into an int16 (at most 2 * 128 * 127 = 32512: no saturation), then pairs
  // of those into int32 lanes.
  using I = __m512i;
  static constexpr int KI = 64;
  static constexpr int IMR = 4, INR = 4;  // rows of x and of w per tile when M > 1
  static I izero() { return _mm512_setzero_si512(); }
  static I iload(const int8_t* p) { return _mm512_loadu_si512(p); }
  static I iabs(I w) { return _mm512_abs_epi8(w); }
  static I idot(I wabs, I w, I x, I acc) {
    const I sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
    const I p16 = _mm512_maddubs_epi16(wabs, sx);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(p16, _mm512_set1_epi16(1)));
  }
  static int32_t ireduce(I v) { return _mm512_reduce_add_epi32(v); }
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
