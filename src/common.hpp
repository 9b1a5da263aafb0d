// Shared basics: the error type, element types and their scalar conversions.
#pragma once

#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmq {

// Every error caused by user input (files, flags, text) is an llmq::Error whose message names the file,
// tensor or value at fault. The CLI prints it as one line `llmq: error: <what>` and exits 1.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Element types of tensors in checkpoints and in memory.
// F8E4M3 is FP8 E4M3FN (quant/formats/formats.hpp draws it); I8/U8 hold quantized weights, packed INT4
// pairs and zero points.
enum class DType : uint8_t { F32, F16, BF16, I8, U8, F8E4M3 };

const char* dtype_name(DType t);
// A byte count in whole MiB, rounded up, for messages ("1234 MiB").
std::string mib(uint64_t bytes);
// A comma-separated list of positive integers ("1,16,64") into `out`; false, with the first bad item in *bad, where
// an item is empty, not a whole number or below 1.
bool parse_positive_list(const std::string& s, std::vector<int64_t>& out, std::string* bad = nullptr);
// Bytes per value (constexpr: the CPU kernels' inner loops use it).
constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::F16:
    case DType::BF16: return 2;
    default: return 1;
  }
}

// BF16 -> F32 is exact (the upper 16 bits of an IEEE single).
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// F32 -> BF16, round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE binary16 -> F32, exact (subnormals, infinities and NaN included).
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalize
      int e = -1;
      do {
        man <<= 1;
        ++e;
      } while ((man & 0x400u) == 0);
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// F32 -> IEEE binary16, round to nearest even, overflow to infinity.
uint16_t f32_to_f16(float f);

// The 256 FP8 E4M3FN values by code (0x7F and 0xFF are NaN), built at compile time from the format's definition
// (quant/formats/formats.hpp keeps the scalar reference; a test checks every code against it).
constexpr std::array<float, 256> make_fp8_e4m3_table() {
  std::array<float, 256> t{};
  for (int b = 0; b < 256; ++b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float mag = std::numeric_limits<float>::quiet_NaN();
    if (!(e == 15 && m == 7)) {
      float p = 1.f;  // 2^(e - 10) for normals (with the implicit 8 in the mantissa), 2^-9 for subnormals
      for (int x = e == 0 ? -9 : e - 10; x > 0; --x) p *= 2.f;
      for (int x = e == 0 ? -9 : e - 10; x < 0; ++x) p *= 0.5f;
      mag = float(e == 0 ? m : 8 + m) * p;
    }
    t[size_t(b)] = (b & 0x80) ? -mag : mag;
  }
  return t;
}
inline constexpr std::array<float, 256> kFp8E4M3Values = make_fp8_e4m3_table();
inline float fp8_e4m3_to_f32(uint8_t b) { return kFp8E4M3Values[b]; }

// Reads element i of a buffer of type t as float (I8/U8: the integer value).
// A stateless 64-bit mix (splitmix64's output function of x + golden ratio): deterministic pseudo-random values
// from an index, for synthetic weights and benchmark data.
inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline float load_as_f32(const void* p, DType t, size_t i) {
  switch (t) {
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::I8: return float(static_cast<const int8_t*>(p)[i]);
    case DType::U8: return float(static_cast<const uint8_t*>(p)[i]);
    case DType::F8E4M3: return fp8_e4m3_to_f32(static_cast<const uint8_t*>(p)[i]);
  }
  return 0.f;
}

// Number of worker threads (OMP_NUM_THREADS or all cores).
int num_threads();

}  // namespace llmq
