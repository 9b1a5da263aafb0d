// Row-wise kernels around the matmuls: embedding gather, RMSNorm and SwiGLU fused with the activation
// format of the next matmul (BF16, or INT8 / FP8 codes with their scales), the GEMM epilogue, and weight
// conversion to BF16 for the cuBLAS path. Activations between kernels are FP32 ([T, dim], row-major).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/cuda/gemv.cuh"

namespace llmq::cuda {

// How a row of FP32 values is handed to the next matmul.
enum class ActKind : int {
  None,      // BF16 values
  I8Token,   // INT8 codes, per-row scale absmax/127 (dynamic)
  I8Tensor,  // INT8 codes, static scale
  Fp8Tensor  // E4M3 codes, static scale
};
struct PrepOut {
  ActKind kind = ActKind::None;
  bool codes_as_bf16 = false;  // quantized kinds: write each code's value as BF16 (exact) for the BF16 GEMM
  float static_scale = 1.f;    // I8Tensor, Fp8Tensor
  void* out = nullptr;         // [rows, ld]: bf16, int8 or fp8 bytes
  int64_t ld = 0;              // elements
  float* row_scale = nullptr;  // [rows]: the scale of each row's codes (quantized kinds)
};

// x[t, :] = float(table[tokens[t], :]); table BF16 [vocab, H].
void embed_gather(const void* table, const int32_t* tokens, int64_t T, int64_t H, float* x, cudaStream_t s);

// out row r = prep(w * x[src_rows ? src_rows[r] : r] / rms), rows r < R; x FP32 [*, H].
void rmsnorm_prep(const float* x, const int32_t* src_rows, int64_t R, int64_t H, const float* w, float eps,
                  const PrepOut& out, cudaStream_t s);
// out row t = prep(silu(gu[t, :I]) * gu[t, I:2I]); gu FP32 [T, ld_gu].
void swiglu_prep(const float* gu, int64_t ld_gu, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s);
// out row t = prep(x[t, :D]); x FP32 [T, ldx].
void act_prep(const float* x, int64_t ldx, int64_t T, int64_t D, const PrepOut& out, cudaStream_t s);

// y[m, n] (+)= acc[m, n] * (x_scale ? x_scale[m] : 1) * (w_scale ? w_scale[n] : 1) + (bias ? bias[n] : 0);
// acc FP32 (or INT32 with acc_int32) [M, N] contiguous, y [M, ldy].
void gemm_epilogue(const void* acc, int64_t M, int64_t N, const float* x_scale, const float* w_scale,
                   const float* bias, float* y, int64_t ldy, bool accumulate, cudaStream_t s, bool acc_int32 = false);

// Weight rows as BF16 [N, K] for the cuBLAS path (fmt I8, FP8 or I4). With apply_scale, the dequantized
// value; without (I8/FP8 codes for W8A8), the code's own value, exactly.
void weight_to_bf16(WFmt fmt, const void* w, const float* scale, const uint8_t* zero, int64_t group, int64_t N,
                    int64_t K, bool apply_scale, void* out, cudaStream_t s);

}  // namespace llmq::cuda
