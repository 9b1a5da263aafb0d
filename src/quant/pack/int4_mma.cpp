#include "quant/pack/int4_mma.hpp"

#include <algorithm>
#include <cstring>

#include "common.hpp"

namespace llmq::pack {

std::vector<uint8_t> int4_mma_pack(const uint8_t* codes, int64_t N, int64_t K) {
  if (N < 1 || K < 2 || K % 2) throw Error("int4_mma_pack: bad shape [" + std::to_string(N) + ", " + std::to_string(K) + "]");
  std::vector<uint8_t> out(size_t(int4_mma_bytes(N, K)), 0);
  // A row block's 16 rows share their words (rows g and g + 8): one thread per row block.
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < int4_mma_row_blocks(N); ++b)
    for (int64_t n = b * 16; n < std::min(N, b * 16 + 16); ++n)
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t c = (codes[n * (K / 2) + k / 2] >> ((k & 1) * 4)) & 0xF;
        const Int4Slot s = int4_mma_slot(n, k, K);
        out[size_t(s.word_byte + s.nibble / 2)] |= uint8_t(c << ((s.nibble % 2) * 4));
      }
  return out;
}

std::vector<uint8_t> int4_mma_unpack(const uint8_t* packed, int64_t N, int64_t K) {
  std::vector<uint8_t> codes(size_t(N * (K / 2)), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const Int4Slot s = int4_mma_slot(n, k, K);
      const uint8_t c = (packed[s.word_byte + s.nibble / 2] >> ((s.nibble % 2) * 4)) & 0xF;
      codes[size_t(n * (K / 2) + k / 2)] |= uint8_t(c << ((k & 1) * 4));
    }
  return codes;
}

std::vector<uint8_t> int4_sz_pack(const float* scale, const uint8_t* zero, int64_t N, int64_t groups) {
  if (N < 1 || groups < 1) throw Error("int4_sz_pack: bad shape [" + std::to_string(N) + ", " + std::to_string(groups) + "]");
  std::vector<uint8_t> out(size_t(int4_sz_bytes(N, groups)), 0);
  for (int64_t b = 0; b < int4_mma_row_blocks(N); ++b)
    for (int64_t q = 0; q < groups; ++q) {
      uint8_t* rec = out.data() + (b * groups + q) * kInt4SzRecord;
      for (int e = 0; e < 16; ++e) {
        const int64_t n = b * 16 + e / 2 + 8 * (e % 2);
        if (n >= N) continue;
        std::memcpy(rec + 4 * e, &scale[n * groups + q], 4);
        rec[64 + e] = zero[n * groups + q];
      }
    }
  return out;
}

}  // namespace llmq::pack
