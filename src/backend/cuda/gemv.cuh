// Decode GEMV: y[m, n] (+)= sum_k x[m, k] * W[n, k] for a few rows of x (M <= 8), reading each weight once.
//
// Weights stay in the checkpoint's layout, row-major [N, K] (no repacking):
//   BF16  2 bytes/value
//   I8    int8 codes, value = code * scale[n]                       (per output channel)
//   FP8   E4M3FN codes, value = fp8(code) * scale[n]                (per output channel)
//   I4    two codes per byte (low nibble = even k), value = (code - zero[n, k/G]) * scale[n, k/G]
// Inputs x:
//   BF16  bf16 [M, ldx] (weight-only and dense paths)
//   I8    int8 codes [M, ldx] with x = code * x_scale[m]; only with I8 weights: INT8 x INT8 -> INT32 (dp4a)
//   FP8   E4M3 codes [M, ldx] with x = fp8(code) * x_scale[m]; only with FP8 weights: products in FP32
// Each warp (or 2-4 warps splitting K, where N alone gives too few warps to fill the GPU) owns two output rows
// and walks K in 16-byte weight loads (8 BF16, 16 INT8/FP8, 32 INT4 values), four of them a row in flight;
// the epilogue applies x_scale, scale[n], the bias and the residual add (accumulate), so nothing else runs.
// With swiglu_out set (gate/up rows paired: row 2j is gate j, row 2j+1 up j) the epilogue writes
// bf16(silu(gate) * up) to swiglu_out[m, j] instead of y: the SwiGLU of the MLP without a kernel of its own.
// With norm_counter set, the last block to finish also writes the RMSNorm of every row of y (the residual
// stream after this matmul's add) in norm_out's format: the next matmul's input without a kernel of its own.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/prep.cuh"

namespace llmq::cuda {

enum class WFmt : int { BF16, I8, FP8, I4 };
enum class XFmt : int { BF16, I8, FP8 };

struct GemvArgs {
  WFmt wf = WFmt::BF16;
  XFmt xf = XFmt::BF16;
  const void* w = nullptr;        // [N, K] (I4: [N, K/2] bytes)
  const float* w_scale = nullptr; // I8/FP8: [N]; I4: [N, K/group]
  const uint8_t* w_zero = nullptr;// I4: [N, K/group]
  int64_t group = 0;              // I4 group size
  int64_t N = 0, K = 0;
  const float* bias = nullptr;    // [N] or null
  const void* x = nullptr;        // [M, ldx]
  int64_t ldx = 0;
  const float* x_scale = nullptr; // [M] for I8/FP8 inputs
  int M = 0;
  float* y = nullptr;             // [M, ldy]
  int64_t ldy = 0;
  bool accumulate = false;        // y += result (residual add) instead of y = result
  void* swiglu_out = nullptr;     // if set: bf16 [M, swiglu_ld] = silu(row 2j) * row 2j+1 (N even); y unused
  int64_t swiglu_ld = 0;
  // With swiglu_out: the activations' format, as swiglu_prep writes it: BF16 (None), or the codes of the static
  // scale swiglu_scale (I8Tensor, Fp8Tensor) with swiglu_row_scale[m] set to it. Not I8Token (a row's absmax).
  ActKind swiglu_kind = ActKind::None;
  float swiglu_scale = 1.f;
  float swiglu_inv = 1.f;             // 1.0f / swiglu_scale (IEEE: the reciprocal prep_row computes on the device)
  float* swiglu_row_scale = nullptr;  // [M]; must not be this matmul's x_scale
  int32_t* norm_counter = nullptr;// if set: one int, zero (left zero); norm_out = prep(norm_w * y / rms(y)) per row
  const float* norm_w = nullptr;  // [N]
  float norm_eps = 0.f;
  PrepOut norm_out;               // rows [M, norm_out.ld]; must not be what this matmul reads (x, x_scale)
  // The distributed RMSNorm (y = W . rmsnorm(x) computed as r * (W . (x o w)), r = rsqrt(mean(x^2) + eps)):
  // producer half, with y set (not swiglu_out): besides y, write bf16(y[m, n] * rms_w[n]) to rms_out[m, rms_ld]
  // and add sum_n y[m, n]^2 to rms_sumsq[m] (y after the residual add; rms_sumsq zeroed by the caller).
  const float* rms_w = nullptr;   // [N]
  void* rms_out = nullptr;        // bf16 [M, rms_ld]; must not be what this matmul reads
  int64_t rms_ld = 0;
  double* rms_sumsq = nullptr;    // [M]
  // Consumer half (BF16 inputs only): x holds x o w and every result is multiplied by
  // rsqrt(x_sumsq[m] * x_inv_n + norm_eps) before the bias.
  const double* x_sumsq = nullptr;// [M]
  float x_inv_n = 0.f;            // 1 / hidden size
  // Producer half: rms_out holds FP32 values instead of BF16 (for a consumer with x_prep).
  bool rms_out_f32 = false;
  // Consumer half for W8A8 inputs (GEMV only, with x_sumsq): x is FP32 [M, ldx] holding x o w (an rms_out_f32
  // row), and each block turns every row into the codes of xf itself, as rmsnorm_prep would have written them
  // (v = x[m, k] * rsqrt(x_sumsq[m] * x_inv_n + norm_eps), code = v / s; x_prep names the kind: Fp8Tensor
  // with FP8, I8Tensor or I8Token with I8; s = x_prep_scale, or absmax(v) / 127 per row for I8Token), into
  // shared memory: the RMSNorm and its quantization without a kernel of their own. x_scale is not read.
  ActKind x_prep = ActKind::None;
  float x_prep_scale = 1.f;
  int ksplit = 0;                 // GEMV: warps that share a row pair, splitting K (1, 2 or 4); 0 = the launcher's
                                  // choice (enough warps to fill the GPU). wgemm ignores it.
  bool evict_first = false;       // GEMV: weights read with an evict-first L2 hint (the launcher sets it)
  bool preload = false;           // GEMV: each lane's first batch of weights loaded before the grid-dependency
                                  // wait (the launcher sets it)
  int dense = 0;                  // GEMV, one input row of INT8 / FP8 weights: 1 = the instance compiled for 8 blocks
                                  // an SM, -1 = the other, 0 = the launcher's choice (the fuller last wave)
  const void* i4_sz = nullptr;    // wgemm, INT4 tiles: w_scale and w_zero as pack::int4_sz_pack records, which the
                                  // one-token kernel (T <= 8) copies into shared memory with the weights; null: it
                                  // loads w_scale / w_zero where it needs them (LLMQ_WGEMM_I4_NO_SZ=1 ignores it)
  int i4_row_blocks = 0;          // wgemm, INT4 tiles: row blocks of 16 rows a CTA sums at once (1 or 2); 0 = the
                                  // launcher's choice. The GEMV ignores it.
  int i4_rotate = 0;              // wgemm, INT4 tiles up to 8 tokens with i4_sz: 1 = the K-split partial sums of each set go to
                                  // a rotating warp through mbarriers, no CTA barrier (sum_rotating in wgemm.cu); -1 =
                                  // to warp 0 after __syncthreads; 0 = the launcher's choice (-1 unless
                                  // LLMQ_WGEMM_I4_ROTATE=1). The GEMV ignores it.
  // wgemm, INT4 tiles and INT8 weight-only: 1 = the tiled kernel (128 rows a CTA sharing the activations in shared
  // memory; INT4 groups of 64/128 with K / group % 4 == 0; K % 64 == 0, no norm_counter, 16-byte aligned x rows),
  // -1 = never, 0 = the launcher's choice (the tiled kernel past 8 tokens where it serves and wins: tiled_default in wgemm.cu).
  int tiled = 0;
  float* tiled_ws = nullptr;      // the tiled kernel's split-K partial sums (null: no split): splits x
  int64_t tiled_ws_floats = 0;    // 16 * ceil(N / 16) x 8 * ceil(M / 8) floats are used if they fit, else no split
  // With tiled_ws: one counter per 128-row tile (ceil(N / 128) ints, zero; left zero). The last CTA of a tile to
  // finish then adds the partial sums and runs the epilogue itself; null (or fewer than ceil(N / 128) counters):
  // a second kernel does (wgemm.cu).
  int32_t* tiled_counters = nullptr;
  int64_t tiled_counters_n = 0;
  // The tiled kernel's epilogue (the launcher sets it from LLMQ_WGEMM_TILED_EPI): bit 0 = the last CTA of a tile
  // prefetches the epilogue's operands (residual rows, RMSNorm weights and sums of squares) into L1 while it loads
  // the partial sums; bit 1 = the CTA adds its warps' shares of each token's sum of squares before one atomic;
  // bit 2 = every value, and all the epilogue reads, loaded before its first store (opt-in: LLMQ_WGEMM_TILED_EPI=7;
  // only the INT4 records instance at 9-16 tokens and 3 stages has it, the others ignore it).
  int tiled_epi = 0;
};

constexpr int kGemvMaxM = 8;
// Up to this many tokens the engine prefers the GEMV to wgemm for BF16 and INT8 weight-only rows; W8A8 codes
// only at one token (engine.cpp, CudaEngine::path says why).
constexpr int kGemvPreferT = 2;

// Whether gemv() runs these arguments (M in 1..8, a known format pair, sizes and pointers non-null).
// Shapes whose rows are not 16-byte aligned or whose groups are not multiples of 32 take a slower
// scalar kernel; they are still supported, except with swiglu_out (the vector kernel only).
bool gemv_supports(const GemvArgs& a);
// The checks of the fused epilogues' arguments (swiglu_out, norm_counter, rms_*, x_sumsq) that the GEMV and
// wgemm share: sizes, the pointers each needs, and no two that exclude each other.
bool epilogue_args_ok(const GemvArgs& a);
// Whether the 16-byte vector kernel (rather than the scalar one) serves these arguments.
bool gemv_vectorized(const GemvArgs& a);
void gemv(const GemvArgs& a, cudaStream_t stream);

}  // namespace llmq::cuda
