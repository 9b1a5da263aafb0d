// The format an activation row is handed to the next matmul in (host and device), and, for nvcc, the device
// code that writes a row in it: one element (prep_store) or a whole RMSNorm'd row done by one block
// (rmsnorm_rows_block, the GEMV epilogue's fused norm). elementwise.cu's kernels and the GEMV/wgemm epilogues
// share it, so the codes are the same whichever kernel writes them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

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

// A GEMM's raw accumulators and the scales gemm_epilogue would apply: element (t, n) is float(acc[t * ld + n]) *
// x_scale[t] * w_scale[n] (either scale skipped where null), computed with the same operations in the same order as
// gemm_epilogue, so a W8A8 matmul through cuBLASLt needs no epilogue pass of its own when the next kernel reads these.
// acc FP32, or INT32 with acc_int32.
struct RawAcc {
  const void* acc = nullptr;
  bool acc_int32 = false;
  int64_t ld = 0;
  const float* x_scale = nullptr;
  const float* w_scale = nullptr;
};

}  // namespace llmq::cuda

#ifdef __CUDACC__
#include "backend/cuda/device_util.cuh"

namespace llmq::cuda {

// Element (t, n) of raw accumulators from its loaded bits a (FP32 or INT32), x_scale[t] (xs) and w_scale[n] (ws),
// each scale used only where in has it. raw_value and the 16-byte readers (raw_value4, the quads kernels) all
// compute through it, so that they give the same bits.
__device__ __forceinline__ float raw_scaled(const RawAcc& in, uint32_t a, float xs, float ws) {
  float v = in.acc_int32 ? float(int32_t(a)) : __uint_as_float(a);
  if (in.x_scale) v = __fmul_rn(v, xs);
  if (in.w_scale) v = __fmul_rn(v, ws);
  return v;
}

// Element (t, n) of raw accumulators with their scales applied: what gemm_epilogue computes (it calls this) before
// adding a bias or storing. Rounded operations (no FMA contraction), so every reader gets the same bits.
__device__ __forceinline__ float raw_value(const RawAcc& in, int64_t t, int64_t n) {
  const uint32_t a = static_cast<const uint32_t*>(in.acc)[t * in.ld + n];
  return raw_scaled(in, a, in.x_scale ? in.x_scale[t] : 1.f, in.w_scale ? in.w_scale[n] : 1.f);
}

// Elements (t, n .. n + 3) of raw accumulators with their scales applied (n and in.ld multiples of 4, acc and
// w_scale 16-byte aligned): raw_value four times, from one 16-byte load of each.
__device__ __forceinline__ float4 raw_value4(const RawAcc& in, int64_t t, int64_t n) {
  const uint4 a = *reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(in.acc) + (t * in.ld + n) * 4);
  const float xs = in.x_scale ? in.x_scale[t] : 1.f;
  const float4 ws = in.w_scale ? *reinterpret_cast<const float4*>(in.w_scale + n) : make_float4(1.f, 1.f, 1.f, 1.f);
  return make_float4(raw_scaled(in, a.x, xs, ws.x), raw_scaled(in, a.y, xs, ws.y), raw_scaled(in, a.z, xs, ws.z),
                     raw_scaled(in, a.w, xs, ws.w));
}

// Element i of row r of o: v as BF16 (kind None), or v already divided by the row's scale as a code.
__device__ __forceinline__ void prep_store(const PrepOut& o, int64_t r, int64_t i, float v) {
  const int64_t at = r * o.ld + i;
  if (o.kind == ActKind::None) {
    static_cast<__nv_bfloat16*>(o.out)[at] = __float2bfloat16(v);
  } else if (o.kind == ActKind::Fp8Tensor) {
    const uint8_t c = float_to_fp8(v);
    if (o.codes_as_bf16) static_cast<__nv_bfloat16*>(o.out)[at] = __float2bfloat16(fp8_to_float(c));
    else static_cast<uint8_t*>(o.out)[at] = c;
  } else {
    const int8_t c = float_to_int8(v);
    if (o.codes_as_bf16) static_cast<__nv_bfloat16*>(o.out)[at] = __float2bfloat16(float(c));
    else static_cast<int8_t*>(o.out)[at] = c;
  }
}

// The scale of a row whose values have absolute maximum amax (I8Token), or the static one.
__device__ __forceinline__ float prep_scale(const PrepOut& o, float amax) {
  if (o.kind == ActKind::I8Token) return amax > 0.f ? amax / 127.0f : 1.0f;
  return o.static_scale;
}

// The whole block: out row r = prep(w * (x[r] * inv_rms)) for r < R, x FP32 [R, ldx] read through the L2
// (written by other blocks of the same launch). Every thread of the block calls it.
__device__ __forceinline__ void rmsnorm_rows_block(const float* x, int64_t ldx, int64_t R, int64_t H, const float* w,
                                                   float eps, const PrepOut& o) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * ldx;
    float ss = 0.f;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const float v = __ldcg(xr + i);
      ss = fmaf(v, v, ss);
    }
    ss = block_reduce<false>(ss);
    const float inv = 1.0f / sqrtf(ss / float(H) + eps);
    float amax = 0.f;
    if (o.kind == ActKind::I8Token) {
      for (int64_t i = threadIdx.x; i < H; i += blockDim.x) amax = fmaxf(amax, fabsf(w[i] * (__ldcg(xr + i) * inv)));
      amax = block_reduce<true>(amax);
    }
    const float s = prep_scale(o, amax);
    if (threadIdx.x == 0 && o.row_scale && o.kind != ActKind::None) o.row_scale[r] = s;
    const float is = 1.0f / s;
    for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
      const float v = w[i] * (__ldcg(xr + i) * inv);
      prep_store(o, r, i, o.kind == ActKind::None ? v : v * is);
    }
  }
}

}  // namespace llmq::cuda
#endif
