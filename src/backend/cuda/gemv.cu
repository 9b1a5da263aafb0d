#include "backend/cuda/gemv.cuh"

#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/matmul_store.cuh"

namespace llmq::cuda {

namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kRows = 2;   // output rows per warp in the vector kernel

template <WFmt WF>
__host__ __device__ constexpr int values_per_load() { return WF == WFmt::BF16 ? 8 : WF == WFmt::I4 ? 32 : 16; }
template <WFmt WF>
__host__ __device__ constexpr int64_t row_bytes(int64_t K) { return WF == WFmt::BF16 ? K * 2 : WF == WFmt::I4 ? K / 2 : K; }
__host__ __device__ constexpr int x_bytes(XFmt xf) { return xf == XFmt::BF16 ? 2 : 1; }

// The epilogue's arithmetic: scales and bias (matmul_store.cuh stores the result).
template <WFmt WF, XFmt XF>
__device__ __forceinline__ float finish(const GemvArgs& a, int64_t row, int m, float v) {
  if constexpr (XF != XFmt::BF16) v *= a.x_scale[m];
  if constexpr (WF == WFmt::I8 || WF == WFmt::FP8) v *= a.w_scale[row];
  if (a.bias) v += a.bias[row];
  return v;
}

// ---- 16-byte chunk dot products (acc += sum over the chunk) ----

// 8 BF16 weights x 8 BF16 inputs
__device__ __forceinline__ void dot_bf16(const uint4& w, const uint4* x, float& acc) {
  const uint4 xv = x[0];
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(bf16lo(ws[i]), bf16lo(xs[i]), acc);
    acc = fmaf(bf16hi(ws[i]), bf16hi(xs[i]), acc);
  }
}

// 16 INT8 weight codes x 16 BF16 inputs
__device__ __forceinline__ void dot_i8_bf16(const uint4& w, const uint4* x, float& acc) {
  const uint4 x0 = x[0], x1 = x[1];
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    acc = fmaf(float(int8_t(ws[i])), bf16lo(xs[2 * i]), acc);
    acc = fmaf(float(int8_t(ws[i] >> 8)), bf16hi(xs[2 * i]), acc);
    acc = fmaf(float(int8_t(ws[i] >> 16)), bf16lo(xs[2 * i + 1]), acc);
    acc = fmaf(float(int8_t(ws[i] >> 24)), bf16hi(xs[2 * i + 1]), acc);
  }
}

// 16 FP8 weight codes x 16 BF16 inputs
__device__ __forceinline__ void dot_fp8_bf16(const uint4& w, const uint4* x, float& acc) {
  const uint4 x0 = x[0], x1 = x[1];
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 lo = fp8x2_to_float2(uint16_t(ws[i])), hi = fp8x2_to_float2(uint16_t(ws[i] >> 16));
    acc = fmaf(lo.x, bf16lo(xs[2 * i]), acc);
    acc = fmaf(lo.y, bf16hi(xs[2 * i]), acc);
    acc = fmaf(hi.x, bf16lo(xs[2 * i + 1]), acc);
    acc = fmaf(hi.y, bf16hi(xs[2 * i + 1]), acc);
  }
}

// 32 INT4 weight codes x 32 BF16 inputs; zf = 2^23 + zero point, so (2^23 + code) - zf = code - zero exactly.
__device__ __forceinline__ float dot_i4_bf16(const uint4& w, const uint4* x, float zf) {
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 xv = x[i];  // inputs 8i .. 8i+7
    const uint32_t xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float q = __uint_as_float(0x4B000000u | ((ws[i] >> (4 * j)) & 0xFu)) - zf;
      acc = fmaf(q, (j & 1) ? bf16hi(xs[j / 2]) : bf16lo(xs[j / 2]), acc);
    }
  }
  return acc;
}

// 16 INT8 x 16 INT8 -> INT32
__device__ __forceinline__ void dot_i8_i8(const uint4& w, const uint4* x, int& acc) {
  const uint4 xv = x[0];
  acc = __dp4a(int(w.x), int(xv.x), acc);
  acc = __dp4a(int(w.y), int(xv.y), acc);
  acc = __dp4a(int(w.z), int(xv.z), acc);
  acc = __dp4a(int(w.w), int(xv.w), acc);
}

// 16 FP8 x 16 FP8, products in FP32
__device__ __forceinline__ void dot_fp8_fp8(const uint4& w, const uint4* x, float& acc) {
  const uint4 xv = x[0];
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 a = fp8x2_to_float2(uint16_t(ws[i] >> (16 * h))), b = fp8x2_to_float2(uint16_t(xs[i] >> (16 * h)));
      acc = fmaf(a.x, b.x, acc);
      acc = fmaf(a.y, b.y, acc);
    }
  }
}

template <WFmt WF, XFmt XF, int MT>
__global__ void __launch_bounds__(kWarps * 32) gemv_vec_kernel(const GemvArgs a) {
  constexpr int E = values_per_load<WF>();
  constexpr bool kInt = XF == XFmt::I8;
  const int lane = threadIdx.x % 32;
  const int64_t row0 = (int64_t(blockIdx.x) * kWarps + threadIdx.x / 32) * kRows;
  // Warps past N do nothing, but with the fused norm they still take part in its block-wide steps.
  const bool active = row0 < a.N;
  if (!active && !a.norm_counter) return;
  const int64_t chunks = active ? a.K / E : 0;
  const int64_t rb = row_bytes<WF>(a.K);
  int64_t rows[kRows];
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    rows[r] = row0 + r < a.N ? row0 + r : a.N - 1;  // a missing last row re-reads row N-1; never stored
    wr[r] = reinterpret_cast<const uint4*>(static_cast<const char*>(a.w) + rows[r] * rb);
  }
  // The weights do not depend on the previous kernel: start the first of them towards the L2 before waiting
  // for it (1 KB of each row, so that all resident warps together stay well inside the L2).
  if (active && lane < kRows) prefetch_l2(lane == 0 ? wr[0] : wr[kRows - 1], uint32_t(rb < 1024 ? rb : 1024));
  pdl_trigger();
  pdl_wait();
  const int64_t ngroups = WF == WFmt::I4 ? a.K / a.group : 1;
  const int64_t xrow = a.ldx * x_bytes(XF) / 16;  // 16-byte units per input row
  const uint4* xb = static_cast<const uint4*>(a.x);
  constexpr int XU = E * (XF == XFmt::BF16 ? 2 : 1) / 16;  // 16-byte input loads per chunk

  float acc[kRows][MT];
  int iacc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f, iacc[r][m] = 0;

#pragma unroll 4
  for (int64_t c = lane; c < chunks; c += 32) {
    uint4 wv[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) wv[r] = __ldg(wr[r] + c);
    float gs[kRows], gz[kRows];
    if constexpr (WF == WFmt::I4) {
      const int64_t g = c * E / a.group;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        gs[r] = __ldg(a.w_scale + rows[r] * ngroups + g);
        gz[r] = 8388608.f + float(__ldg(a.w_zero + rows[r] * ngroups + g));
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= a.M) break;
      const uint4* xc = xb + m * xrow + c * XU;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if constexpr (WF == WFmt::BF16) dot_bf16(wv[r], xc, acc[r][m]);
        else if constexpr (WF == WFmt::I4) acc[r][m] = fmaf(gs[r], dot_i4_bf16(wv[r], xc, gz[r]), acc[r][m]);
        else if constexpr (WF == WFmt::I8 && XF == XFmt::BF16) dot_i8_bf16(wv[r], xc, acc[r][m]);
        else if constexpr (WF == WFmt::FP8 && XF == XFmt::BF16) dot_fp8_bf16(wv[r], xc, acc[r][m]);
        else if constexpr (WF == WFmt::I8 && XF == XFmt::I8) dot_i8_i8(wv[r], xc, iacc[r][m]);
        else dot_fp8_fp8(wv[r], xc, acc[r][m]);
      }
    }
  }
  static_assert(kRows == 2, "the SwiGLU epilogue pairs a warp's two rows");
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    if (m >= a.M || !active) break;
    float v[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) v[r] = kInt ? float(warp_sum(iacc[r][m])) : warp_sum(acc[r][m]);
    if (lane != 0) continue;
    if (a.swiglu_out) {  // row0 is even: rows row0, row0 + 1 are gate and up of activation row0 / 2
      store_swiglu(a, row0 / 2, m, finish<WF, XF>(a, row0, m, v[0]), finish<WF, XF>(a, row0 + 1, m, v[1]));
      continue;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (row0 + r < a.N) store_y(a, row0 + r, m, finish<WF, XF>(a, row0 + r, m, v[r]));
  }
  norm_tail(a);
}

// Any K and alignment: one warp per row, one value per lane at a time.
template <WFmt WF, XFmt XF>
__global__ void __launch_bounds__(kWarps * 32) gemv_scalar_kernel(const GemvArgs a) {
  const int lane = threadIdx.x % 32;
  pdl_trigger();
  pdl_wait();
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= a.N) return;
  float acc[kGemvMaxM];
  int iacc[kGemvMaxM];
  for (int m = 0; m < kGemvMaxM; ++m) acc[m] = 0.f, iacc[m] = 0;
  const int64_t ngroups = WF == WFmt::I4 ? a.K / a.group : 1;
  for (int64_t k = lane; k < a.K; k += 32) {
    float wf = 0.f;
    int wi = 0;
    if constexpr (WF == WFmt::BF16) {
      wf = __bfloat162float(static_cast<const __nv_bfloat16*>(a.w)[row * a.K + k]);
    } else if constexpr (WF == WFmt::I8) {
      wi = static_cast<const int8_t*>(a.w)[row * a.K + k];
      wf = float(wi);
    } else if constexpr (WF == WFmt::FP8) {
      wf = fp8_to_float(static_cast<const uint8_t*>(a.w)[row * a.K + k]);
    } else {
      const uint8_t b = static_cast<const uint8_t*>(a.w)[row * (a.K / 2) + k / 2];
      const int64_t g = row * ngroups + k / a.group;
      wf = (float((b >> ((k & 1) * 4)) & 0xF) - float(a.w_zero[g])) * a.w_scale[g];
    }
    for (int m = 0; m < a.M; ++m) {
      const int64_t xi = m * a.ldx + k;
      if constexpr (XF == XFmt::BF16) acc[m] = fmaf(wf, __bfloat162float(static_cast<const __nv_bfloat16*>(a.x)[xi]), acc[m]);
      else if constexpr (XF == XFmt::I8) iacc[m] += wi * int(static_cast<const int8_t*>(a.x)[xi]);
      else acc[m] = fmaf(wf, fp8_to_float(static_cast<const uint8_t*>(a.x)[xi]), acc[m]);
    }
  }
  for (int m = 0; m < a.M; ++m) {
    const float v = XF == XFmt::I8 ? float(warp_sum(iacc[m])) : warp_sum(acc[m]);
    if (lane == 0) store_y(a, row, m, finish<WF, XF>(a, row, m, v));
  }
}

template <WFmt WF, XFmt XF>
void launch(const GemvArgs& a, cudaStream_t s) {
  const dim3 block(kWarps * 32);
  if (gemv_vectorized(a)) {
    const dim3 grid(unsigned((a.N + kWarps * kRows - 1) / (kWarps * kRows)));
    if (a.M <= 1) launch("gemv_vec_kernel", gemv_vec_kernel<WF, XF, 1>, grid, block, 0, s, a);
    else if (a.M <= 2) launch("gemv_vec_kernel", gemv_vec_kernel<WF, XF, 2>, grid, block, 0, s, a);
    else if (a.M <= 4) launch("gemv_vec_kernel", gemv_vec_kernel<WF, XF, 4>, grid, block, 0, s, a);
    else launch("gemv_vec_kernel", gemv_vec_kernel<WF, XF, 8>, grid, block, 0, s, a);
  } else {
    const dim3 grid(unsigned((a.N + kWarps - 1) / kWarps));
    launch("gemv_scalar_kernel", gemv_scalar_kernel<WF, XF>, grid, block, 0, s, a);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

bool gemv_supports(const GemvArgs& a) {
  if (a.M < 1 || a.M > kGemvMaxM || a.N < 1 || a.K < 1 || !a.w || !a.x || (!a.y && !a.swiglu_out)) return false;
  if (a.ldx < a.K || (!a.swiglu_out && a.ldy < a.N)) return false;
  if (a.xf == XFmt::I8 && a.wf != WFmt::I8) return false;
  if (a.xf == XFmt::FP8 && a.wf != WFmt::FP8) return false;
  if (a.xf != XFmt::BF16 && !a.x_scale) return false;
  if ((a.wf == WFmt::I8 || a.wf == WFmt::FP8 || a.wf == WFmt::I4) && !a.w_scale) return false;
  if (a.wf == WFmt::I4 && (!a.w_zero || a.group < 2 || a.group % 2 || a.K % a.group)) return false;
  if (a.swiglu_out && (a.N % 2 || a.swiglu_ld < a.N / 2 || !gemv_vectorized(a))) return false;
  if (a.norm_counter && (!a.y || a.swiglu_out || !a.norm_w || !a.norm_out.out || a.norm_out.ld < a.N || !gemv_vectorized(a)))
    return false;
  return true;
}

bool gemv_vectorized(const GemvArgs& a) {
  const int E = a.wf == WFmt::BF16 ? 8 : a.wf == WFmt::I4 ? 32 : 16;
  if (a.K % E) return false;
  if (a.wf == WFmt::I4 && a.group % 32) return false;
  if (!aligned16(a.w) || !aligned16(a.x) || (a.ldx * x_bytes(a.xf)) % 16) return false;
  return true;
}

void gemv(const GemvArgs& a, cudaStream_t s) {
  if (!gemv_supports(a)) throw Error("gemv: unsupported arguments (M " + std::to_string(a.M) + ", N " + std::to_string(a.N) +
                                     ", K " + std::to_string(a.K) + ")");
  switch (a.wf) {
    case WFmt::BF16: return launch<WFmt::BF16, XFmt::BF16>(a, s);
    case WFmt::I4: return launch<WFmt::I4, XFmt::BF16>(a, s);
    case WFmt::I8:
      if (a.xf == XFmt::I8) return launch<WFmt::I8, XFmt::I8>(a, s);
      return launch<WFmt::I8, XFmt::BF16>(a, s);
    case WFmt::FP8:
      if (a.xf == XFmt::FP8) return launch<WFmt::FP8, XFmt::FP8>(a, s);
      return launch<WFmt::FP8, XFmt::BF16>(a, s);
  }
}

}  // namespace llmq::cuda
