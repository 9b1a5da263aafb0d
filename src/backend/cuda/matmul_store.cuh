// The last step of the GEMV and wgemm kernels (nvcc only): an output value, already scaled and biased, goes to
// y (or is added to it), or a gate/up pair becomes one SwiGLU activation (GemvArgs::swiglu_out).
#pragma once

#include "backend/cuda/device_util.cuh"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/prep.cuh"

namespace llmq::cuda {

__device__ __forceinline__ void store_y(const GemvArgs& a, int64_t row, int64_t m, float v) {
  float* y = a.y + m * a.ldy + row;
  *y = a.accumulate ? *y + v : v;
}

// Activation j of token m from its gate and up values: bf16(silu(gate) * up), as swiglu_prep computes it.
__device__ __forceinline__ void store_swiglu(const GemvArgs& a, int64_t j, int64_t m, float gate, float up) {
  const float v = gate / (1.0f + expf(-gate)) * up;
  static_cast<__nv_bfloat16*>(a.swiglu_out)[m * a.swiglu_ld + j] = __float2bfloat16(v);
}

// The fused RMSNorm (GemvArgs::norm_counter): after this block's stores, the last block of the launch to finish
// (the threadFenceReduction pattern) normalizes every row of y into norm_out. Every thread of every block calls
// it, after all of its stores.
__device__ __forceinline__ void norm_tail(const GemvArgs& a) {
  if (!a.norm_counter) return;
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int total = int(gridDim.x * gridDim.y * gridDim.z);
    last = atomicAdd(a.norm_counter, 1) == total - 1;
    if (last) *a.norm_counter = 0;  // ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  rmsnorm_rows_block(a.y, a.ldy, a.M, a.N, a.norm_w, a.norm_eps, a.norm_out);
}

}  // namespace llmq::cuda
