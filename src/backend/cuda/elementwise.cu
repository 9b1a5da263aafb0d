#include <cooperative_groups.h>

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

// Per-token INT8 codes need the whole row's absmax before any code is written: the sliced launch above computes
// the whole row in each of its blocks (14 times over for a SwiGLU row of 14,336). Rows of at most kRowMaxD values
// take one block of kRowThreads each instead, every thread keeping its kRowVpt values in registers, so each value
// is computed once; the codes are the same as prep_row's (the same values, the same absmax). H200, llama-3-8b cut
// to 4 layers, int8-sq at batch 64: 0.972 ms a step against 1.104 with the sliced kernels (LLMQ_ROW_SLICED=1;
// bench/results/2026-12-04-nvidia-h200-session17.txt), where SwiGLU alone took 28.7 us a layer.
constexpr int kRowThreads = 1024, kRowVpt = 24;
constexpr int64_t kRowMaxD = int64_t(kRowThreads) * kRowVpt;
// LLMQ_ROW_SLICED=1: per-token INT8 rows take the sliced kernels too (comparisons).
bool whole_rows(const PrepOut& o, int64_t D) {
  static const bool sliced = env_flag("LLMQ_ROW_SLICED");
  return !sliced && o.kind == ActKind::I8Token && D <= kRowMaxD;
}
// The one-block-a-row kernels run blocks of kRowThreadsSmall threads where a launch has more than kDecodeRows rows
// (prefill) and a row fits (D <= kRowThreadsSmall * kRowVpt): at 1024 threads (62 registers each) one block is
// resident an SM and a 2048-token prefill walks its rows one block at a time; at 256 (59-76 registers, no spills),
// three or four. H200, llama-3-8b cut to 4 layers, 2048-token prefill, median CUPTI duration a call: fp8's
// residual_rmsnorm_kernel 107 us (1024 threads) / 70 (256), int8-sq's 132 / 88
// (bench/results/2026-12-04-nvidia-h200-session19.txt). Decode steps (<= 64 rows) keep 1024.
// LLMQ_ROW_THREADS=1024: 1024-thread blocks for every launch (comparisons).
constexpr int kRowThreadsSmall = 256;
constexpr int64_t kDecodeRows = 64;  // the most tokens a decode step (wgemm's kWgemmMaxT) has
bool row_threads_1024() {
  static const bool on = [] {
    const char* e = std::getenv("LLMQ_ROW_THREADS");
    return e && std::atoi(e) == kRowThreads;
  }();
  return on;
}
// Decode steps too take the kRowThreadsSmall blocks, and the residual RMSNorm its 16-byte quads kernel
// (residual_quads_ok), instead of 1024-thread blocks of 4-byte loads (H100 batch 64, session 27:
// residual_rmsnorm_kernel added 6-7 us twice a layer for fp8 and int8-sq). H100, 4-layer llama-3-8b, TPOT ms
// with 1024-thread blocks (LLMQ_ROW_SMALL_DECODE=0, the rule before session 30) / small blocks, two rounds
// alternated (bench/results/2026-12-06-nvidia-h100-session30.txt): int8-sq batch 16 0.958, 0.960 / 0.929, 0.929;
// batch 64 1.090, 1.092 / 1.059, 1.071; fp8 batch 16 0.924, 0.921 / 0.897, 0.897; batch 64 1.043, 1.035 / 1.029,
// 1.021; bf16, w8a16 and w4a16 (whose norms run in the matmul epilogues) the same within 0.5%.
bool small_decode_rows() {
  static const bool on = !env_off("LLMQ_ROW_SMALL_DECODE");
  return on;
}
bool small_row_blocks(int64_t rows, int64_t D) {
  return !row_threads_1024() && (rows > kDecodeRows || small_decode_rows()) && D <= int64_t(kRowThreadsSmall) * kRowVpt;
}
// Per-token INT8 SwiGLU rows past the small blocks' reach (llama-3-8b's 14,336) in a prefill: 512-thread blocks
// of 32 values a thread (rows up to 16,384) instead of 1024 threads of 24. int8-sq's swiglu_kernel<true, 1024>
// took 195 us a layer of a 2048-token llama-3-8b prefill against fp8's 119 (whose static-scale rows need no
// absmax and take the sliced kernel; H200, bench/results/2026-12-04-nvidia-h200-session18.txt): at 1024 threads
// an SM holds one block, which loads its row, waits at the block's barrier and stores, one row at a time.
// With 512 (58 registers) two blocks are resident an SM: 193 -> 166 us a layer, 4-layer int8-sq prefill +2.1%
// (bench/results/2026-12-04-nvidia-h200-session20.txt). LLMQ_ROW_MID=0: the 1024-thread blocks (comparisons).
constexpr int kRowThreadsMid = 512, kRowVptMid = 32;
bool mid_row_blocks(int64_t rows, int64_t D) {
  static const bool off = env_off("LLMQ_ROW_MID");
  return !off && !row_threads_1024() && rows > kDecodeRows && D > int64_t(kRowThreadsSmall) * kRowVpt &&
         D <= int64_t(kRowThreadsMid) * kRowVptMid;
}

// swiglu_quads_kernel: 2 quads (8 outputs) a thread in flight; static kinds in blocks of kQuadStep quads of a row,
// per-token INT8 rows of a prefill (more than kDecodeRows rows; decode steps keep the tuned kernels above) of up to
// kQuadsRowMaxI outputs in one kRowThreadsMid-thread block with the row in shared memory (64 KB: three blocks an
// SM). Needs paired accumulators with 16-byte aligned rows and scales. The default since session 21 (LLMQ_SWIGLU_QUADS=0:
// the kernels above). H200, 4-layer llama-3-8b 2048-token prefill, a layer's SwiGLU: bf16 103 -> 72 us, fp8
// 119 -> 80, int8-sq 166 -> 109 (bench/results/2026-12-04-nvidia-h200-session21.txt).
constexpr int kQuadsStatic = 2, kQuadsRow = 2;
constexpr int64_t kQuadStep = int64_t(kThreads) * kQuadsStatic;
constexpr int64_t kQuadsRowMaxI = 16384;
bool swiglu_quads_ok(const RawAcc& in, int64_t rows, int64_t I, const PrepOut& out, bool paired) {
  static const bool on = !env_off("LLMQ_SWIGLU_QUADS");
  if (!on || !paired || I % 2 || in.ld % 4 || !aligned16(in.acc) || (in.w_scale && !aligned16(in.w_scale))) return false;
  return out.kind != ActKind::I8Token || (rows > kDecodeRows && I <= kQuadsRowMaxI);
}

// swiglu_cluster_kernel: per-token INT8 rows of a decode step (up to kDecodeRows) on sm_90+, paired accumulators as
// swiglu_quads_ok wants them, rows of up to kClusterBlocks x kClusterThreads x kClusterQuads quads (16,384 outputs:
// llama-3-8b's 14,336, mistral-7b's; not qwen2-7b's 18,944). LLMQ_SWIGLU_CLUSTER=0: the one-block rows
// (comparisons).
constexpr int kClusterBlocks = 8, kClusterThreads = 256, kClusterQuads = 4;
bool swiglu_cluster_ok(const RawAcc& in, int64_t rows, int64_t I, const PrepOut& out, bool paired) {
  static const bool on = !env_off("LLMQ_SWIGLU_CLUSTER") && device_sm90();
  if (!on || !paired || out.kind != ActKind::I8Token || rows > kDecodeRows || I % 2) return false;
  if (I / 2 > int64_t(kClusterBlocks) * kClusterThreads * kClusterQuads) return false;
  return in.ld % 4 == 0 && aligned16(in.acc) && (!in.w_scale || aligned16(in.w_scale));
}

// residual_rmsnorm_quads_kernel for prefill rows (more than kDecodeRows; decode steps keep the tuned kernel) of up to
// kRowThreadsSmall x kResidualQuads x 4 = 4,096 values (llama-3-8b, llama-2-7b, mistral-7b, qwen2-7b). The default
// since session 21 (LLMQ_RESIDUAL_QUADS=0: residual_rmsnorm_kernel): 69 -> 27 us a call (fp8), 88 -> 45 (int8-sq)
// at 2048 llama-3-8b tokens on an H200.
constexpr int kResidualQuads = 4;
bool residual_quads_ok(const RawAcc& in, const float* x, int64_t rows, int64_t H, const float* w) {
  static const bool on = !env_off("LLMQ_RESIDUAL_QUADS");
  return on && !row_threads_1024() && (rows > kDecodeRows || small_decode_rows()) && H % 4 == 0 &&
         H <= int64_t(kRowThreadsSmall) * kResidualQuads * 4 &&
         in.ld % 4 == 0 && aligned16(in.acc) && (!in.w_scale || aligned16(in.w_scale)) && aligned16(x) && aligned16(w);
}

// Row `r` of `out` (D <= kT * kVpt) from the values the block's threads hold: v[j] is element threadIdx.x + j *
// kT (0 past D). The whole block (kT threads) calls it.
template <int kT, int kVpt = kRowVpt>
__device__ void prep_row_regs(const PrepOut& o, int64_t r, int64_t D, const float (&v)[kVpt]) {
  if (o.kind == ActKind::None) {
#pragma unroll
    for (int j = 0; j < kVpt; ++j) {
      const int64_t i = threadIdx.x + int64_t(j) * kT;
      if (i < D) prep_store(o, r, i, v[j]);
    }
    return;
  }
  float amax = 0.f;
  if (o.kind == ActKind::I8Token) {
#pragma unroll
    for (int j = 0; j < kVpt; ++j) amax = fmaxf(amax, fabsf(v[j]));
    amax = block_reduce<true>(amax);
  }
  const float s = prep_scale(o, amax);
  if (threadIdx.x == 0 && o.row_scale) o.row_scale[r] = s;
  const float inv = 1.0f / s;
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * kT;
    if (i < D) prep_store(o, r, i, v[j] * inv);
  }
}

// Row `r` of `out` (D <= kT * kVpt) from value(i), by the whole block of kT threads.
template <int kT, int kVpt = kRowVpt, typename F>
__device__ void prep_row_whole(const PrepOut& o, int64_t r, int64_t D, F value) {
  float v[kVpt];
#pragma unroll
  for (int j = 0; j < kVpt; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * kT;
    v[j] = i < D ? value(i) : 0.f;
  }
  prep_row_regs<kT, kVpt>(o, r, D, v);
}

// The row of this block and its prep: kWhole (prep_row_whole, one block of kT threads a row) or sliced
// (prep_row, any block size).
template <bool kWhole>
__device__ __forceinline__ int64_t this_row(int64_t D) { return kWhole ? int64_t(blockIdx.x) : block_row(D); }
template <bool kWhole, int kT, int kVpt = kRowVpt, typename F>
__device__ __forceinline__ void prep_this_row(const PrepOut& o, int64_t r, int64_t D, F value) {
  if constexpr (kWhole) prep_row_whole<kT, kVpt>(o, r, D, value);
  else prep_row(o, r, D, value);
}

__global__ void embed_kernel(const __nv_bfloat16* table, const int32_t* tokens, int64_t H, float* x) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const __nv_bfloat16* src = table + int64_t(tokens[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) x[t * H + i] = __bfloat162float(src[i]);
}

template <bool kWhole, int kT = kRowThreads>
__global__ void __launch_bounds__(kT) rmsnorm_kernel(const float* x, const int32_t* src_rows, int64_t H, const float* w, float eps,
                               const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t r = this_row<kWhole>(H);
  const float* xr = x + (src_rows ? int64_t(src_rows[r]) : r) * H;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
  ss = block_reduce<false>(ss);
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
  prep_this_row<kWhole, kT>(o, r, H, [&](int64_t i) { return w[i] * (xr[i] * inv); });
}

// in: gate/up values as FP32, or as raw GEMM accumulators with the scales gemm_epilogue would apply.
template <bool kWhole, int kT = kRowThreads, int kVpt = kRowVpt>
__global__ void __launch_bounds__(kT) swiglu_kernel(const RawAcc in, int64_t I, bool paired, const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = this_row<kWhole>(I);
  const int64_t gs = paired ? 2 : 1, uo = paired ? 1 : I;  // gate i at column gs * i, up i at gs * i + uo
  prep_this_row<kWhole, kT, kVpt>(o, t, I, [&](int64_t i) { return silu_mul(raw_value(in, t, gs * i), raw_value(in, t, gs * i + uo)); });
}

// The kQ quads qs + threadIdx.x + j * kT (j < kQ) below q_end of a row's paired accumulators and their weight scales,
// all loads issued before any is used (1s where there is no scale, 0s past q_end); and one quad's two SwiGLU outputs.
template <int kT, int kQ>
__device__ __forceinline__ void load_quads(const uint4* acc, const float4* ws, int64_t qs, int64_t q_end, uint4 (&a)[kQ],
                                           float4 (&w)[kQ]) {
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = qs + threadIdx.x + int64_t(j) * kT;
    a[j] = q < q_end ? __ldcs(acc + q) : make_uint4(0, 0, 0, 0);  // streamed: read once
    w[j] = ws && q < q_end ? __ldg(ws + q) : make_float4(1.f, 1.f, 1.f, 1.f);
  }
}
__device__ __forceinline__ float2 swiglu_quad(const RawAcc& in, const uint4& a, const float4& w, float xs) {
  return make_float2(silu_mul(raw_scaled(in, a.x, xs, w.x), raw_scaled(in, a.y, xs, w.y)),
                     silu_mul(raw_scaled(in, a.z, xs, w.z), raw_scaled(in, a.w, xs, w.w)));
}

// SwiGLU of paired gate/up accumulators (gate i at column 2i, up at 2i + 1) through 16-byte loads: quad q of row t
// is columns 4q .. 4q + 3 of the accumulators (and of w_scale, where there is one): outputs 2q and 2q + 1. Each
// thread loads its kQ quads of a step before it computes any, so that 2 kQ 16-byte loads are in flight. The same
// values, scales and codes as swiglu_kernel (the same operations on the same elements); swiglu_quads_ok says
// where it applies.
// Static kinds and BF16 (kRow false): blocks of kT x kQ quads, a row's blocks next to each other, each storing
// what it computed. Per-token INT8 (kRow): one block a row, which steps over it, keeping the outputs in shared
// memory (dynamic, I floats) until the row's absmax is known, then stores the codes: the row is read from memory
// once and the block holds few registers, so that several blocks share an SM.
//
// swiglu_kernel loads each accumulator and its weight scale with a 4-byte load of its own: fp8's SwiGLU of a
// 2048-token llama-3-8b prefill took 119 us a layer for ~265 MB (FP32 accumulators in, FP8 codes out), ~55% of the
// copy bandwidth, and int8-sq's 166 us in 512-thread rows (H200; bench/results/2026-12-04-nvidia-h200-session18.txt,
// ...-session20.txt).
template <int kT, int kQ, bool kRow>
__global__ void __launch_bounds__(kT) swiglu_quads_kernel(const RawAcc in, int64_t I, const PrepOut o) {
  extern __shared__ float2 row_out[];  // kRow: outputs 2q, 2q + 1 at q
  pdl_trigger();
  pdl_wait();
  const int64_t nq = I / 2;  // quads a row
  constexpr int64_t kStepQ = int64_t(kT) * kQ;
  const int64_t per_row = kRow ? 1 : (nq + kStepQ - 1) / kStepQ;
  const int64_t t = int64_t(blockIdx.x) / per_row, q0 = (int64_t(blockIdx.x) % per_row) * kStepQ;
  const int64_t q1 = kRow ? nq : q0 + kStepQ;
  const uint4* acc = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(in.acc) + t * in.ld * 4);
  const float4* ws = reinterpret_cast<const float4*>(in.w_scale);
  const float xs = in.x_scale ? in.x_scale[t] : 1.f;
  // Static kinds: the scale is known before any value (prep_row's store; BF16 stores the values as they are:
  // times 1, exactly).
  const float inv = kRow || o.kind == ActKind::None ? 1.f : 1.0f / prep_scale(o, 0.f);
  if (!kRow && o.kind != ActKind::None && threadIdx.x == 0 && q0 == 0 && o.row_scale) o.row_scale[t] = prep_scale(o, 0.f);
  float amax = 0.f;
  for (int64_t qs = q0; qs < q1; qs += kStepQ) {
    uint4 a[kQ];
    float4 w[kQ];
    load_quads<kT, kQ>(acc, ws, qs, nq, a, w);
#pragma unroll
    for (int j = 0; j < kQ; ++j) {
      const int64_t q = qs + threadIdx.x + int64_t(j) * kT;
      if (q >= nq) continue;
      const float2 v2 = swiglu_quad(in, a[j], w[j], xs);
      const float v0 = v2.x, v1 = v2.y;
      if constexpr (kRow) {
        row_out[q] = make_float2(v0, v1);
        amax = fmaxf(amax, fmaxf(fabsf(v0), fabsf(v1)));
      } else {
        prep_store(o, t, 2 * q, v0 * inv);
        prep_store(o, t, 2 * q + 1, v1 * inv);
      }
    }
  }
  if constexpr (kRow) {  // per-token INT8: the row's absmax (its barriers also publish row_out), then the codes
    amax = block_reduce<true>(amax);
    const float s = prep_scale(o, amax);
    if (threadIdx.x == 0 && o.row_scale) o.row_scale[t] = s;
    const float is = 1.0f / s;
    for (int64_t q = threadIdx.x; q < nq; q += kT) {
      const float2 v = row_out[q];
      prep_store(o, t, 2 * q, v.x * is);
      prep_store(o, t, 2 * q + 1, v.y * is);
    }
  }
}

// Per-token INT8 SwiGLU of a decode step's rows (up to kDecodeRows) on sm_90+: each row is split over a thread-block
// cluster of kC blocks, which exchange their absmax through distributed shared memory, so that the step's T rows
// run as T x kC blocks instead of T one-block rows (a 64-token llama-3-8b step: 64 blocks of 1024 threads on 132
// SMs, each loading 14,336 x 2 accumulators 4 bytes at a time; H100, swiglu_kernel<true, 1024, 24> added 11.0 us a
// layer against fp8's 5.1 for its static scale, bench/results/2026-12-05-nvidia-h100-session27.txt). Each thread
// loads its kQ quads (16 bytes of paired gate/up accumulators and their weight scales) before it computes any and
// keeps the outputs in registers until the scale is known. The same values, scales and codes as
// swiglu_quads_kernel (the same operations on the same elements; the absmax is order-free). Needs what
// swiglu_quads_ok checks for paired rows, and I / 2 <= kC x kT x kQ.
template <int kT, int kQ, int kC>
__global__ void __launch_bounds__(kT) swiglu_cluster_kernel(const RawAcc in, int64_t I, const PrepOut o) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float part;  // this block's absmax, read by the cluster's blocks
  pdl_trigger();
  pdl_wait();
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int c = int(cluster.block_rank());
  const int64_t t = int64_t(blockIdx.x) / kC;
  const int64_t nq = I / 2, per = (nq + kC - 1) / kC;  // quads a row, and a block
  const int64_t q0 = c * per, q1 = q0 + per < nq ? q0 + per : nq;
  const uint4* acc = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(in.acc) + t * in.ld * 4);
  const float4* ws = reinterpret_cast<const float4*>(in.w_scale);
  const float xs = in.x_scale ? in.x_scale[t] : 1.f;  // read before the cluster barrier: row_scale may alias it
  uint4 a[kQ];
  float4 w[kQ];
  load_quads<kT, kQ>(acc, ws, q0, q1, a, w);
  float2 v[kQ];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = q0 + threadIdx.x + int64_t(j) * kT;
    v[j] = make_float2(0.f, 0.f);
    if (q >= q1) continue;
    v[j] = swiglu_quad(in, a[j], w[j], xs);
    amax = fmaxf(amax, fmaxf(fabsf(v[j].x), fabsf(v[j].y)));
  }
  amax = block_reduce<true>(amax);
  if (threadIdx.x == 0) part = amax;
  cluster.sync();  // every block's part written (and every block's x_scale read)
  float m = 0.f;
#pragma unroll
  for (int r = 0; r < kC; ++r) m = fmaxf(m, *cluster.map_shared_rank(&part, r));
  cluster.sync();  // every block has read the others' part: none exits before
  const float s = prep_scale(o, m);
  if (c == 0 && threadIdx.x == 0 && o.row_scale) o.row_scale[t] = s;
  const float is = 1.0f / s;
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = q0 + threadIdx.x + int64_t(j) * kT;
    if (q >= q1) continue;
    prep_store(o, t, 2 * q, v[j].x * is);
    prep_store(o, t, 2 * q + 1, v[j].y * is);
  }
#else
  __trap();  // swiglu_cluster_ok keeps it off cards below sm_90
#endif
}

// One block a row: x[t] += the raw accumulators' row t (as gemm_epilogue would add it), then RMSNorm into o. Every
// thread reads in.x_scale[t] before the block's first barrier and thread 0 writes o.row_scale[t] after it, so the
// two may be the same buffer.
template <int kT>
__global__ void __launch_bounds__(kT) residual_rmsnorm_kernel(const RawAcc in, float* x, int64_t H, const float* w, float eps,
                                                              const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  float* xr = x + t * H;
  float v[kRowVpt];
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kRowVpt; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * kT;
    v[j] = 0.f;
    if (i < H) {
      v[j] = __fadd_rn(xr[i], raw_value(in, t, i));
      xr[i] = v[j];
    }
    ss = fmaf(v[j], v[j], ss);
  }
  ss = block_reduce<false>(ss);
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
#pragma unroll
  for (int j = 0; j < kRowVpt; ++j) {
    const int64_t i = threadIdx.x + int64_t(j) * kT;
    if (i < H) v[j] = w[i] * (v[j] * inv);
  }
  prep_row_regs<kT>(o, t, H, v);
}

// residual_rmsnorm_kernel through 16-byte loads and stores (rows of up to kT x kQ x 4 values, H % 4 == 0, 16-byte
// aligned rows; residual_quads_ok): thread j-th quad q = threadIdx.x + j kT holds values 4q .. 4q + 3, loaded as one
// uint4 of accumulators, one float4 of w_scale and one of x each. The same operations on every element as
// residual_rmsnorm_kernel; only the order of the sum of squares differs (a thread adds its quads' squares in
// order, then the block adds the threads'), so the norm's last bit can. residual_rmsnorm_kernel makes four 4-byte
// loads an element: at a 2048-token llama-3-8b prefill it took 70 us a call (fp8) for ~104 MB, ~1.5 TB/s (H200,
// bench/results/2026-12-04-nvidia-h200-session19.txt).
template <int kT, int kQ>
__global__ void __launch_bounds__(kT) residual_rmsnorm_quads_kernel(const RawAcc in, float* x, int64_t H, const float* w,
                                                                    float eps, const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x, nq = H / 4;
  float4* xr = reinterpret_cast<float4*>(x + t * H);
  const uint4* acc = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(in.acc) + t * in.ld * 4);
  const float4* ws = reinterpret_cast<const float4*>(in.w_scale);
  const float xs = in.x_scale ? in.x_scale[t] : 1.f;  // before the first barrier (row_scale may be the same buffer)
  uint4 a[kQ];
  float4 wv[kQ], v[kQ];
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = threadIdx.x + int64_t(j) * kT;
    const bool ok = q < nq;
    a[j] = ok ? __ldcs(acc + q) : make_uint4(0, 0, 0, 0);
    wv[j] = ws && ok ? __ldg(ws + q) : make_float4(1.f, 1.f, 1.f, 1.f);
    v[j] = ok ? xr[q] : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float ss = 0.f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = threadIdx.x + int64_t(j) * kT;
    if (q >= nq) continue;
    v[j].x = __fadd_rn(v[j].x, raw_scaled(in, a[j].x, xs, wv[j].x));
    v[j].y = __fadd_rn(v[j].y, raw_scaled(in, a[j].y, xs, wv[j].y));
    v[j].z = __fadd_rn(v[j].z, raw_scaled(in, a[j].z, xs, wv[j].z));
    v[j].w = __fadd_rn(v[j].w, raw_scaled(in, a[j].w, xs, wv[j].w));
    xr[q] = v[j];
    ss = fmaf(v[j].x, v[j].x, ss);
    ss = fmaf(v[j].y, v[j].y, ss);
    ss = fmaf(v[j].z, v[j].z, ss);
    ss = fmaf(v[j].w, v[j].w, ss);
  }
  ss = block_reduce<false>(ss);
  const float inv = 1.0f / sqrtf(ss / float(H) + eps);
  const float4* w4 = reinterpret_cast<const float4*>(w);
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = threadIdx.x + int64_t(j) * kT;
    if (q >= nq) continue;
    const float4 g = __ldg(w4 + q);
    v[j].x = g.x * (v[j].x * inv);
    v[j].y = g.y * (v[j].y * inv);
    v[j].z = g.z * (v[j].z * inv);
    v[j].w = g.w * (v[j].w * inv);
    amax = fmaxf(amax, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
  }
  float is = 1.f;  // BF16 (kind None): the values as they are (times 1, exactly)
  if (o.kind != ActKind::None) {
    if (o.kind == ActKind::I8Token) amax = block_reduce<true>(amax);
    const float sc = prep_scale(o, amax);
    if (threadIdx.x == 0 && o.row_scale) o.row_scale[t] = sc;
    is = 1.0f / sc;
  }
#pragma unroll
  for (int j = 0; j < kQ; ++j) {
    const int64_t q = threadIdx.x + int64_t(j) * kT;
    if (q >= nq) continue;
    prep_store(o, t, 4 * q, v[j].x * is);
    prep_store(o, t, 4 * q + 1, v[j].y * is);
    prep_store(o, t, 4 * q + 2, v[j].z * is);
    prep_store(o, t, 4 * q + 3, v[j].w * is);
  }
}

template <bool kWhole, int kT = kRowThreads>
__global__ void __launch_bounds__(kT) act_prep_kernel(const float* x, int64_t ld, int64_t D, const PrepOut o) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = this_row<kWhole>(D);
  const float* xr = x + t * ld;
  prep_this_row<kWhole, kT>(o, t, D, [&](int64_t i) { return xr[i]; });
}

__global__ void epilogue_kernel(const void* acc, int64_t M, int64_t N, const float* xs, const float* ws,
                                const float* bias, float* y, int64_t ldy, bool accumulate, bool acc_int32) {
  pdl_trigger();
  pdl_wait();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M * N) return;
  const int64_t m = i / N, n = i % N;
  RawAcc in;
  in.acc = acc, in.acc_int32 = acc_int32, in.ld = N, in.x_scale = xs, in.w_scale = ws;
  float v = raw_value(in, m, n);
  if (bias) v = __fadd_rn(v, bias[n]);
  float* d = y + m * ldy + n;
  *d = accumulate ? __fadd_rn(*d, v) : v;
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
  bool bad = false;  // a NaN or +Inf seen
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const float v = row[i];
    bad = bad || v != v || v == INFINITY;
    if (beats(v, int(i), bv, bi)) bv = v, bi = int(i);
  }
  warp_argmax(bv, bi);
  __shared__ float sv[32];
  __shared__ int si[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) sv[warp] = bv, si[warp] = bi;
  const int any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    for (int w = 1; w < int(blockDim.x / 32); ++w)
      if (beats(sv[w], si[w], bv, bi)) bv = sv[w], bi = si[w];
    part_v[r * kArgmaxParts + s] = any_bad ? NAN : bv;  // NaN marks the slice
    part_i[r * kArgmaxParts + s] = bi;
  }
  // The last slice of the row to finish reduces all of them.
  if (!last_block(counters + r, kArgmaxParts) || warp > 0) return;
  bv = __ldcg(part_v + r * kArgmaxParts + lane);  // kArgmaxParts == 32: one slice a lane
  bi = __ldcg(part_i + r * kArgmaxParts + lane);
  const bool row_bad = __any_sync(0xffffffffu, bv != bv);
  warp_argmax(bv, bi);
  if (lane == 0) ids[r] = row_bad ? -1 : bi == 0x7fffffff ? 0 : bi;
}

unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

// A row kernel over `rows` rows of D values: one block a row where `whole` (kRowThreadsSmall threads where
// small_row_blocks says so, else kRowThreads), else the sliced launch. The three instances of its template.
template <typename... P, typename... A>
void launch_rows(const char* name, bool whole, int64_t rows, int64_t D, void (*whole_small)(P...), void (*whole_big)(P...),
                 void (*sliced)(P...), cudaStream_t s, A&&... args) {
  if (whole && small_row_blocks(rows, D))
    return launch(name, whole_small, unsigned(rows), kRowThreadsSmall, 0, s, std::forward<A>(args)...);
  if (whole) return launch(name, whole_big, unsigned(rows), kRowThreads, 0, s, std::forward<A>(args)...);
  launch(name, sliced, row_slice_blocks(rows, D), kThreads, 0, s, std::forward<A>(args)...);
}

}  // namespace

void embed_gather(const void* table, const int32_t* tokens, int64_t T, int64_t H, float* x, cudaStream_t s) {
  if (T == 0) return;
  launch("embed_kernel", embed_kernel, unsigned(T), kThreads, 0, s, static_cast<const __nv_bfloat16*>(table), tokens, H, x);
}

void rmsnorm_prep(const float* x, const int32_t* src_rows, int64_t R, int64_t H, const float* w, float eps,
                  const PrepOut& out, cudaStream_t s) {
  if (R == 0) return;
  launch_rows("rmsnorm_kernel", whole_rows(out, H), R, H, rmsnorm_kernel<true, kRowThreadsSmall>, rmsnorm_kernel<true>,
              rmsnorm_kernel<false>, s, x, src_rows, H, w, eps, out);
}

void swiglu_prep(const RawAcc& in, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s, bool paired) {
  if (T == 0) return;
  if (swiglu_cluster_ok(in, T, I, out, paired))
    return launch_clustered("swiglu_cluster_kernel", swiglu_cluster_kernel<kClusterThreads, kClusterQuads, kClusterBlocks>,
                            unsigned(T * kClusterBlocks), kClusterThreads, 0, s, dim3(unsigned(kClusterBlocks)), in, I, out);
  if (swiglu_quads_ok(in, T, I, out, paired)) {
    if (out.kind != ActKind::I8Token)
      return launch("swiglu_quads_kernel", swiglu_quads_kernel<kThreads, kQuadsStatic, false>,
                    unsigned(T * ((I / 2 + kQuadStep - 1) / kQuadStep)), kThreads, 0, s, in, I, out);
    static const bool smem_ok = [] {  // past the 48 KB a launch gets without asking
      const bool ok = cudaFuncSetAttribute(swiglu_quads_kernel<kRowThreadsMid, kQuadsRow, true>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(kQuadsRowMaxI * 4)) == cudaSuccess;
      if (!ok) (void)cudaGetLastError();  // refused: the kernels below serve
      return ok;
    }();
    if (smem_ok)
      return launch("swiglu_quads_kernel", swiglu_quads_kernel<kRowThreadsMid, kQuadsRow, true>, unsigned(T),
                    kRowThreadsMid, size_t(I) * 4, s, in, I, out);
  }
  if (whole_rows(out, I) && mid_row_blocks(T, I))
    return launch("swiglu_kernel", swiglu_kernel<true, kRowThreadsMid, kRowVptMid>, unsigned(T), kRowThreadsMid, 0, s, in, I,
                  paired, out);
  launch_rows("swiglu_kernel", whole_rows(out, I), T, I, swiglu_kernel<true, kRowThreadsSmall>, swiglu_kernel<true>,
              swiglu_kernel<false>, s, in, I, paired, out);
}

void swiglu_prep(const float* gu, int64_t ld_gu, int64_t T, int64_t I, const PrepOut& out, cudaStream_t s, bool paired) {
  RawAcc in;
  in.acc = gu;
  in.ld = ld_gu;
  swiglu_prep(in, T, I, out, s, paired);
}

bool residual_rmsnorm_supported(int64_t H) { return H <= kRowMaxD; }

void residual_rmsnorm_prep(const RawAcc& in, float* x, int64_t T, int64_t H, const float* w, float eps,
                           const PrepOut& out, cudaStream_t s) {
  if (T == 0) return;
  if (!residual_rmsnorm_supported(H)) throw Error("residual_rmsnorm_prep: rows of more than " + std::to_string(kRowMaxD));
  if (residual_quads_ok(in, x, T, H, w))
    return launch("residual_rmsnorm_quads_kernel", residual_rmsnorm_quads_kernel<kRowThreadsSmall, kResidualQuads>, unsigned(T),
                  kRowThreadsSmall, 0, s, in, x, H, w, eps, out);
  if (small_row_blocks(T, H))
    return launch("residual_rmsnorm_kernel", residual_rmsnorm_kernel<kRowThreadsSmall>, unsigned(T), kRowThreadsSmall, 0, s, in,
                  x, H, w, eps, out);
  launch("residual_rmsnorm_kernel", residual_rmsnorm_kernel<kRowThreads>, unsigned(T), kRowThreads, 0, s, in, x, H, w, eps, out);
}

void act_prep(const float* x, int64_t ldx, int64_t T, int64_t D, const PrepOut& out, cudaStream_t s) {
  if (T == 0) return;
  launch_rows("act_prep_kernel", whole_rows(out, D), T, D, act_prep_kernel<true, kRowThreadsSmall>, act_prep_kernel<true>,
              act_prep_kernel<false>, s, x, ldx, D, out);
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
