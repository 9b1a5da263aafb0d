// Tensor-core GEMM for decode and small batches: y[t, n] (+)= sum_k x[t, k] * W[n, k] for T <= 64 tokens.
//
// The weights are the A operand of mma.sync (16 output rows per instruction) and the tokens the B operand
// (8 per n-tile), so every weight is read from memory once per call whatever T is, dequantized in registers
// with a few bit operations (no per-value conversion instructions), and multiplied on the tensor cores. This
// is what keeps INT4 ahead of BF16 from batch 1 to 64 (Marlin's idea; weights here stay in the checkpoint's
// row-major layout except INT4, which is repacked offline by quant/pack/int4_mma.hpp).
//
//   weights (GemvArgs::wf)               inputs (xf)    instruction            scales
//   BF16 row-major [N, K]                BF16           m16n8k16 bf16, FP32    -
//   I8   row-major codes [N, K]          BF16           m16n8k16 bf16, FP32    w_scale[n] in the epilogue
//   I4   int4_mma tiles                  BF16           m16n8k16 bf16, FP32    (code - zero) exact in bf16;
//                                                                              scale[n, group] per step sum
//   I8   row-major codes                 I8 codes       m16n8k32 s8, INT32     x_scale[t] * w_scale[n]
//   FP8  row-major E4M3 codes (sm_89+)   FP8 codes      m16n8k32 e4m3, FP32    x_scale[t] * w_scale[n]
//
// Each CTA owns 16 output rows and splits K across up to 8 warps (summed through shared memory), so even a
// 4096-row matrix keeps thousands of 16-byte loads in flight. Bias, residual add and the SwiGLU and RMSNorm
// epilogues (GemvArgs::swiglu_out, norm_counter) are fused as in gemv().
// INT4 and INT8 weight-only at 9-64 tokens can instead take the tiled kernel (GemvArgs::tiled; by default
// INT8 always, INT4 on large matrices from 16 tokens, see tiled_default in wgemm.cu): 128 rows a CTA whose
// warps share the activations through shared memory, K split over CTAs into a workspace where rows are few
// (wgemm.cu says why: the kernels above re-read activations from the L2).
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/gemv.cuh"

namespace llmq::cuda {

constexpr int kWgemmMaxT = 64;
// BF16 and W8A8 take wgemm up to this many tokens and cuBLAS / cuBLASLt past it (CudaEngine::path).
constexpr int kWgemmDenseMaxT = 8;

// Whether wgemm() runs these arguments (GemvArgs with M = T tokens, 1..64) on a card of compute capability
// sm (e.g. 90). Needs K % 32 == 0 (BF16), K % 64 == 0 (I8, FP8), or K % 16 == 0 and groups of 32, 64 or 128
// (I4, w in the int4_mma layout); 16-byte aligned weights, 8-byte aligned input rows.
bool wgemm_supports(const GemvArgs& a, int sm);
// Whether wgemm takes INT4 weights of row length K and this group size (then they are stored as int4_mma tiles).
inline bool wgemm_int4_shape(int64_t K, int64_t group) {
  return K % 16 == 0 && (group == 32 || group == 64 || group == 128) && K % group == 0;
}
void wgemm(const GemvArgs& a, cudaStream_t stream);

// INT4 weights in the int4_mma layout to dequantized BF16 row-major [N, K] (the cuBLAS path for large batches).
void int4_mma_to_bf16(const void* packed, const float* scale, const uint8_t* zero, int64_t group, int64_t N, int64_t K,
                      void* out, cudaStream_t stream);

}  // namespace llmq::cuda
