#include "backend/cuda/gemv.cuh"

#include <cstdlib>

#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/matmul_store.cuh"

namespace llmq::cuda {

namespace {

constexpr int kWarps = 4;  // warps per block
constexpr int kRows = 2;   // output rows per warp in the vector kernel
constexpr int kBatch = 4;  // 16-byte chunks of each row a lane loads before it multiplies them

template <WFmt WF>
__host__ __device__ constexpr int values_per_load() { return WF == WFmt::BF16 ? 8 : WF == WFmt::I4 ? 32 : 16; }
template <WFmt WF>
__host__ __device__ constexpr int64_t row_bytes(int64_t K) { return WF == WFmt::BF16 ? K * 2 : WF == WFmt::I4 ? K / 2 : K; }
__host__ __device__ constexpr int x_bytes(XFmt xf) { return xf == XFmt::BF16 ? 2 : 1; }

// The epilogue's arithmetic: scales and bias (matmul_store.cuh stores the result). xs: input row m's factor
// (x_scale[m], the RMSNorm's rms_factor for BF16 inputs, or the scale the block chose with x_prep).
template <WFmt WF, XFmt XF>
__device__ __forceinline__ float finish(const GemvArgs& a, int64_t row, float xs, float v) {
  v *= xs;
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

// 16 INT8 weight codes x 16 BF16 inputs. A code c becomes a float without an I2F (quarter rate on sm_80-sm_90,
// which bounded this kernel): with the sign bit flipped the byte is c + 128 in 0..255, and placed under the
// exponent of 2^23 it is the float 2^23 + c + 128 exactly (PRMT), from which one FADD leaves c.
__device__ __forceinline__ void dot_i8_bf16(const uint4& w, const uint4* x, float& acc) {
  const uint4 x0 = x[0], x1 = x[1];
  const uint32_t ws[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u, w.w ^ 0x80808080u};
  const uint32_t xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
  constexpr float kBias = 8388608.f + 128.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float c0 = __uint_as_float(__byte_perm(ws[i], 0x4B000000u, 0x7540)) - kBias;
    const float c1 = __uint_as_float(__byte_perm(ws[i], 0x4B000000u, 0x7541)) - kBias;
    const float c2 = __uint_as_float(__byte_perm(ws[i], 0x4B000000u, 0x7542)) - kBias;
    const float c3 = __uint_as_float(__byte_perm(ws[i], 0x4B000000u, 0x7543)) - kBias;
    acc = fmaf(c0, bf16lo(xs[2 * i]), acc);
    acc = fmaf(c1, bf16hi(xs[2 * i]), acc);
    acc = fmaf(c2, bf16lo(xs[2 * i + 1]), acc);
    acc = fmaf(c3, bf16hi(xs[2 * i + 1]), acc);
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

// 16 bytes of weights, read once: with an evict-first L2 policy and no L1 allocation (the activations are
// what the L1 keeps), so that the weights the next kernels prefetch into the L2 survive this pass; or, with
// `evict_first` off (LLMQ_GEMV_EVICT_NORMAL=1, comparisons), a plain read-only load.
__device__ __forceinline__ uint4 ld_weights(bool evict_first, const uint4* p) {
  if (!evict_first) return __ldg(p);
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "l"(pol));
  return v;
}

// GemvArgs::x_prep: the whole block turns the M FP32 rows of x (x o w) into codes in q[M][K] (shared memory),
// each row's scale into qs[m]: the arithmetic of rmsnorm_prep (prep.cuh, elementwise.cu) with its row factor
// from x_sumsq. Every thread of the block calls it; q is complete when it returns.
template <XFmt XF, int MT>
__device__ __forceinline__ void prep_rows_shared(const GemvArgs& a, uint8_t* q, float* qs) {
  const int64_t K4 = a.K / 4;  // K % 16 == 0 (gemv_supports)
  for (int m = 0; m < MT && m < a.M; ++m) {
    const float4* xr = reinterpret_cast<const float4*>(static_cast<const float*>(a.x) + int64_t(m) * a.ldx);
    const float r = rms_factor(a, m);
    float amax = 0.f;
    if (a.x_prep == ActKind::I8Token) {
      for (int64_t i = threadIdx.x; i < K4; i += blockDim.x) {
        const float4 v = xr[i];
        amax = fmaxf(fmaxf(fmaxf(amax, fabsf(v.x * r)), fabsf(v.y * r)), fmaxf(fabsf(v.z * r), fabsf(v.w * r)));
      }
      amax = block_reduce<true>(amax);
    }
    PrepOut o;
    o.kind = a.x_prep;
    o.static_scale = a.x_prep_scale;
    const float s = prep_scale(o, amax);
    const float is = 1.0f / s;
    uint32_t* qr = reinterpret_cast<uint32_t*>(q + int64_t(m) * a.K);
    for (int64_t i = threadIdx.x; i < K4; i += blockDim.x) {
      const float4 v = xr[i];
      const float e[4] = {(v.x * r) * is, (v.y * r) * is, (v.z * r) * is, (v.w * r) * is};
      uint32_t w = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w |= uint32_t(XF == XFmt::FP8 ? float_to_fp8(e[j]) : uint8_t(float_to_int8(e[j]))) << (8 * j);
      qr[i] = w;
    }
    if (threadIdx.x == 0) qs[m] = s;
  }
  __syncthreads();
}

// One warp, or ks warps of a block that split K between them, own two output rows (the SwiGLU epilogue pairs
// them). Each lane keeps kBatch 16-byte chunks of each row in flight: the loads of a batch are all issued
// before any of them is used, since a loop that loads and multiplies one chunk at a time keeps only 32 bytes a
// lane in flight and leaves the smaller matrices latency-bound (H200, llama-3-8b o_proj BF16: 58% of the copy
// bandwidth, gate_up with 7x more warps 98%).
//
// XP (GemvArgs::x_prep): the inputs are made in shared memory by the block first (prep_rows_shared).
// DENSE: compiled for 8 blocks an SM (at most 64 registers, 32 warps an SM; a few bytes spill) instead of the
// registers the compiler wants (72 for one input row of FP8 or INT8 weights: 28 warps). The launcher picks the
// instance whose last wave of warps is fuller (launch_vec).
template <WFmt WF, XFmt XF, int MT, bool XP, bool DENSE>
__global__ void __launch_bounds__(kWarps * 32, DENSE ? 8 : 0) gemv_vec_kernel(const GemvArgs a) {
  extern __shared__ uint4 xq[];  // XP: [MT][K] input codes
  __shared__ float xqs[MT];      // XP: their row scales
  constexpr int E = values_per_load<WF>();
  constexpr bool kInt = XF == XFmt::I8;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int ks = a.ksplit;  // 1, 2 or 4 (the launcher's choice)
  const int kw = warp % ks; // this warp's share of K: chunks kw * 32 + lane + i * 32 * ks
  const int64_t row0 = (int64_t(blockIdx.x) * (kWarps / ks) + warp / ks) * kRows;
  // Warps past N do nothing, but they still take part in the block-wide steps of the K-split sum, the
  // input prep and the fused norm.
  const bool active = row0 < a.N;
  if (!active && !a.norm_counter && ks == 1 && !XP) return;
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
  // for it (1 KB of each row, so that all resident warps together stay well inside the L2; budgets of up to
  // 24 MB a matrix, whole rows of qkv and o, made the step 2% slower: H200, 4-layer llama-3-8b, bf16 batch 1
  // 0.820 against 0.803 ms, fp8 0.680 against 0.666).
  if (active && kw == 0 && lane < kRows) prefetch_l2(lane == 0 ? wr[0] : wr[kRows - 1], uint32_t(rb < 1024 ? rb : 1024));
  // GemvArgs::preload: this lane's first batch of weights into registers before the wait (and, with XP, before
  // the input prep), so that it streams in while they run.
  const int64_t step = 32 * int64_t(ks);
  const bool ef = a.evict_first;
  int64_t c = lane + 32 * int64_t(kw);
  uint4 pre[kBatch][kRows];
  const bool preloaded = a.preload && c + (kBatch - 1) * step < chunks;
  if (preloaded)
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r) pre[u][r] = ld_weights(ef, wr[r] + c + u * step);
  pdl_trigger();
  pdl_wait();
  if constexpr (XP) prep_rows_shared<XF, MT>(a, reinterpret_cast<uint8_t*>(xq), xqs);
  const int64_t ngroups = WF == WFmt::I4 ? a.K / a.group : 1;
  const int64_t xrow = XP ? a.K / 16 : a.ldx * x_bytes(XF) / 16;  // 16-byte units per input row
  const uint4* xb = XP ? xq : static_cast<const uint4*>(a.x);
  constexpr int XU = E * (XF == XFmt::BF16 ? 2 : 1) / 16;  // 16-byte input loads per chunk

  float acc[kRows][MT];
  int iacc[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) acc[r][m] = 0.f, iacc[r][m] = 0;

  // acc += chunk c of both rows (wv) times chunk c of every input row.
  auto multiply = [&](int64_t c, const uint4 (&wv)[kRows]) {
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
  };
  if (preloaded) {
#pragma unroll
    for (int u = 0; u < kBatch; ++u) multiply(c + u * step, pre[u]);
    c += kBatch * step;
  }
  for (; c + (kBatch - 1) * step < chunks; c += kBatch * step) {
    uint4 wv[kBatch][kRows];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r) wv[u][r] = ld_weights(ef, wr[r] + c + u * step);
#pragma unroll
    for (int u = 0; u < kBatch; ++u) multiply(c + u * step, wv[u]);
  }
  for (; c < chunks; c += step) {
    uint4 wv[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) wv[r] = ld_weights(ef, wr[r] + c);
    multiply(c, wv);
  }

  // Row sums: over the lanes, then over the ks warps of the row pair (through shared memory). INT32 sums stay
  // integers until the last one, so INT8 x INT8 is exact.
  float v[kRows][MT];
  int iv[kRows][MT];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if constexpr (kInt) iv[r][m] = warp_sum(iacc[r][m]);
      else v[r][m] = warp_sum(acc[r][m]);
    }
  if (ks > 1) {
    __shared__ float part[kWarps][kRows][MT];
    __shared__ int ipart[kWarps][kRows][MT];
    if (lane == 0)
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          if constexpr (kInt) ipart[warp][r][m] = iv[r][m];
          else part[warp][r][m] = v[r][m];
        }
    __syncthreads();
    if (kw == 0 && lane == 0)
#pragma unroll
      for (int r = 0; r < kRows; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m)
          for (int j = 1; j < ks; ++j) {
            if constexpr (kInt) iv[r][m] += ipart[warp + j][r][m];
            else v[r][m] += part[warp + j][r][m];
          }
  }
  if constexpr (kInt)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int m = 0; m < MT; ++m) v[r][m] = float(iv[r][m]);
  static_assert(kRows == 2, "the SwiGLU epilogue pairs a warp's two rows");
  if (active && kw == 0 && lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= a.M) break;
      const float xs = XP ? xqs[m] : XF != XFmt::BF16 ? a.x_scale[m] : rms_factor(a, m);
      if (a.swiglu_out) {  // row0 is even: rows row0, row0 + 1 are gate and up of activation row0 / 2
        store_swiglu(a, row0 / 2, m, finish<WF, XF>(a, row0, xs, v[0][m]), finish<WF, XF>(a, row0 + 1, xs, v[1][m]));
        continue;
      }
      float sq = 0.f;
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (row0 + r < a.N) sq += store_y(a, row0 + r, m, finish<WF, XF>(a, row0 + r, xs, v[r][m]));
      add_sumsq(a, m, sq);
    }
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
    const float xs = XF != XFmt::BF16 ? a.x_scale[m] : rms_factor(a, m);
    if (lane == 0) add_sumsq(a, m, store_y(a, row, m, finish<WF, XF>(a, row, xs, v)));
  }
}

// Warps per row pair for the vector kernel. Where N alone gives two waves of resident warps or more (resident:
// the kernel's occupancy times the SMs) one warp a pair; otherwise the most (up to a block's four) that leave
// each warp at least 2 KB of every row, one batch of loads a lane. H200, llama-3-8b shapes at T = 1
// (llmq-kbench, bench/results/2026-12-02-nvidia-h200-session7.txt): BF16 qkv 19.8 / 17.6 / 16.8 us with
// 1 / 2 / 4 warps, down 40.9 / 33.1 / 32.5; INT8 weights down 26.5 / 22.9 / 21.1; gate_up (3 waves) is
// best with one (W8A16 35.0 / 38.8 / 46.9). LLMQ_GEMV_KSPLIT=1|2|4 forces one (comparisons).
int choose_ksplit(const GemvArgs& a, int64_t rb, int64_t resident) {
  static const int forced = [] {
    const char* e = std::getenv("LLMQ_GEMV_KSPLIT");
    return e ? std::atoi(e) : 0;
  }();
  if (a.ksplit) return a.ksplit;
  if (forced == 1 || forced == 2 || forced == 4) return forced;
  const int64_t warps = (a.N + kRows - 1) / kRows;
  if (warps >= 2 * resident) return 1;
  int ks = 1;
  while (ks < kWarps && rb / (ks * 2) >= 2048) ks *= 2;
  return ks;
}

// Resident warps of one vector-kernel instance on the current device (computed once per instance; XP: for
// inputs of 4096 values, the hidden size of the 7-8B models, on which the choice of ksplit was measured).
template <WFmt WF, XFmt XF, int MT, bool XP, bool DENSE>
int64_t resident_warps() {
  static const int64_t n = [] {
    int dev = 0, sms = 0, blocks = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gemv_vec_kernel<WF, XF, MT, XP, DENSE>, kWarps * 32,
                                                      XP ? size_t(MT) * 4096 : 0) != cudaSuccess)
      return int64_t(kWarps);
    return int64_t(sms) * blocks * kWarps;
  }();
  return n;
}

// The inputs' shared memory of the XP instance for M rows (MT of them) of K codes.
constexpr int64_t kMaxPrepBytes = 48 * 1024;
int64_t tile_m(int M) { return M <= 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : 8; }

template <WFmt WF, XFmt XF, int MT, bool XP, bool DENSE>
void launch_vec_as(const GemvArgs& args, int ks, cudaStream_t s) {
  static const bool evict_normal = env_flag("LLMQ_GEMV_EVICT_NORMAL");
  GemvArgs a = args;
  a.ksplit = ks;
  a.evict_first = !evict_normal;
  // The first batch of weights loaded before the wait: where the block preps its inputs first (XP), or
  // everywhere with LLMQ_GEMV_PRELOAD=1 (comparisons).
  static const bool preload_all = env_flag("LLMQ_GEMV_PRELOAD"), preload_off = env_flag("LLMQ_GEMV_NO_PRELOAD");
  a.preload = !preload_off && (XP || preload_all);
  const int64_t rows = int64_t(kWarps / a.ksplit) * kRows;  // per block
  const size_t smem = XP ? size_t(MT * a.K) : 0;
  launch("gemv_vec_kernel", gemv_vec_kernel<WF, XF, MT, XP, DENSE>, dim3(unsigned((a.N + rows - 1) / rows)),
         dim3(kWarps * 32), smem, s, a);
}

// The share of the last wave's warp slots that a launch of `warps` fills, `resident` warps a wave.
double last_wave_fill(int64_t warps, int64_t resident) {
  const int64_t waves = (warps + resident - 1) / resident;
  return double(warps) / double(waves * resident);
}

// One input row of FP8 or INT8 weights: the instance (DENSE or not) whose launch leaves the fuller last wave, since
// a warp here is a few batches of loads and a ragged last wave is time the DRAM idles. On the llama-3-8b shape
// (H100, bench/results/2026-12-07-nvidia-h100-session43.txt) this takes the dense instance for o_proj (1.11 -> 0.97
// waves; FP8 9.40 -> 8.98 us, W8A16 10.24 -> 9.38) and down_proj (2.22 -> 1.94; 22.90 -> 21.89, 23.84 -> 22.48) and
// keeps qkv (1.66 against 1.45 waves) and gate_up (3.88 against 3.39), where the dense instance measured slower;
// batch-1 decode 3.590 -> 3.554 ms a token (FP8), 3.588 -> 3.513 (W8A16). GemvArgs::dense or LLMQ_GEMV_DENSE=0|1
// forces one.
template <WFmt WF, XFmt XF, int MT, bool XP>
void launch_vec(const GemvArgs& a, cudaStream_t s) {
  const int64_t rb = row_bytes<WF>(a.K), pairs = (a.N + kRows - 1) / kRows;
  const int64_t r0 = resident_warps<WF, XF, MT, XP, false>();
  const int ks0 = choose_ksplit(a, rb, r0);
  if constexpr (MT == 1 && (WF == WFmt::I8 || WF == WFmt::FP8)) {
    static const int forced = [] {
      const char* e = std::getenv("LLMQ_GEMV_DENSE");
      return e && *e ? (std::atoi(e) ? 1 : -1) : 0;
    }();
    const int want = a.dense ? a.dense : forced;
    if (want >= 0) {
      const int64_t r1 = resident_warps<WF, XF, MT, XP, true>();
      const int ks1 = choose_ksplit(a, rb, r1);
      if (want > 0 || last_wave_fill(pairs * ks1, r1) > last_wave_fill(pairs * ks0, r0))
        return launch_vec_as<WF, XF, MT, XP, true>(a, ks1, s);
    }
  }
  launch_vec_as<WF, XF, MT, XP, false>(a, ks0, s);
}

template <WFmt WF, XFmt XF, bool XP>
void launch_vec_m(const GemvArgs& a, cudaStream_t s) {
  switch (tile_m(a.M)) {
    case 1: return launch_vec<WF, XF, 1, XP>(a, s);
    case 2: return launch_vec<WF, XF, 2, XP>(a, s);
    case 4: return launch_vec<WF, XF, 4, XP>(a, s);
    default: return launch_vec<WF, XF, 8, XP>(a, s);
  }
}

template <WFmt WF, XFmt XF>
void launch(const GemvArgs& a, cudaStream_t s) {
  if (gemv_vectorized(a)) {
    if constexpr (XF != XFmt::BF16) {
      if (a.x_prep != ActKind::None) return launch_vec_m<WF, XF, true>(a, s);
    }
    launch_vec_m<WF, XF, false>(a, s);
  } else {
    const dim3 grid(unsigned((a.N + kWarps - 1) / kWarps));
    launch("gemv_scalar_kernel", gemv_scalar_kernel<WF, XF>, grid, dim3(kWarps * 32), 0, s, a);
  }
}

}  // namespace

bool gemv_supports(const GemvArgs& a) {
  if (a.M < 1 || a.M > kGemvMaxM || a.N < 1 || a.K < 1 || !a.w || !a.x || (!a.y && !a.swiglu_out)) return false;
  if (a.ldx < a.K || (!a.swiglu_out && a.ldy < a.N)) return false;
  if (a.xf == XFmt::I8 && a.wf != WFmt::I8) return false;
  if (a.xf == XFmt::FP8 && a.wf != WFmt::FP8) return false;
  if (a.xf != XFmt::BF16 && !a.x_scale && a.x_prep == ActKind::None) return false;
  if ((a.wf == WFmt::I8 || a.wf == WFmt::FP8 || a.wf == WFmt::I4) && !a.w_scale) return false;
  if (a.wf == WFmt::I4 && (!a.w_zero || a.group < 2 || a.group % 2 || a.K % a.group)) return false;
  if (!epilogue_args_ok(a)) return false;
  if ((a.swiglu_out || a.norm_counter) && !gemv_vectorized(a)) return false;  // the vector kernel's epilogues
  if (a.ksplit != 0 && a.ksplit != 1 && a.ksplit != 2 && a.ksplit != 4) return false;
  if (a.x_prep != ActKind::None) {  // the vector kernel's input prep (its x checks: gemv_vectorized)
    const bool kinds = a.xf == XFmt::FP8 ? a.x_prep == ActKind::Fp8Tensor
                                         : a.xf == XFmt::I8 && (a.x_prep == ActKind::I8Tensor || a.x_prep == ActKind::I8Token);
    if (!kinds || !gemv_vectorized(a) || !a.x_sumsq || a.K % 16 || tile_m(a.M) * a.K > kMaxPrepBytes) return false;
    if (a.x_prep != ActKind::I8Token && !(a.x_prep_scale > 0.f)) return false;
  }
  return true;
}

bool epilogue_args_ok(const GemvArgs& a) {
  if (a.swiglu_out && (a.N % 2 || a.swiglu_ld < a.N / 2)) return false;
  if (a.swiglu_kind != ActKind::None &&
      (!a.swiglu_out || a.swiglu_kind == ActKind::I8Token || (a.swiglu_row_scale && a.swiglu_row_scale == a.x_scale)))
    return false;
  if (a.norm_counter && (!a.y || a.swiglu_out || !a.norm_w || !a.norm_out.out || a.norm_out.ld < a.N)) return false;
  if (a.rms_out && (!a.y || a.swiglu_out || !a.rms_w || !a.rms_sumsq || a.rms_ld < a.N)) return false;
  if (a.x_sumsq && ((a.xf != XFmt::BF16 && a.x_prep == ActKind::None) || !(a.x_inv_n > 0.f))) return false;
  if (a.x_prep != ActKind::None && (!a.x_sumsq || a.xf == XFmt::BF16)) return false;
  return true;
}

bool gemv_vectorized(const GemvArgs& a) {
  const int E = a.wf == WFmt::BF16 ? 8 : a.wf == WFmt::I4 ? 32 : 16;
  if (a.K % E) return false;
  if (a.wf == WFmt::I4 && a.group % 32) return false;
  const int64_t xb = a.x_prep != ActKind::None ? 4 : x_bytes(a.xf);  // x_prep: FP32 rows
  if (!aligned16(a.w) || !aligned16(a.x) || (a.ldx * xb) % 16) return false;
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
