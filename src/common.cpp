#include "common.hpp"

#include <omp.h>

#include <algorithm>
#include <cstdlib>

namespace llmq {

std::string mib(uint64_t bytes) { return std::to_string((bytes + (1u << 20) - 1) >> 20) + " MiB"; }

bool parse_positive_list(const std::string& s, std::vector<int64_t>& out, std::string* bad) {
  out.clear();
  for (size_t at = 0; at <= s.size();) {
    const size_t comma = std::min(s.find(',', at), s.size());
    const std::string item = s.substr(at, comma - at);
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v < 1) {
      if (bad) *bad = item;
      return false;
    }
    out.push_back(v);
    at = comma + 1;
  }
  return true;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::F8E4M3: return "F8_E4M3";
  }
  return "?";
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: infinity
  if (absu < 0x38800000u) {                                    // below the smallest normal: subnormal or zero
    float a;
    std::memcpy(&a, &absu, 4);
    // Subnormal step is 2^-24; adding 0.5 (2^-1) aligns the mantissa so hardware rounding is RNE.
    float t = a + 0.5f;
    uint32_t tu;
    std::memcpy(&tu, &t, 4);
    return uint16_t(sign | (tu - 0x3f000000u));
  }
  uint32_t mant_odd = (absu >> 13) & 1u;
  absu += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round to nearest even
  return uint16_t(sign | (absu >> 13));
}

int num_threads() { return omp_get_max_threads(); }

}  // namespace llmq
