// 8-bit tensor-core GEMMs through cuBLASLt for prefill and large batches: acc[T, N] = x[T, K] . W[N, K]^T
// with FP8 E4M3 x E4M3 -> FP32 (sm_89+) or INT8 x INT8 -> INT32 (exact), both operands row-major as the
// checkpoint and the activation quantizers store them (in cuBLAS's column-major terms: the "TN" layout these
// types require). Scales stay outside: the caller's epilogue applies x_scale[t] * w_scale[n] (gemm_epilogue).
// FP8 runs with cuBLASLt's precise accumulation (no fast-accumulate mode).
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

 private:
  struct Plan;
  Plan* plan(LtKind kind, int64_t N, int64_t T, int64_t K);
  void* handle_ = nullptr;     // cublasLtHandle_t
  void* workspace_ = nullptr;  // device
  size_t workspace_bytes_ = 0;
  std::map<std::tuple<int, int64_t, int64_t, int64_t>, Plan*> plans_;
};

}  // namespace llmq::cuda
