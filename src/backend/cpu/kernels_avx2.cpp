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
  static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
  static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T fnma(T a, T b, T c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
  static T load_partial(const float* p, int n) {
    alignas(32) float buf[8] = {};
    std::memcpy(buf, p, size_t(n) * 4);
    return _mm256_load_ps(buf);
  }
  static T widen(__m128i h, DType wt) {
    return wt == DType::BF16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                             : _mm256_cvtph_ps(h);
  }
  // 8 bytes: I8 -> exact integers; F8E4M3 -> exact values times 2^-8 (the E4M3 bits shifted into F16 position,
  // subnormals included; the tile multiplies its sums by kWidenScale = 256, exactly).
  static T widen8(__m128i b, DType wt) {
    if (wt == DType::I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    // Each byte into the high half of a 16-bit lane (s eeee mmm, then zeros), shifted right arithmetically by
    // one (the sign lands in bit 15 and bit 14), bit 14 cleared: s 0eeee mmm0000000, the F16 of value * 2^-8.
    const __m128i h = _mm_unpacklo_epi8(_mm_setzero_si128(), b);
    const __m128i f16 = _mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(int16_t(0xBFFF)));
    return _mm256_cvtph_ps(f16);
  }
  template <DType WT>
  static T loadw(const void* w, int64_t off) {
    if constexpr (WT == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(w) + off);
    else if constexpr (WT == DType::I8 || WT == DType::F8E4M3)
      return widen8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(w) + off)), WT);
    else return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + off)), WT);
  }
  template <DType WT>
  static T loadw_partial(const void* w, int64_t off, int n) {
    if constexpr (WT == DType::F32) return load_partial(static_cast<const float*>(w) + off, n);
    alignas(16) uint8_t buf[16] = {};
    std::memcpy(buf, static_cast<const uint8_t*>(w) + off * int64_t(dtype_size(WT)), size_t(n) * dtype_size(WT));
    if constexpr (WT == DType::I8 || WT == DType::F8E4M3)
      return widen8(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), WT);
    else return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), WT);
  }
  // W bytes of INT4 codes (2W codes, low nibble first) as two vectors: the even codes (low nibbles) and the
  // odd codes (high nibbles), values 0..15. One widening load, no shuffle.
  static void q4(const uint8_t* p, T* even, T* odd) {
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    *even = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0x0f)));
    *odd = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
  // Integer dot products, KI int8 pairs a step. maddubs multiplies unsigned by signed bytes, so w goes in as |w|
  // (unsigned, so -128 is 128) and x takes w's sign (x in [-127, 127]: no overflow); two products add into an
  // int16 (at most 2 * 128 * 127 = 32512: no saturation), then pairs of those into int32 lanes.
  using I = __m256i;
  static constexpr int KI = 32;
  static constexpr int IMR = 2, INR = 2;  // rows of x and of w per tile when M > 1
  static I izero() { return _mm256_setzero_si256(); }
  static I iload(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I iabs(I w) { return _mm256_abs_epi8(w); }
  static I idot(I wabs, I w, I x, I acc) {
    const I p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  static int32_t ireduce(I v) {
    __m128i q = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
    return _mm_cvtsi128_si32(q);
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
