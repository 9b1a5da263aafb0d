#include <cstdint>
#include <cstdlib>

#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/launch.cuh"

namespace llmq::cuda {

namespace {

constexpr int kThreads = 256;

// Each row is cut into slices of kSlice values, one block per (row, slice), so a single decode token still
// spreads over many SMs. Row-wide reductions (the norm, the INT8 absmax) are recomputed by every block of the
// row from L2: cheaper than a second launch. The grid is one-dimensional with a row's slices next to each
// other (block b: row b / slices, slice b % slices), so the blocks that read a row run at about the same time
// and find it in the L2; with rows in x and slices in y, a prefill of thousands of rows read each row once per
// slice from HBM (H200, 8192 x 4096 FP32 RMSNorm: 281 us, ~5x its bytes at the copy bandwidth).
constexpr int64_t kSlice = 1024;

__host__ __device__ __forceinline__ int64_t slices(int64_t D) { return (D + kSlice - 1) / kSlice; }
unsigned row_slice_blocks(int64_t rows, int64_t D) { return unsigned(rows * slices(D)); }

// This block's row (and, in prep_row, its slice) of a row_slice_blocks(rows, D) launch.
__device__ __forceinline__ int64_t block_row(int64_t D) { return int64_t(blockIdx.x) / slices(D); }
__device__ __forceinline__ int64_t block_slice(int64_t D) { return int64_t(blockIdx.x) % slices(D); }

// Writes this block's slice of row `r` of `out` from value(i), i < D, in the format `out` asks for.
template <typename F>
__device__ void prep_row(const PrepOut& o, int64_t r, int64_t D, F value) {
  const int64_t sl = block_slice(D);
  const int64_t i0 = sl * kSlice, i1 = i0 + kSlice < D ? i0 + kSlice : D;
  if (o.kind == ActKind::None) {
    for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) prep_store(o, r, i, value(i));
    return;
  }
  float amax = 0.f;
  if (o.kind == ActKind::I8Token) {
    for (int64_t i = threadIdx.x; i < D; i += blockDim.x) amax = fmaxf(amax, fabsf(value(i)));
    amax = block_reduce<true>(amax);
  }
  const float s = prep_scale(o, amax);
  if (threadIdx.x == 0 && sl == 0 && o.row_scale) o.row_scale[r] = s;
  const float inv = 1.0f / s;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) prep_store(o, r, i, value(i) * inv);
}

__global__ void embed_kernel(const __nv_bfloat16* table, const int32_t* tokens, int64_t H, float* x) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* src = table + int64_t(tokens[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) x[t * H + i] = __bfloat162float(src[i]);
}

__global__ void rmsnorm_kernel(const float* x, const int32_t* src_rows, int64_t H, const float* w, float eps,
                               const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t r = block_row(H);
  const float* xr = x + (src_rows ? int64_t(src_rows[r]) : r) * H;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = block_reduce<false>(ss);
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
  prep_row(o, r, H, [&](int64_t i) { return w[i] * (xr[i] * inv); });
}

__global__ void swiglu_kernel(const float* gu, int64_t ld, int64_t I, bool paired, const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = block_row(I);
  const float* row = gu + t * ld;
  const int64_t gs = paired ? 2 : 1, uo = paired ? 1 : I;  // gate i at row[gs * i], up i at row[gs * i + uo]
  prep_row(o, t, I, [&](int64_t i) { return silu_mul(row[gs * i], row[gs * i + uo]); });
}

__global__ void act_prep_kernel(const float* x, int64_t ld, int64_t D, const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = block_row(D);
  const float* xr = x + t * ld;
  prep_row(o, t, D, [&](int64_t i) { return xr[i]; });
}

__global__ void epilogue_kernel(const void* acc, int64_t M, int64_t N, const float* xs, const float* ws,
                                const float* bias, float* y, int64_t ldy, bool accumulate, bool acc_int32) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  float v = acc_int32 ? float(static_cast<const int32_t*>(acc)[i]) : static_cast<const float*>(acc)[i];
  if (xs) v *= xs[m];
  if (ws) v *= ws[n];
  if (bias) v += bias[n];
  float* d = y + m * ldy + n;
  *d = accumulate ? *d + v : v;
}

__global__ void weight_to_bf16_kernel(WFmt fmt, const void* w, const float* scale, const uint8_t* zero, int64_t group,
                                      int64_t N, int64_t K, bool apply_scale, __nv_bfloat16* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * K) return;
  const int64_t n = i / K, k = i % K;
  float v;
  if (fmt == WFmt::I8) {
    v = float(static_cast<const int8_t*>(w)[i]);
    if (apply_scale) v *= scale[n];
  } else if (fmt == WFmt::FP8) {
    v = fp8_to_float(static_cast<const uint8_t*>(w)[i]);
    if (apply_scale) v *= scale[n];
  } else {
    const uint8_t b = static_cast<const uint8_t*>(w)[n * (K / 2) + k / 2];
    const int64_t g = n * (K / group) + k / group;
    v = (float((b >> ((k & 1) * 4)) & 0xF) - float(zero[g])) * scale[g];
  }
  out[i] = __float2bfloat16(v);
}

// I8 or FP8 rows to BF16, 16 weights of one row per thread (K % 16 == 0, 16-byte aligned rows): one 16-byte
// load, two 16-byte stores, one division per 16 values. The same value per weight as weight_to_bf16_kernel.
// Why: H200, full-size llama-2-7b, a 128-token prefill took 37.5 ms in w8a16 with the scalar kernel (a 64-bit
// division and a 2-byte store per weight) against 6.5 ms in bf16, which expands nothing (not yet re-measured).
__global__ void weight8_to_bf16_kernel(bool fp8, const uint4* w, const float* scale, int64_t K16, int64_t total16,
                                       bool apply_scale, uint4* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total16) return;
  const float sc = apply_scale ? scale[i / K16] : 1.f;
  const uint4 c = w[i];
  const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
  uint32_t o[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {  // bytes 2j, 2j + 1 -> one bf16 pair (the lower address in the low half)
    const uint32_t b0 = (cw[j / 2] >> (16 * (j % 2))) & 0xFFu, b1 = (cw[j / 2] >> (16 * (j % 2) + 8)) & 0xFFu;
    float v0 = fp8 ? fp8_to_float(uint8_t(b0)) : float(int8_t(uint8_t(b0)));
    float v1 = fp8 ? fp8_to_float(uint8_t(b1)) : float(int8_t(uint8_t(b1)));
    if (apply_scale) v0 *= sc, v1 *= sc;
    const __nv_bfloat162 h = __floats2bfloat162_rn(v0, v1);
    o[j] = *reinterpret_cast<const uint32_t*>(&h);
  }
  out[2 * i] = make_uint4(o[0], o[1], o[2], o[3]);
  out[2 * i + 1] = make_uint4(o[4], o[5], o[6], o[7]);
}

// (v, i) beats (bv, bi): larger, or equal at a smaller index; NaN never beats anything.
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (beats(ov, oi, v, i)) v = ov, i = oi;
  }
}

__global__ void argmax_kernel(const float* x, int64_t n, int32_t* ids, float* part_v, int32_t* part_i, int32_t* counters) {
  pdl_trigger();
  pdl_wait();
  const int64_t r = blockIdx.x;
  const int s = int(blockIdx.y);
  const int64_t chunk = (n + kArgmaxParts - 1) / kArgmaxParts;
  const int64_t i0 = s * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
  const float* row = x + r * n;
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x)
    if (beats(row[i], int(i), bv, bi)) bv = row[i], bi = int(i);
  warp_argmax(bv, bi);
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w)
      if (beats(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
    part_v[r * kArgmaxParts + s] = bv;
    part_i[r * kArgmaxParts + s] = bi;
  }
  // The last slice of the row to finish reduces all of them.
  if (!last_block(counters + r, kArgmaxParts) || warp > 0) return;
  bv = __ldcg(part_v + r * kArgmaxParts + lane);  // kArgmaxParts == 32: one slice a lane
  bi = __ldcg(part_i + r * kArgmaxParts + lane);
  warp_argmax(bv, bi);
  if (lane == 0) ids[r] = bi == 0x7fffffff ? 0 : bi;
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

void embed_gather(const void* table, const int32_t* tokens, int64_t T, int64_t H, float* x, cudaStream_t s) {
  if (T == 0) return;
  launch("embed_kernel", embed_kernel, unsigned(T), kThreads, 0, s, static_cast<const __nv_bfloat16*>(table), tokens, H, x);
}

void rmsnorm_prep(const float* x, const int32_t* src_rows, int64_t R, int64_t H, const float* w, float eps,
                  const PrepOut& out, cudaStream_t s) {
  if (R == 0) return;
  launch("rmsnorm_kernel", rmsnorm_kernel, row_slice_blocks(R, H), kThreads, 0, s, x, src_rows, H, w, eps, out);
}

void swiglu_prep(const float* gu, int64_t ld_gu, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s, bool paired) {
  if (T == 0) return;
  launch("swiglu_kernel", swiglu_kernel, row_slice_blocks(T, I), kThreads, 0, s, gu, ld_gu, I, paired, out);
}

void act_prep(const float* x, int64_t ldx, int64_t T, int64_t D, const PrepOut& out, cudaStream_t s) {
  if (T == 0) return;
  launch("act_prep_kernel", act_prep_kernel, row_slice_blocks(T, D), kThreads, 0, s, x, ldx, D, out);
}

void gemm_epilogue(const void* acc, int64_t M, int64_t N, const float* x_scale, const float* w_scale,
                   const float* bias, float* y, int64_t ldy, bool accumulate, cudaStream_t s, bool acc_int32) {
  if (M * N == 0) return;
  launch("epilogue_kernel", epilogue_kernel, blocks_for(M * N, kThreads), kThreads, 0, s, acc, M, N, x_scale, w_scale, bias,
         y, ldy, accumulate, acc_int32);
}

void argmax_rows(const float* x, int64_t R, int64_t n, int32_t* ids, float* part_v, int32_t* part_i, int32_t* counters,
                 cudaStream_t s) {
  static_assert(kArgmaxParts == 32, "the last block reduces one slice per lane");
  if (R == 0 || n == 0) return;
  launch("argmax_kernel", argmax_kernel, dim3(unsigned(R), kArgmaxParts), kThreads, 0, s, x, n, ids, part_v, part_i, counters);
}

// LLMQ_SCALAR_DEQUANT=1: the one-weight-per-thread expansion kernels (comparisons).
bool scalar_dequant() {
  static const bool on = [] {
    const char* e = std::getenv("LLMQ_SCALAR_DEQUANT");
    return e && *e && *e != '0';
  }();
  return on;
}

void weight_to_bf16(WFmt fmt, const void* w, const float* scale, const uint8_t* zero, int64_t group, int64_t N,
                    int64_t K, bool apply_scale, void* out, cudaStream_t s) {
  if (N * K == 0) return;
  const bool vec = (fmt == WFmt::I8 || fmt == WFmt::FP8) && K % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0 && !scalar_dequant();
  if (vec) {
    const int64_t total16 = N * K / 16;
    launch("weight8_to_bf16_kernel", weight8_to_bf16_kernel, blocks_for(total16, kThreads), kThreads, 0, s,
           fmt == WFmt::FP8, static_cast<const uint4*>(w), scale, K / 16, total16, apply_scale, static_cast<uint4*>(out));
    return;
  }
  launch("weight_to_bf16_kernel", weight_to_bf16_kernel, blocks_for(N * K, kThreads), kThreads, 0, s, fmt, w, scale, zero,
         group, N, K, apply_scale, static_cast<__nv_bfloat16*>(out));
}

}  // namespace llmq::cuda
