// The last step of the GEMV and wgemm kernels (nvcc only): an output value, already scaled and biased, goes to
// y (or is added to it), or a gate/up pair becomes one SwiGLU activation (GemvArgs::swiglu_out).
#pragma once

#include "backend/cuda/device_util.cuh"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/prep.cuh"

namespace llmq::cuda {

// Stores y[m, row] (or adds v to it). With rms_out (the distributed RMSNorm's producer half) also writes
// y * rms_w[row] (BF16, or FP32 with rms_out_f32) and returns y^2, the caller's share of rms_sumsq[m]; else
// returns 0.
// store_y with what it reads given: y_old = y[m, row] (read only with accumulate) and rw = rms_w[row] (only with
// rms_out). A caller storing many values loads them all first: between stores through these pointers the compiler
// cannot tell that the addresses differ, so store_y's own loads each wait for the store before them.
__device__ __forceinline__ float store_y_loaded(const GemvArgs& a, int64_t row, int64_t m, float v, float y_old, float rw) {
  const float nv = a.accumulate ? y_old + v : v;
  a.y[m * a.ldy + row] = nv;
  if (!a.rms_out) return 0.f;
  const int64_t at = m * a.rms_ld + row;
  if (a.rms_out_f32) static_cast<float*>(a.rms_out)[at] = nv * rw;
  else static_cast<__nv_bfloat16*>(a.rms_out)[at] = __float2bfloat16(nv * rw);
  return nv * nv;
}

__device__ __forceinline__ float store_y(const GemvArgs& a, int64_t row, int64_t m, float v) {
  return store_y_loaded(a, row, m, v, a.accumulate ? a.y[m * a.ldy + row] : 0.f, a.rms_out ? a.rms_w[row] : 0.f);
}

// The distributed RMSNorm's consumer half: the factor rsqrt(mean(x^2) + eps) of input row m (1 without it).
__device__ __forceinline__ float rms_factor(const GemvArgs& a, int64_t m) {
  return a.x_sumsq ? rsqrtf(float(a.x_sumsq[m]) * a.x_inv_n + a.norm_eps) : 1.f;
}

// Adds a share of row m's sum of squares (the producer half; no-op without rms_sumsq). One atomic a warp: adding
// the GEMV's shares within the CTA first (one atomic a CTA) took fp8 o_proj from 11.15 to 10.34 us in llmq-kbench
// but left the full llama-3-8b fp8 batch-1 step unchanged (3.4822 / 3.4820 ms, H100, session 40): not kept.
__device__ __forceinline__ void add_sumsq(const GemvArgs& a, int64_t m, float sq) {
  if (a.rms_sumsq) atomicAdd(a.rms_sumsq + m, double(sq));
}

// Activation j of token m from its gate and up values: silu(gate) * up in swiglu_kind's format, as swiglu_prep
// computes it (BF16; or, for a static scale s, the code of v * swiglu_inv, with the row's scale from column 0).
__device__ __forceinline__ void store_swiglu(const GemvArgs& a, int64_t j, int64_t m, float gate, float up) {
  const float v = silu_mul(gate, up);
  const int64_t at = m * a.swiglu_ld + j;
  if (a.swiglu_kind == ActKind::None) {
    static_cast<__nv_bfloat16*>(a.swiglu_out)[at] = __float2bfloat16(v);
    return;
  }
  if (j == 0 && a.swiglu_row_scale) a.swiglu_row_scale[m] = a.swiglu_scale;
  const float q = v * a.swiglu_inv;
  if (a.swiglu_kind == ActKind::Fp8Tensor) static_cast<uint8_t*>(a.swiglu_out)[at] = float_to_fp8(q);
  else static_cast<int8_t*>(a.swiglu_out)[at] = float_to_int8(q);
}

// The fused RMSNorm (GemvArgs::norm_counter): after this block's stores, the last block of the launch to finish
// (last_block) normalizes every row of y into norm_out. Every thread of every block calls
// it, after all of its stores.
__device__ __forceinline__ void norm_tail(const GemvArgs& a) {
  if (!a.norm_counter || !last_block(a.norm_counter, int(gridDim.x * gridDim.y * gridDim.z))) return;
  rmsnorm_rows_block(a.y, a.ldy, a.M, a.N, a.norm_w, a.norm_eps, a.norm_out);
}

}  // namespace llmq::cuda
