// Row-wise kernels around the matmuls: embedding gather, RMSNorm and SwiGLU fused with the activation
// format of the next matmul (BF16, or INT8 / FP8 codes with their scales), the GEMM epilogue, and weight
// conversion to BF16 for the cuBLAS path. Activations between kernels are FP32 ([T, dim], row-major).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/gemv.cuh"
#include "backend/cuda/prep.cuh"

namespace llmq::cuda {

// x[t, :] = float(table[tokens[t], :]); table BF16 [vocab, H].
void embed_gather(const void* table, const int32_t* tokens, int64_t T, int64_t H, float* x, cudaStream_t s);

// out row r = prep(w * x[src_rows ? src_rows[r] : r] / rms), rows r < R; x FP32 [*, H].
void rmsnorm_prep(const float* x, const int32_t* src_rows, int64_t R, int64_t H, const float* w, float eps,
                  const PrepOut& out, cudaStream_t s);
// out row t = prep(silu(gu[t, :I]) * gu[t, I:2I]); gu FP32 [T, ld_gu]. With paired, gate and up alternate
// instead: out row t, i = prep(silu(gu[t, 2i]) * gu[t, 2i + 1]) (the paired gate/up rows of the engine).
void swiglu_prep(const float* gu, int64_t ld_gu, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s,
                 bool paired = false);
// swiglu_prep from raw accumulators (gate_up's).
void swiglu_prep(const RawAcc& in, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s, bool paired = false);
// x[t, :] += in's row t (the residual add of gemm_epilogue with accumulate), then out row t = prep(w * x[t] / rms),
// t < T; x FP32 [T, H]. One block a row: H <= 24,576 (residual_rmsnorm_supported). in.x_scale may be out.row_scale.
bool residual_rmsnorm_supported(int64_t H);
void residual_rmsnorm_prep(const RawAcc& in, float* x, int64_t T, int64_t H, const float* w, float eps,
                           const PrepOut& out, cudaStream_t s);
// out row t = prep(x[t, :D]); x FP32 [T, ldx].
void act_prep(const float* x, int64_t ldx, int64_t T, int64_t D, const PrepOut& out, cudaStream_t s);

// y[m, n] (+)= acc[m, n] * (x_scale ? x_scale[m] : 1) * (w_scale ? w_scale[n] : 1) + (bias ? bias[n] : 0);
// acc FP32 (or INT32 with acc_int32) [M, N] contiguous, y [M, ldy].
void gemm_epilogue(const void* acc, int64_t M, int64_t N, const float* x_scale, const float* w_scale,
                   const float* bias, float* y, int64_t ldy, bool accumulate, cudaStream_t s, bool acc_int32 = false);

// ids[r] = the first index of the largest value of row r of x (FP32 [R, n]), or -1 where the row holds a NaN or
// +Inf (a broken model: the engine reports it), r < R: greedy sampling on the device. Each row is cut into
// kArgmaxParts slices, one block each; the last block of a row to finish (counters[r], zeros, left zero) reduces
// the slices' results, kept in part_v, part_i ([R * kArgmaxParts] each).
constexpr int kArgmaxParts = 32;
void argmax_rows(const float* x, int64_t R, int64_t n, int32_t* ids, float* part_v, int32_t* part_i, int32_t* counters,
                 cudaStream_t s);

// Weight rows as BF16 [N, K] for the cuBLAS path (fmt I8, FP8 or I4). With apply_scale, the dequantized
// value; without (I8/FP8 codes for W8A8), the code's own value, exactly.
// I8 and FP8 rows with K % 16 == 0 (16-byte aligned) take a 16-values-per-thread kernel, the rest (and every
// format with LLMQ_SCALAR_DEQUANT=1) one value per thread; both compute the same values.
void weight_to_bf16(WFmt fmt, const void* w, const float* scale, const uint8_t* zero, int64_t group, int64_t N,
                    int64_t K, bool apply_scale, void* out, cudaStream_t s);
// Whether LLMQ_SCALAR_DEQUANT=1 asks for the one-value-per-thread expansion kernels (also int4_mma_to_bf16's).
bool scalar_dequant();

}  // namespace llmq::cuda
