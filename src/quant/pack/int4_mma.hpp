// INT4 weights repacked offline into the native layout of the tensor-core GEMM (backend/cuda/wgemm.cuh).
//
// The GEMM feeds weights to mma.m16n8k16 as the A operand (16 output rows x 16 k). In one such step, lane
// L = 4g + t (g = L / 4, t = L % 4) holds rows g and g + 8 of the row block at the four k positions
// 4t .. 4t+3 of the step (the GEMM reads the activations at the same k, so this order is free to choose).
// Each lane's four A registers r = 0..3 are bf16 pairs:
//   r = 0: row g,     k 4t, 4t+1      r = 2: row g,     k 4t+2, 4t+3
//   r = 1: row g + 8, k 4t, 4t+1      r = 3: row g + 8, k 4t+2, 4t+3
// A step's eight codes are one 32-bit word, ordered so that one mask makes register r:
//   ((word >> 4r) & 0x000F000F) | 0x43004300  ==  bf16 pair (128 + first code, 128 + second code)
// i.e. nibble r (bits 4r..4r+3) = register r's first code and nibble r + 4 its second.
//
// Layout: [N/16 row blocks][K/64 units][32 lanes][4 steps] words (16 bytes per lane and unit, one load):
//
//   unit u of row block b, lane L:  | word 0: step 0 | word 1: step 1 | word 2: step 2 | word 3: step 3 |
//   step s covers k = 64u + 16s .. 64u + 16s + 15, so every step lies inside one quantization group
//   (groups are multiples of 16), which lets the GEMM apply each group's scale once per step sum.
//
// Rows past N (to a multiple of 16) and k past K (to a multiple of 64) are padded with code 0; the GEMM never
// stores padded rows and reads zero activations past K. Codes stay unsigned 0..15 with the checkpoint's zero
// points and scales ([N, K/group], unchanged).
#pragma once

#include <cstdint>
#include <vector>

namespace llmq::pack {

constexpr int64_t kInt4UnitK = 64;  // k per lane load (4 steps of 16)

inline int64_t int4_mma_row_blocks(int64_t N) { return (N + 15) / 16; }
inline int64_t int4_mma_units(int64_t K) { return (K + kInt4UnitK - 1) / kInt4UnitK; }
inline int64_t int4_mma_bytes(int64_t N, int64_t K) { return int4_mma_row_blocks(N) * int4_mma_units(K) * 32 * 16; }

// Where code (n, k) lives: byte offset of its word and the nibble (0..7) inside the word.
struct Int4Slot {
  int64_t word_byte;
  int nibble;
};
inline Int4Slot int4_mma_slot(int64_t n, int64_t k, int64_t K) {
  const int64_t b = n / 16, u = k / kInt4UnitK;
  const int r16 = int(n % 16), kk = int(k % kInt4UnitK);
  const int s = kk / 16, t = (kk % 16) / 4, within = kk % 4;  // within: 0,1 -> pair 0; 2,3 -> pair 1
  const int g = r16 % 8, hi = r16 / 8;
  const int reg = hi + 2 * (within / 2);
  const int lane = 4 * g + t;
  const int64_t word = ((b * int4_mma_units(K) + u) * 32 + lane) * 4 + s;
  return {word * 4, reg + 4 * (within % 2)};
}

// Scales and zero points of INT4 tiles for the one-token GEMM (wgemm_i4_kernel), which copies them into shared
// memory with the weights instead of loading them when it needs them: one 80-byte record per row block b and
// group q, records ordered [N/16 row blocks][groups]:
//
//   bytes 0..63:  16 FP32 scales, entry 2g + h = row 16b + g + 8h   (lane 4g + t reads one float2: rows g, g + 8)
//   bytes 64..79: 16 zero points (uint8), the same order             (one uint16 per lane)
//
// Rows past N get scale 0 and zero point 0. The same values as the checkpoint's [N, groups] arrays, reordered.
constexpr int64_t kInt4SzRecord = 80;
static_assert(kInt4SzRecord == 16 * 4 + 16 && kInt4SzRecord % 16 == 0, "a record is 16-byte copies");
inline int64_t int4_sz_bytes(int64_t N, int64_t groups) { return int4_mma_row_blocks(N) * groups * kInt4SzRecord; }
// scale, zero: [N, groups] row-major.
std::vector<uint8_t> int4_sz_pack(const float* scale, const uint8_t* zero, int64_t N, int64_t groups);

// codes: the checkpoint's INT4 weight [N, K/2] bytes (element 2i in the low nibble). K must be even.
std::vector<uint8_t> int4_mma_pack(const uint8_t* codes, int64_t N, int64_t K);
// The inverse (tests; the GEMM's BF16 expansion does the same on the device): codes [N, K/2].
std::vector<uint8_t> int4_mma_unpack(const uint8_t* packed, int64_t N, int64_t K);

}  // namespace llmq::pack
