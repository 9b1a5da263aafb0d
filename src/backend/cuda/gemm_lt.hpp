// 8-bit tensor-core GEMMs through cuBLASLt for prefill and large batches: acc[T, N] = x[T, K] . W[N, K]^T
// with FP8 E4M3 x E4M3 -> FP32 (sm_89+) or INT8 x INT8 -> INT32 (exact), both operands row-major as the
// checkpoint and the activation quantizers store them (in cuBLAS's column-major terms: the "TN" layout these
// types require). Scales stay outside: the caller's epilogue applies x_scale[t] * w_scale[n] (gemm_epilogue).
// FP8 runs with cuBLASLt's precise accumulation (LLMQ_LT_FAST_ACCUM=1: its fast-accumulate mode).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

namespace llmq::cuda {

enum class LtKind : int { Fp8, Int8 };

class LtGemm {
 public:
  LtGemm();
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;
  // Whether run() takes this kind and shape on a card of compute capability sm (K % 16, N % 4, 16-byte
  // aligned rows); the plan is built and checked on first use, so false also covers "cuBLASLt found no
  // algorithm".
  bool supports(LtKind kind, int64_t N, int64_t T, int64_t K, int sm);
  // acc: FP32 (Fp8) or INT32 (Int8) [T, N] row-major, contiguous.
  void run(LtKind kind, const void* w, const void* x, void* acc, int64_t N, int64_t T, int64_t K, cudaStream_t s);

  // FP8 with the scales applied inside cuBLASLt (outer-vector scaling, CUDA 12.9+): y[t, n] = x_scale[t] *
  // w_scale[n] * sum_k x[t, k] W[n, k], plus y[t, n] when accumulate, written straight into y (FP32, row stride
  // ldy >= N): no FP32 accumulator round trip through an epilogue kernel. supports_fp8_scaled: whether
  // cuBLASLt offers an algorithm for it on this card (sm_89+, the same shape rules as supports()).
  bool supports_fp8_scaled(int64_t N, int64_t T, int64_t K, int64_t ldy, bool accumulate, int sm);
  void run_fp8_scaled(const void* w, const void* x, const float* w_scale, const float* x_scale, float* y, int64_t ldy,
                      bool accumulate, int64_t N, int64_t T, int64_t K, cudaStream_t s);

  // FP8 with one scale per output channel applied inside cuBLASLt (pointer mode "alpha device vector, beta
  // host"): y[t, n] = alpha[n] * sum_k x[t, k] W[n, k] (+ y[t, n] when accumulate), FP32 with row stride ldy.
  // With a static per-tensor input scale, alpha[n] = w_scale[n] * x_scale carries every scale, so nothing runs
  // after the GEMM. supports_fp8_alpha: whether cuBLASLt offers an algorithm for it on this card.
  bool supports_fp8_alpha(int64_t N, int64_t T, int64_t K, int64_t ldy, bool accumulate, int sm);
  void run_fp8_alpha(const void* w, const void* x, const float* alpha, float* y, int64_t ldy, bool accumulate, int64_t N,
                     int64_t T, int64_t K, cudaStream_t s);

 private:
  struct Plan;
  // How the scales are applied: not at all (the caller's epilogue), outer-vector scaling, an alpha vector.
  enum class Scaling : int { None, OuterVec, AlphaVec };
  // Scaled plans write FP32 with row stride ldc (beta 1 when accumulate).
  Plan* plan(LtKind kind, int64_t N, int64_t T, int64_t K, Scaling scaling = Scaling::None, int64_t ldc = 0,
             bool accumulate = false);
  void* handle_ = nullptr;     // cublasLtHandle_t
  void* workspace_ = nullptr;  // device
  size_t workspace_bytes_ = 0;
  // (kind, N, T, K, scaling, ldc, accumulate)
  std::map<std::tuple<int, int64_t, int64_t, int64_t, int, int64_t, bool>, Plan*> plans_;
};

}  // namespace llmq::cuda
