// Numeric formats of quantized weights, activations and KV cache: bit layouts and scalar reference
// quantize/dequantize. Shared by host code and (later) device code: plain functions, no allocation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace llmq::quant {

// ---- FP8 E4M3FN --------------------------------------------------------------------------------------
//  bit 7   6 5 4 3   2 1 0
//      s   e e e e   m m m      bias 7; no infinities; 0x7F/0xFF = NaN; max finite ±448 (0x7E)
//  normal:    (-1)^s * 2^(e-7) * (1 + m/8)       subnormal (e = 0): (-1)^s * 2^-6 * (m/8)
constexpr float kFp8Max = 448.0f;

inline float fp8_to_f32(uint8_t b) {
  const uint32_t e = (b >> 3) & 0xF, m = b & 7;
  if (e == 15 && m == 7) return NAN;
  const float mag = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), int(e) - 10);
  return (b & 0x80) ? -mag : mag;
}

// Round to nearest even, saturating to ±448 (as conversion with saturation does); NaN -> 0x7F.
// On the float's bits (no libm: it runs once per weight of an FP8 quantization, where frexp and nearbyint took
// ~20% of `llmq quantize --method fp8`): normals keep 3 of the 23 mantissa bits, rounded to nearest even by adding
// 0x7FFFF plus the last kept bit before truncating (a carry into the exponent is the next binade, as it should
// be); below 2^-6 the codes are the multiples of 2^-9, a * 512 rounded to an integer by adding and subtracting
// 2^23 (exact in float for 0 <= a * 512 < 8: the sum's last place is 1, and the add rounds to nearest even).
inline uint8_t f32_to_fp8(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return 0x7F;      // NaN
  if (u >= 0x43E00000u) return sign | 0x7E;  // |x| >= 448 (and infinity): saturate
  if (u < 0x3C800000u) {                 // |x| < 2^-6: subnormal codes (8 = the smallest normal, same bits)
    float a;
    std::memcpy(&a, &u, 4);
    return sign | uint8_t((a * 512.0f + 8388608.0f) - 8388608.0f);  // (a * 512 is exact: a contracted FMA gives the same)
  }
  u = (u + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;  // exponent and 3 mantissa bits, rounded (below 448: at most 448)
  return sign | uint8_t(u - ((127u - 7u) << 3));  // the exponent rebiased from 127 to 7
}

// fp8_to_f32(f32_to_fp8(x)) without the detour through the code: the nearest E4M3 value (ties to even),
// saturated to ±448, NaN kept. Normals keep 3 of float's 23 mantissa bits (round to nearest even on the bits);
// below 2^-6 the grid is multiples of 2^-9. For fake-quantizing activations; a test compares it with the round trip.
inline float fp8_round(float x) {
  if (std::isnan(x)) return x;
  const float a = std::fabs(x);
  float r;
  if (a >= kFp8Max) {
    r = kFp8Max;
  } else if (a < 0x1p-6f) {
    r = std::nearbyint(a * 512.0f) * 0x1p-9f;
  } else {
    uint32_t u;
    std::memcpy(&u, &a, 4);
    u = (u + 0x7FFFFu + ((u >> 20) & 1u)) & 0xFFF00000u;
    std::memcpy(&r, &u, 4);
    r = std::min(r, kFp8Max);  // 464 and up round to 480: saturate
  }
  return std::copysign(r, x);
}

// ---- INT8 symmetric ----------------------------------------------------------------------------------
// q in [-127, 127], x ≈ q * scale, scale = absmax / 127, rounded half to even (as torch.round). Clamped first
// (127 is an integer, so clamping before rounding is the same; NaN goes to -127), then rounded by adding and
// subtracting 1.5 * 2^23, which leaves the nearest integer, ties to even, for |q| < 2^22 (no libm call: this
// runs once per activation).
inline int8_t quant_int8(float x, float inv_scale) {
  float q = std::min(127.f, std::max(-127.f, x * inv_scale));
  q = (q + 12582912.0f) - 12582912.0f;
  return int8_t(q);
}

// ---- INT4 groups -------------------------------------------------------------------------------------
// Weights of one output row are cut into groups of G consecutive input channels, each with its own scale
// (and zero point when asymmetric). Packed two per byte, element 2i in the low nibble, 2i+1 in the high:
//   byte = (q[2i+1] << 4) | q[2i]
// asymmetric: q in [0, 15], x ≈ (q - z) * scale, z in [0, 15]
// symmetric:  q in [-8, 7] stored as q + 8, x ≈ (stored - 8) * scale (z = 8 fixed)
inline uint8_t pack_int4(uint8_t lo, uint8_t hi) { return uint8_t((hi << 4) | (lo & 0xF)); }
inline uint8_t unpack_int4(const uint8_t* packed, int64_t i) { return (packed[i >> 1] >> ((i & 1) * 4)) & 0xF; }

struct Int4Params {
  float scale;
  uint8_t zero;
};

// Scale and zero point covering [lo, hi] (asymmetric, range includes 0) or [-amax, amax] (symmetric).
inline Int4Params int4_params(float lo, float hi, bool symmetric) {
  if (symmetric) {
    const float amax = std::fmax(std::fabs(lo), std::fabs(hi));
    return {amax > 0 ? amax / 7.0f : 1.0f, 8};
  }
  lo = std::fmin(lo, 0.f);
  hi = std::fmax(hi, 0.f);
  const float scale = hi > lo ? (hi - lo) / 15.0f : 1.0f;
  float z = std::nearbyint(-lo / scale);
  z = std::fmin(15.f, std::fmax(0.f, z));
  return {scale, uint8_t(z)};
}

inline uint8_t quant_int4(float x, Int4Params p) {
  float q = std::nearbyint(x / p.scale) + float(p.zero);
  return uint8_t(std::fmin(15.f, std::fmax(0.f, q)));
}
inline float dequant_int4(uint8_t q, Int4Params p) { return (float(q) - float(p.zero)) * p.scale; }

}  // namespace llmq::quant
