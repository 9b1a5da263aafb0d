#include "backend/cuda/wgemm.cuh"

#include <cooperative_groups.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/launch.cuh"
#include "backend/cuda/matmul_store.cuh"
#include "quant/pack/int4_mma.hpp"

namespace llmq::cuda {

namespace {

constexpr int kMaxWarps = 8;  // K-splitting warps per CTA
constexpr int kDepth = 4;     // units loaded ahead per warp

// The kinds of the table in wgemm.cuh.
enum Kind : int { kBf16 = 0, kI8W = 1, kI4 = 2, kI8I8 = 3, kFp8Fp8 = 4 };

// Weights are read once: do not keep them in L1 (the activations live there).
__device__ __forceinline__ uint4 ld_weights(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint2 b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}
// v, opaque to the compiler: kept in a register where it is used instead of being recomputed there.
__device__ __forceinline__ uint32_t pinned(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}
// The same product without an accumulator: c = a * b.
__device__ __forceinline__ void mma_bf16_z(float (&c)[4], const uint32_t (&a)[4], uint2 b) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y), "f"(0.f));
}

__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint2 b) {
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}

// FP8 products summed from zero per instruction and added in FP32 outside: Hopper's FP8 tensor cores keep
// fewer bits than FP32 while accumulating, so long sums stay out of them.
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const uint32_t (&a)[4], uint2 b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
  c[0] += d0, c[1] += d1, c[2] += d2, c[3] += d3;
#else
  __trap();  // wgemm_supports() keeps FP8 off cards below sm_89
#endif
}

// Bytes i and i+1 of w (signed INT8 codes) as a bf16 pair, exactly: 2^23 + (code + 128) is built as float bits,
// the offset subtracted, and the (exact) bf16 halves taken.
__device__ __forceinline__ uint32_t i8x2_to_bf16x2(uint32_t w_biased, int i) {
  const float a = __uint_as_float(__byte_perm(w_biased, 0x4Bu, 0x4550u + i)) - 8388736.f;
  const float b = __uint_as_float(__byte_perm(w_biased, 0x4Bu, 0x4550u + i + 1)) - 8388736.f;
  return __byte_perm(__float_as_uint(a), __float_as_uint(b), 0x7632u);
}

// bf16 pair (lo - z, hi - z) where lo/hi are 128 + code and z2 holds 128 + zero twice: exact small integers.
__device__ __forceinline__ uint32_t bf16x2_sub(uint32_t a, uint32_t b) {
  __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&a), y = *reinterpret_cast<__nv_bfloat162*>(&b);
  __nv_bfloat162 d = __hsub2(x, y);
  return *reinterpret_cast<uint32_t*>(&d);
}

// One accumulator value of warp 0 (row `row` of the output, token `tok`, lane group g = lane / 4), scaled and
// biased: stored to y, or, with swiglu_out, paired with row + 1 (lane + 4) into one SwiGLU activation. Every
// lane of the warp calls it (the pairing shuffles); `valid` says whether the token exists.
// Returns store_y's share of the distributed RMSNorm's sum of squares (0 where nothing was stored).
__device__ __forceinline__ float store_out(const GemvArgs& a, int64_t row, int64_t tok, bool valid, int g, float v) {
  if (a.swiglu_out) {
    const float up = __shfl_down_sync(0xffffffffu, v, 4);
    if (valid && (g & 1) == 0 && row < a.N) store_swiglu(a, row / 2, tok, v, up);
  } else if (valid && row < a.N) {
    return store_y(a, row, tok, v);
  }
  return 0.f;
}

// The distributed RMSNorm's sums of squares of warp 0's stores (sq[n][j]: token n * 8 + 2t + j of this lane,
// over its rows g and g + 8) added over the 8 lane groups, then to rms_sumsq by lanes 0-3. All lanes call it.
// With sq_out (shared memory, a float per token from tok0) lanes 0-3 store the warp's sums there instead.
template <int NT>
__device__ __forceinline__ void add_sumsq_tile(const GemvArgs& a, float (&sq)[NT][2], int64_t tok0, int M, int lane,
                                               float* sq_out = nullptr) {
  if (!a.rms_sumsq) return;
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      float s = sq[n][j];
      s += __shfl_xor_sync(0xffffffffu, s, 4);
      s += __shfl_xor_sync(0xffffffffu, s, 8);
      s += __shfl_xor_sync(0xffffffffu, s, 16);
      const int tok = n * 8 + 2 * (lane % 4) + j;
      if (lane < 4 && tok < M) {
        if (sq_out) sq_out[tok] = s;
        else add_sumsq(a, tok0 + tok, s);
      }
    }
}

// Warp 0's epilogue for one 16-row block (rows rb * 16 ..) and NT n-tiles of tokens from tok0 (M of them
// valid): value(n, e, rc, tc) gives accumulator e of n-tile n scaled (c0, c1 = row g, tokens 2t, 2t + 1; c2, c3 =
// row g + 8), from the row and token clamped into range; the bias is added, the value stored (store_out) and
// the distributed RMSNorm's sums of squares gathered. Rows and tokens past the ends are computed from the
// clamped indices (the SwiGLU pairing shuffles across all lanes) and never stored. All lanes call it.
// LF: the instance can also run the loads-first epilogue (GemvArgs::tiled_epi bit 2); compiled only where asked for,
// since the second copy of the epilogue in every kernel took wgemm.cu's compile from ~155 to ~230 s an architecture.
template <int NT, bool LF = false, typename Value>
__device__ __forceinline__ void store_tile(const GemvArgs& a, int64_t rb, int64_t tok0, int M, int lane, Value value,
                                           float* sq_out = nullptr) {
  const int g = lane >> 2, t = lane & 3;
  float sq[NT][2] = {};
  bool stored = false;
  if constexpr (LF) if (a.tiled_epi & 4) {
    stored = true;
    // Loads first (GemvArgs::tiled_epi bit 2): every value (with what value() reads: the RMSNorm consumer's sums of
    // squares, INT8 scales), the bias, the residual y and the RMSNorm producer's weights, before any store. Loads
    // placed after a store through these pointers wait for it (the compiler cannot tell the addresses apart): one
    // round trip a value. Up to 2 n-tiles at once, one at a time past that (all of 4 or 8 n-tiles at once took
    // the 32- and 64-token instances from 80 to 104 and from 128 to 176 registers).
    constexpr int NC = NT <= 2 ? NT : 1;  // n-tiles a round
    float rw[2] = {0.f, 0.f};
    if (!a.swiglu_out && a.rms_out)
#pragma unroll
      for (int h = 0; h < 2; ++h) rw[h] = a.rms_w[min(rb * 16 + g + 8 * h, a.N - 1)];
#pragma unroll
    for (int n0 = 0; n0 < NT; n0 += NC) {
      float v[NC][4], yo[NC][4];
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = n0 + c;
          const int64_t row = rb * 16 + g + 8 * (e >> 1);
          const int tok = n * 8 + 2 * t + (e & 1);
          const int64_t rc = row < a.N ? row : a.N - 1;
          v[c][e] = value(n, e, rc, tok0 + (tok < M ? tok : M - 1));
          if (a.bias) v[c][e] += a.bias[rc];
          yo[c][e] = !a.swiglu_out && a.accumulate && tok < M && row < a.N ? a.y[(tok0 + tok) * a.ldy + row] : 0.f;
        }
#pragma unroll
      for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = n0 + c;
          const int64_t row = rb * 16 + g + 8 * (e >> 1);
          const int tok = n * 8 + 2 * t + (e & 1);
          if (a.swiglu_out) store_out(a, row, tok0 + tok, tok < M, g, v[c][e]);
          else if (tok < M && row < a.N) sq[n][e & 1] += store_y_loaded(a, row, tok0 + tok, v[c][e], yo[c][e], rw[e >> 1]);
        }
    }
  }
  if (!stored) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = rb * 16 + g + 8 * (e >> 1);
        const int tok = n * 8 + 2 * t + (e & 1);
        const int64_t rc = row < a.N ? row : a.N - 1;
        float v = value(n, e, rc, tok0 + (tok < M ? tok : M - 1));
        if (a.bias) v += a.bias[rc];
        sq[n][e & 1] += store_out(a, row, tok0 + tok, tok < M, g, v);
      }
  }
  add_sumsq_tile<NT>(a, sq, tok0, M, lane, sq_out);
}

// The K-splitting warps' partial sums added into warp 0's accumulators through shared memory (red, a
// __shared__ [kMaxWarps - 1][NT * 4][32] of the kernel). Returns true in warp 0, which then runs the epilogue,
// false in the others. Every thread of the CTA must call it.
template <typename Acc, int NT>
__device__ __forceinline__ bool sum_warps(Acc (&acc)[NT][4], int warp, int nw, int lane, Acc (*red)[NT * 4][32]) {
  if (nw == 1) return true;
  if (warp > 0) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp - 1][n * 4 + i][lane] = acc[n][i];
  }
  __syncthreads();
  if (warp > 0) return false;
  for (int w = 1; w < nw; ++w)
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[n][i] += red[w - 1][n * 4 + i][lane];
  return true;
}

// The K-split partial sums of set r without a CTA-wide barrier (GemvArgs::i4_rotate). Sets take the kRotBufs
// buffers of red[] in turn, and buffer b always goes to warp b % nw, which sums it and runs the set's epilogue: the
// summing rotates over up to kRotBufs warps. The other warps store their sums into the set's buffer (a float4 of a
// lane's four accumulators a fragment, one 16-byte store each) and go on at once: full[b] counts their arrivals
// (every thread arrives, releasing its own stores) and the summing warp waits for it; empty[b] completes when the
// summing warp has read the buffer, and the writers of the buffer's next set wait for that. Since a buffer's
// summing warp never changes, neither barrier can be more than one phase from the one a warp waits for, so the
// parity of the use (k) names it. With __syncthreads (sum_warps) every warp waits at every set for warp 0, which
// also sums and stores (8 units of work a warp between barriers at llama-3-8b's o and down). one_col (a single
// token): only the accumulators of column 0 (c0, c2) are summed; the others are never stored. Returns true in
// the summing warp.
constexpr int kRotBufs = 4;
template <int NV>
__device__ __forceinline__ bool sum_rotating(float (&acc)[NV][4], int warp, int nw, int lane, int r, float4 (*red)[NV][32],
                                             uint64_t* full, uint64_t* empty, bool one_col) {
  if (nw == 1) return true;
  const int b = r % kRotBufs, owner = b % nw, k = r / kRotBufs;  // k: this buffer's use
  if (warp != owner) {
    if (k > 0) mbar_wait(&empty[b], uint32_t(k - 1) & 1u);
    const int slot = (warp - owner - 1 + nw) % nw;
#pragma unroll
    for (int n = 0; n < NV; ++n) red[slot][n][lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
    mbar_arrive(&full[b]);
    return false;
  }
  mbar_wait(&full[b], uint32_t(k) & 1u);
  for (int s = 0; s < nw - 1; ++s)
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      const float4 v = red[s][n][lane];
      acc[n][0] += v.x, acc[n][2] += v.z;
      if (!one_col) acc[n][1] += v.y, acc[n][3] += v.w;
    }
  __syncwarp();
  mbar_arrive(&empty[b]);
  return true;
}

template <int KIND>
struct KindTraits {
  static constexpr int kXBytes = KIND >= kI8I8 ? 1 : 2;
  using Acc = typename std::conditional<KIND == kI8I8, int, float>::type;
};

template <int KIND, int NT, int G>
__global__ void __launch_bounds__(kMaxWarps * 32) wgemm_kernel(const GemvArgs a, const int64_t units) {
  pdl_trigger();
  pdl_wait();
  using Tr = KindTraits<KIND>;
  using Acc = typename Tr::Acc;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t rb = blockIdx.x;
  // Rows past N re-read row N-1 (never stored).
  const int64_t r0 = min(rb * 16 + g, a.N - 1), r1 = min(rb * 16 + g + 8, a.N - 1);
  const int64_t per = (units + nw - 1) / nw;
  const int64_t u0 = int64_t(warp) * per, u1 = min(units, u0 + per);

  Acc acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = Acc(0);

  // This lane's token in each n-tile (B operand column g); tokens past T read zeros.
  const char* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int tok = n * 8 + g;
    xok[n] = tok < a.M;
    xrow[n] = static_cast<const char*>(a.x) + int64_t(xok[n] ? tok : 0) * a.ldx * Tr::kXBytes;
  }
  auto load_b = [&](int n, int64_t k) -> uint2 {
    return xok[n] ? __ldg(reinterpret_cast<const uint2*>(xrow[n] + k * Tr::kXBytes)) : make_uint2(0u, 0u);
  };

  // INT4: per-group partial sums, scaled when the group changes.
  float cg[NT][4];
  int64_t cur_group = -1;
  float s0 = 0.f, s1 = 0.f;
  uint32_t z0 = 0, z1 = 0;
  const int64_t ngroups = KIND == kI4 ? a.K / G : 0;
  auto flush = [&]() {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] += s0 * cg[n][0], acc[n][1] += s0 * cg[n][1];
      acc[n][2] += s1 * cg[n][2], acc[n][3] += s1 * cg[n][3];
#pragma unroll
      for (int i = 0; i < 4; ++i) cg[n][i] = 0.f;
    }
  };
  if constexpr (KIND == kI4) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) cg[n][i] = 0.f;
  }

  const char* w0 = static_cast<const char*>(a.w);
  const char* w1 = w0;
  int64_t wstride = 0;  // bytes between consecutive units of this lane
  if constexpr (KIND == kI4) {
    w0 += ((rb * units) * 32 + lane) * 16;
    wstride = 32 * 16;
  } else {
    const int64_t row_bytes = a.K * (KIND == kBf16 ? 2 : 1);
    w0 += r0 * row_bytes + t * 16;
    w1 += r1 * row_bytes + t * 16;
    wstride = 64;
  }

  auto process = [&](int64_t u, const uint4& wa, const uint4& wb) {
    const uint32_t ra[4] = {wa.x, wa.y, wa.z, wa.w}, rbw[4] = {wb.x, wb.y, wb.z, wb.w};
    if constexpr (KIND == kBf16 || KIND == kI8I8 || KIND == kFp8Fp8) {
      // Two steps per unit; step j takes words 2j, 2j+1 of each row (k 8t+4j.. for BF16, 16t+8j.. for 8-bit).
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint32_t A[4] = {ra[2 * j], rbw[2 * j], ra[2 * j + 1], rbw[2 * j + 1]};
        const int64_t k = KIND == kBf16 ? u * 32 + 8 * t + 4 * j : u * 64 + 16 * t + 8 * j;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (n * 8 >= a.M) break;
          const uint2 b = load_b(n, k);
          if constexpr (KIND == kBf16) mma_bf16(acc[n], A, b);
          else if constexpr (KIND == kI8I8) mma_s8(acc[n], A, b);
          else mma_e4m3(acc[n], A, b);
        }
      }
    } else if constexpr (KIND == kI8W) {
      // Four steps; step j takes word j of each row (k 16t + 4j .. +3).
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t pa = ra[j] ^ 0x80808080u, pb = rbw[j] ^ 0x80808080u;
        const uint32_t A[4] = {i8x2_to_bf16x2(pa, 0), i8x2_to_bf16x2(pb, 0), i8x2_to_bf16x2(pa, 2), i8x2_to_bf16x2(pb, 2)};
        const int64_t k = u * 64 + 16 * t + 4 * j;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (n * 8 >= a.M) break;
          mma_bf16(acc[n], A, load_b(n, k));
        }
      }
    } else {  // kI4: four steps of 16 k; word j = step j (quant/pack/int4_mma.hpp)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t k0 = u * 64 + 16 * j;
        if (k0 >= a.K) break;  // padding of the last unit
        const int64_t grp = k0 / G;
        if (grp != cur_group) {
          if (cur_group >= 0) flush();
          cur_group = grp;
          s0 = __ldg(a.w_scale + r0 * ngroups + grp);
          s1 = __ldg(a.w_scale + r1 * ngroups + grp);
          const uint32_t za = 0x4300u | __ldg(a.w_zero + r0 * ngroups + grp);
          const uint32_t zb = 0x4300u | __ldg(a.w_zero + r1 * ngroups + grp);
          z0 = za | (za << 16);
          z1 = zb | (zb << 16);
        }
        const uint32_t w = ra[j];
        uint32_t A[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) A[r] = bf16x2_sub(((w >> (4 * r)) & 0x000F000Fu) | 0x43004300u, (r & 1) ? z1 : z0);
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          if (n * 8 >= a.M) break;
          mma_bf16(cg[n], A, load_b(n, k0 + 4 * t));
        }
      }
    }
  };

  int64_t u = u0;
  for (; u + kDepth <= u1; u += kDepth) {
    uint4 wa[kDepth], wb[kDepth];
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      wa[d] = ld_weights(w0 + (u + d) * wstride);
      if constexpr (KIND != kI4) wb[d] = ld_weights(w1 + (u + d) * wstride);
      else wb[d] = wa[d];
    }
#pragma unroll
    for (int d = 0; d < kDepth; ++d) process(u + d, wa[d], wb[d]);
  }
  for (; u < u1; ++u) {
    const uint4 wa = ld_weights(w0 + u * wstride);
    const uint4 wb = KIND != kI4 ? ld_weights(w1 + u * wstride) : wa;
    process(u, wa, wb);
  }
  if constexpr (KIND == kI4) {
    if (cur_group >= 0) flush();
  }

  // Epilogue (warp 0).
  __shared__ Acc red[kMaxWarps - 1][NT * 4][32];
  if (sum_warps<Acc, NT>(acc, warp, nw, lane, red))
    store_tile<NT>(a, rb, 0, a.M, lane, [&](int n, int e, int64_t rc, int64_t tc) {
      float v = float(acc[n][e]);
      if constexpr (KIND >= kI8I8) v *= a.x_scale[tc];
      else v *= rms_factor(a, tc);
      if constexpr (KIND == kI8W || KIND >= kI8I8) v *= a.w_scale[rc];
      return v;
    });
  norm_tail(a);  // every thread of the CTA, once
}

// (a & b) | c as one LOP3: written in C++ the compiler makes it two instructions when b and c are constants.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// ND consecutive units (from unit u, a multiple of the units per group) of RB row blocks of one lane of
// wgemm_i4_kernel, whose weight words wv[i] (row block i) the caller has loaded; sp[i]/zp[i]: the scales and zero
// points of row block i's rows g and g + 8 (sp[i][0], sp[i][1]), advanced to unit u's group, so that every group
// of the batch is an immediate offset from them. Each step's eight codes become four bf16 pairs (code - zero,
// exact: one shift, one LOP3 and one HSUB2 each) for one mma per n-tile, and every group's share of the sum is
// scaled once into acc[i * NT + n]. The activations (the B operand) are loaded once per step and n-tile and
// serve all RB row blocks.
//
// Measured and not kept (H200, this kernel at llama-3-8b shapes): pairs of 128 + code straight from the LOP3
// with the zero point taken out once per group, sum (128 + c) x - (128 + z) sum x, sum x from a second mma on
// an all-ones A operand (one mma per step instead of four HSUB2): the same time at T = 1, 5-13% slower at T = 16
// (the 2-tile instance spilled), and 10x the rounding error (cancellation in FP32). The same fold with sum x of
// every group computed once per launch (an all-ones mma over the warp's K range into shared memory), so that no
// mma is added per step: slower again (session 15, H200, T = 1 with records: qkv 10.6 against 9.5 us, down 17.4
// against 14.9; its results were also wrong in that build, which was not chased).
//
// SZ: the scales and zero points come from pack::int4_sz_pack records in shared memory instead (sp[i][0] is then
// the lane's float2 of row block i's first record, as bytes, and zp[i][0] its uint16 of zero points; sp[i][1] and
// zp[i][1] are unused); records are kInt4SzRecord bytes apart, one per group.
template <int ND, int NT, int G, int RB, bool SZ>
__device__ __forceinline__ void i4_units(int u, const uint4 (&wv)[RB][ND], const float* const (&sp)[RB][2],
                                         const uint8_t* const (&zp)[RB][2], const uint2* const (&xp)[NT], int M,
                                         float (&acc)[RB * NT][4]) {
  constexpr int GPU = G == 32 ? 2 : 1;  // groups per unit
  float sc[RB][2][ND][GPU];
  uint32_t zb[RB][2][ND][GPU];  // bf16 pair (128 + zero) twice
#pragma unroll
  for (int i = 0; i < RB; ++i)
#pragma unroll
    for (int d = 0; d < ND; ++d)
#pragma unroll
      for (int q = 0; q < GPU; ++q) {
        const int off = (d * 64 + q * 32) / G;
        if constexpr (SZ) {
          const float2 s2 = *reinterpret_cast<const float2*>(reinterpret_cast<const uint8_t*>(sp[i][0]) + off * pack::kInt4SzRecord);
          const uint32_t z2 = *reinterpret_cast<const uint16_t*>(zp[i][0] + off * pack::kInt4SzRecord);
          sc[i][0][d][q] = s2.x, sc[i][1][d][q] = s2.y;
          zb[i][0][d][q] = __byte_perm(z2, 0x43u, 0x4040u);  // 0x43 z 0x43 z: bf16 128 + z twice
          zb[i][1][d][q] = __byte_perm(z2, 0x43u, 0x4141u);
        } else {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            sc[i][h][d][q] = __ldg(sp[i][h] + off);
            zb[i][h][d][q] = 0x43004300u | uint32_t(__ldg(zp[i][h] + off)) * 0x10001u;
          }
        }
      }
  const uint2* xb[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) xb[n] = xp[n] + u * 16;  // uint2 index of k = 64 u
#pragma unroll
  for (int d = 0; d < ND; ++d) {
    float cg[RB][NT][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = j / (4 / GPU);
      uint32_t A[RB][4];
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const uint32_t w = j == 0 ? wv[i][d].x : j == 1 ? wv[i][d].y : j == 2 ? wv[i][d].z : wv[i][d].w;
        A[i][0] = bf16x2_sub(and_or(w, 0x000F000Fu, 0x43004300u), zb[i][0][d][q]);
        A[i][1] = bf16x2_sub(and_or(w >> 4, 0x000F000Fu, 0x43004300u), zb[i][1][d][q]);
        A[i][2] = bf16x2_sub(and_or(w >> 8, 0x000F000Fu, 0x43004300u), zb[i][0][d][q]);
        A[i][3] = bf16x2_sub(and_or(w >> 12, 0x000F000Fu, 0x43004300u), zb[i][1][d][q]);
      }
      if (j % (4 / GPU) == 0) {
#pragma unroll
        for (int i = 0; i < RB; ++i)
#pragma unroll
          for (int n = 0; n < NT; ++n) cg[i][n][0] = cg[i][n][1] = cg[i][n][2] = cg[i][n][3] = 0.f;
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        if (n > 0 && n * 8 >= M) break;
        const uint2 bx = __ldg(xb[n] + d * 16 + 4 * j);
#pragma unroll
        for (int i = 0; i < RB; ++i) mma_bf16(cg[i][n], A[i], bx);
      }
      if ((j + 1) % (4 / GPU) == 0) {
#pragma unroll
        for (int i = 0; i < RB; ++i)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)  // c2, c3: row g + 8
              acc[i * NT + n][e] = fmaf(sc[i][e >> 1][d][q], cg[i][n][e], acc[i * NT + n][e]);
      }
    }
  }
}

// Units per batch of wgemm_i4_kernel (over all its row blocks); its shared-memory ring holds kI4Stages batches
// per warp (three in flight while one is summed).
constexpr int kI4Batch = 4;
constexpr int kI4Stages = 4;
constexpr int kI4WBytes = kI4Batch * 32 * 16;  // a batch's weights, per warp: 2 KB
// A batch's scale/zero-point records per warp (SZ): kI4Batch units of 64 k span 256 / G groups of every row
// block it covers, RB row blocks of kI4Batch / RB units each.
__host__ __device__ constexpr int i4_sz_batch_bytes(int G) { return 256 / G * int(pack::kInt4SzRecord); }
__host__ __device__ constexpr int i4_ring_bytes_per_warp(int G, bool sz) {
  return kI4Stages * (kI4WBytes + (sz ? i4_sz_batch_bytes(G) : 0));
}

// INT4 with K a multiple of 64 (every unit full): the same product as wgemm_kernel<kI4>, with the per-value
// work cut to what the tensor cores need and the weights streamed through shared memory.
//
// Instructions: the general kernel ran ~275 instructions per 16-byte load (H200, llama-3-8b gate_up at T = 1:
// 64-bit index arithmetic, per-step bounds checks and predicated activation loads, group-change tests). Here
// each lane keeps 32-bit offsets, builds each bf16 pair with one LOP3, reads activations at immediate offsets
// from the clamped token's row (columns past T are computed but never stored, so no predicate), takes scales
// and zero points at immediate offsets (every warp's unit range starts on a group), and applies them once per
// unit's share of a group.
//
// Memory: every warp copies its units with cp.async into its own ring of kI4Stages batches in shared memory
// (each lane copies and later reads back only its own 16 bytes, so no barrier is needed), kI4Stages - 1 batches
// ahead of the one it sums. A CTA takes row-block sets blockIdx.y, + gridDim.y, ... (RB consecutive row blocks
// of 16 rows each; launch_i4 sizes the grid to what is resident at once), and its warps' rings run on from one
// set into the next, so that the loads of the next set are in flight while this one is summed and reduced. With
// one row block per CTA, an SM's CTAs all waited for their data and then all computed, leaving the memory idle
// in between, whatever the ring's depth (H200, llama-3-8b gate_up at T = 1: 37.1 / 36.9 / 36.7 us with 1 / 4 / 6
// stages); looping over row blocks made it 26.0 us (57% of the copy bandwidth). With RB = 2 each activation
// fragment a lane loads serves two row blocks' mma (half the activation loads per weight byte, which at 16
// tokens are 8 bytes a lane per mma pair from 8 token rows). The first batches are requested before
// pdl_wait(): the weights do not depend on the previous kernel.
//
// SZ (up to 8 tokens, GemvArgs::i4_sz set): the scales and zero points come through the ring too, as the batch's
// pack::int4_sz_pack records (16 bytes a lane, lanes 0..RB * GB * 5 - 1; every lane then reads its rows' entries,
// so the warp syncs after the wait and before a slot is refilled). Loaded where they are used (__ldg after the
// ring wait), the zero-point byte was the kernel's largest single stall (ncu, session 13: 10.5% of the cycles on
// the IMAD that waits for it). H200, llama-3-8b shapes, us with / without (llmq-kbench, i4-ldg row): T = 1 qkv
// 9.5 / 9.9, o 6.7 / 7.3, gate_up 27.1 / 27.5, down 14.9 / 15.1; T = 8 gate_up 34.4 / 38.5, down 19.4 / 20.7;
// T = 16 slower (down 36.6 / 32.5), so not there.
//
// Measured and not kept (session 40, H100): a one-token kernel without the ring, GEMV-shaped (a warp owns a row
// block and 1/ks of K, loads 4 or 8 units and their records straight into registers with the next batch in flight,
// one K-split sum through shared memory at the end). llmq-kbench us, this kernel / that one at its best K split:
// qkv 9.59 / 9.96, o 7.40 / 6.95, gate_up 27.90 / 29.94, down 16.66 / 16.24; 4-layer llama-3-8b batch 1 TPOT
// 0.6515 / 0.680-0.691 ms. Its gate_up read 65-71% of the copy bandwidth against the INT8 GEMV's 98% on the same
// rows: the INT4 path issues four 8-byte activation loads per 16 bytes of weights (one a mma), the GEMV one 16-byte
// load (bench/results/2026-12-07-nvidia-h100-session40.txt).
// What those loads and the dequantization cost, bounded (session 41, H100, cc29b50, reverted): this kernel with
// the activation loads replaced by a constant, the dequantization by the raw words, or both (wrong sums, timing
// only). llmq-kbench T = 1 us, default / no loads / no dequantization / neither: qkv 9.65 / 9.34 / 9.6 / 7.5, o 7.33
// / 6.2-6.6 / 6.9 / 6.0, gate_up 27.0 / 24.9 / 25.8 / 24.9, down 16.3 / 13.3 / 15.3 / 12.9; 4-layer TPOT 0.6372 ms
// default, 0.6245 with no loads (-2%). A k order with two 16-byte activation loads a unit would win part of the
// -2%; even with neither cost, qkv and o stay at 50-60% of the copy bandwidth (bench/results/2026-12-07-session41.txt).
// The ring filled by TMA bulk copies instead (lane 0 of a warp copies the batch's 2 KB of weights and its records
// with two cp.async.bulk completing on the slot's mbarrier; cd8f8a8, reverted): correct, no faster. H100, T = 1 us,
// cp.async / bulk, two rounds: qkv 9.45 / 9.43-9.60, o 7.17-7.23 / 7.09, gate_up 26.7-26.9 / 27.5-27.8, down
// 16.2-16.3 / 16.3; 4-layer TPOT 0.6377-0.6398 / 0.6403-0.6450 ms (bench/results/2026-12-07-nvidia-h100-session42.txt).
template <int NT, int G, int RB, bool SZ, bool ROT = false>
__global__ void __launch_bounds__(kMaxWarps * 32, 2) wgemm_i4_kernel(const GemvArgs a, const int units, const int per) {
  constexpr int D = kI4Batch / RB, S = kI4Stages;  // units per batch and row block; ring stages
  static_assert(D * RB == kI4Batch, "a batch is kI4Batch units");
  constexpr int GB = D * 64 / G;                   // SZ: groups per batch and row block (records)
  constexpr int SZB = SZ ? i4_sz_batch_bytes(G) : 0;
  static_assert(!SZ || RB * GB * int(pack::kInt4SzRecord) == SZB, "a batch's records");
  constexpr int CH = SZ ? RB * GB * 5 : 0;          // SZ: 16-byte record copies a batch
  constexpr int CPL = (CH + 31) / 32;               // ... a lane at most
  // [warps][S][D][RB][32 lanes] weights, then (SZ) [warps][S][RB][GB] records
  extern __shared__ uint4 i4_ring[];
  // The K-split partial sums, by set parity (ROT: kRotBufs buffers, see sum_rotating), and ROT's barriers (full[],
  // then empty[]).
  __shared__ __align__(16) float red[ROT ? kRotBufs : 2][kMaxWarps - 1][RB * NT * 4][32];
  __shared__ uint64_t red_bar[ROT ? 2 * kRotBufs : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  // blockIdx.x: group of 8 * NT tokens (more than one only past 16 tokens, see launch_i4).
  const int tok0 = int(blockIdx.x) * 8 * NT;
  const int N = int(a.N);
  const int rbs = (N + 15) / 16, sets = (rbs + RB - 1) / RB;
  const int nr = (sets - int(blockIdx.y) + int(gridDim.y) - 1) / int(gridDim.y);  // row-block sets of this CTA
  // This warp's units of every row block: [u0, u1), u0 a multiple of the units per group (per is).
  const int u0 = min(units, warp * per), u1 = min(units, u0 + per);
  const int nu = u1 - u0, nb = (nu + D - 1) / D;  // units and batches per row block
  uint4* ring = i4_ring + warp * (S * D * RB * 32) + lane;
  const uint8_t* sz_ring = reinterpret_cast<const uint8_t*>(i4_ring + nw * (S * D * RB * 32)) + warp * (S * SZB);
  const uint32_t sz_s = static_cast<uint32_t>(__cvta_generic_to_shared(sz_ring));
  const uint8_t* szg = static_cast<const uint8_t*>(a.i4_sz);
  const int ng = int(a.K / G);
  // The stream of batches this warp asks for: set (blockIdx.y + ir * gridDim.y), batch ib of it. A set's row
  // blocks past the last are clamped to it (loaded and summed, never stored). The lane's sources of the next
  // batch advance by a batch at a time and are recomputed at each new set (start_set).
  int ir = 0, ib = 0, slot_in = 0;
  const uint4* w4 = static_cast<const uint4*>(a.w);
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint4* wsrc[RB];
  const uint8_t* zsrc[CPL > 0 ? CPL : 1];
  int zq[CPL > 0 ? CPL : 1];  // the group (in the batch) of the lane's record copy; >= GB: no copy
  auto start_set = [&]() {
    const int set = int(blockIdx.y) + ir * int(gridDim.y);
#pragma unroll
    for (int i = 0; i < RB; ++i) wsrc[i] = w4 + (int64_t(min(set * RB + i, rbs - 1)) * units + u0) * 32 + lane;
#pragma unroll
    for (int k = 0; k < CPL; ++k) {
      const int c = min(lane + 32 * k, CH - 1), i = c / (GB * 5), rem = c - i * (GB * 5), qq = rem / 5;
      zq[k] = lane + 32 * k < CH ? qq : GB;
      zsrc[k] = szg + (int64_t(min(set * RB + i, rbs - 1)) * ng + u0 * 64 / G + qq) * pack::kInt4SzRecord + (rem - qq * 5) * 16;
    }
  };
  start_set();
  auto issue = [&]() {  // the next batch into its ring slot; always one commit group
    if (ir < nr) {
      const uint32_t dst = ring_s + uint32_t(slot_in) * (D * RB * 32 * 16);
      const bool full = ib * D + D <= nu;
#pragma unroll
      for (int i = 0; i < RB; ++i) {
#pragma unroll
        for (int d = 0; d < D; ++d)
          if (full || ib * D + d < nu) cp_async16(dst + (d * RB + i) * 32 * 16, wsrc[i] + d * 32);
        wsrc[i] += D * 32;
      }
      if constexpr (SZ) {  // the records of the batch's groups, 16 bytes a lane (the lanes of a row share them)
        const int gcount = full ? GB : ((nu - ib * D) * 64 + G - 1) / G;  // groups of a partial batch
#pragma unroll
        for (int k = 0; k < CPL; ++k) {
          if (zq[k] < gcount) cp_async16(sz_s + uint32_t(slot_in * SZB + (lane + 32 * k) * 16), zsrc[k]);
          zsrc[k] += GB * pack::kInt4SzRecord;
        }
      }
      if (++ib == nb) {
        ib = 0;
        if (++ir < nr) start_set();
      }
      slot_in = slot_in + 1 == S ? 0 : slot_in + 1;
    }
    cp_async_commit();
  };
#pragma unroll
  for (int B = 0; B < S - 1; ++B) issue();
  if (ROT && nw > 1) {  // sum_rotating's barriers (one warp: no sums to hand over)
    if (threadIdx.x < 2 * kRotBufs) mbar_init(&red_bar[threadIdx.x], threadIdx.x < kRotBufs ? uint32_t(nw - 1) * 32 : 32u);
    __syncthreads();
  }
  pdl_trigger();
  pdl_wait();
  const int M = min(a.M - tok0, 8 * NT);
  // Activations: this lane's token of each n-tile (B column g), from k = 4t; uint2 = 4 bf16.
  const uint2* xp[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int tok = tok0 + min(n * 8 + g, M - 1);
    xp[n] = reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(a.x) + int64_t(tok) * a.ldx + 4 * t);
  }

  int slot_out = 0;
  for (int r = 0; r < nr; ++r) {
    const int set = int(blockIdx.y) + r * int(gridDim.y);
    int r0[RB], r1[RB];
#pragma unroll
    for (int i = 0; i < RB; ++i) {
      const int rb = min(set * RB + i, rbs - 1);
      r0[i] = min(rb * 16 + g, N - 1), r1[i] = min(rb * 16 + g + 8, N - 1);
    }
    float acc[RB * NT][4];
#pragma unroll
    for (int n = 0; n < RB * NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
    for (int bb = 0; bb < nb; ++bb) {
      if constexpr (SZ) __syncwarp();  // every lane has read the records of the slot issue() refills
      issue();
      cp_async_wait<S - 1>();  // the batch S - 1 before the one just asked for has landed: this one
      if constexpr (SZ) __syncwarp();  // ... for every lane (the records were copied by other lanes)
      const uint4* slot = ring + slot_out * (D * RB * 32);
      const uint8_t* rec = sz_ring + slot_out * SZB;
      slot_out = slot_out + 1 == S ? 0 : slot_out + 1;
      const int u = u0 + bb * D;
      const int goff = u * 64 / G;  // u is a multiple of the units per group
      // Where group goff's scales and zero points are (SZ: this lane's entries of the batch's first records).
      const float* sp[RB][2];
      const uint8_t* zp[RB][2];
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        if constexpr (SZ) {
          const uint8_t* r = rec + i * GB * pack::kInt4SzRecord;
          sp[i][0] = sp[i][1] = reinterpret_cast<const float*>(r + 8 * g);
          zp[i][0] = zp[i][1] = r + 64 + 2 * g;
        } else {
          sp[i][0] = a.w_scale + int64_t(r0[i]) * ng + goff, sp[i][1] = a.w_scale + int64_t(r1[i]) * ng + goff;
          zp[i][0] = a.w_zero + int64_t(r0[i]) * ng + goff, zp[i][1] = a.w_zero + int64_t(r1[i]) * ng + goff;
        }
      }
      if (bb * D + D <= nu) {
        uint4 wv[RB][D];
#pragma unroll
        for (int d = 0; d < D; ++d)
#pragma unroll
          for (int i = 0; i < RB; ++i) wv[i][d] = slot[(d * RB + i) * 32];
        i4_units<D, NT, G, RB, SZ>(u, wv, sp, zp, xp, M, acc);
      } else {
        for (int d = 0; bb * D + d < nu; ++d) {  // the last, partial batch: one unit at a time
          const int ud = u + d, go = ud * 64 / G - goff;
          const int step = SZ ? int(pack::kInt4SzRecord) : 1;  // bytes (SZ records) or elements a group on
          const float* spd[RB][2];
          const uint8_t* zpd[RB][2];
          uint4 wv[RB][1];
#pragma unroll
          for (int i = 0; i < RB; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              spd[i][h] = SZ ? reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(sp[i][h]) + go * step)
                             : sp[i][h] + go;
              zpd[i][h] = zp[i][h] + go * step;
            }
            wv[i][0] = slot[(d * RB + i) * 32];
          }
          i4_units<1, NT, G, RB, SZ>(ud, wv, spd, zpd, xp, M, acc);
        }
      }
    }
    // The K-splitting warps' partial sums into one warp (red[] alternates by set: a warp may start writing the
    // next set's sums while the summing warp still reads these): warp 0 after a CTA barrier, or (ROT) a rotating
    // warp, the others not waiting (sum_rotating).
    bool mine;
    if constexpr (ROT)
      mine = sum_rotating<RB * NT>(acc, warp, nw, lane, r, reinterpret_cast<float4 (*)[RB * NT][32]>(red[r % kRotBufs]),
                                   red_bar, red_bar + kRotBufs, M == 1);
    else
      mine = sum_warps<float, RB * NT>(acc, warp, nw, lane, red[r & 1]);
    if (mine) {
#pragma unroll
      for (int i = 0; i < RB; ++i) {
        const int rb = set * RB + i;
        if (rb >= rbs) break;  // the clamped copy of the last row block (warp-uniform)
        store_tile<NT>(a, rb, tok0, M, lane,
                       [&](int n, int e, int64_t, int64_t tc) { return acc[i * NT + n][e] * rms_factor(a, tc); });
      }
    }
  }
  norm_tail(a);  // every thread of the CTA, once
}

template <int NT, int G, int RB, bool SZ, bool ROT = false>
void launch_i4_nt(const GemvArgs& a, unsigned token_groups, cudaStream_t s) {
  constexpr int kRingBytes = i4_ring_bytes_per_warp(G, SZ);
  constexpr int kMaxBytes = kMaxWarps * kRingBytes;
  // CTAs of this instance resident on the whole card, by warps per CTA (index nw - 1).
  static const std::array<int, kMaxWarps> resident_by_nw = [] {
    LLMQ_CUDA_CHECK(cudaFuncSetAttribute(wgemm_i4_kernel<NT, G, RB, SZ, ROT>, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxBytes));
    int dev = 0, sms = 0;
    LLMQ_CUDA_CHECK(cudaGetDevice(&dev));
    LLMQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    std::array<int, kMaxWarps> r{};
    for (int w = 1; w <= kMaxWarps; ++w) {
      int per_sm = 0;
      LLMQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wgemm_i4_kernel<NT, G, RB, SZ, ROT>, w * 32, size_t(w) * kRingBytes));
      r[size_t(w - 1)] = std::max(1, sms * std::max(1, per_sm));
    }
    // LLMQ_WGEMM_I4_ONE_CTA=1 (an experiment, not measured yet): one CTA an SM, with the shared-memory carve-out
    // cut to what one CTA needs so that the rest of the SM's 256 KB is L1. The suspicion it tests: past 8
    // tokens the activations a CTA's warps read (16 tokens x K x 2 bytes, 128 KB at K = 4096) no longer fit
    // the L1 that two CTAs' rings and reduction buffers leave (~70 KB), and every activation fragment comes
    // from the L2 (T = 9 already costs 1.6x T = 1 for the same weight bytes). Against it: down_proj (K = 14336,
    // activations that never fit) slows down by the same factor as gate_up (K = 4096), so it may well not be.
    const char* e = std::getenv("LLMQ_WGEMM_I4_ONE_CTA");
    if (NT > 1 && e && *e == '1') {
      cudaFuncAttributes fa{};
      LLMQ_CUDA_CHECK(cudaFuncGetAttributes(&fa, wgemm_i4_kernel<NT, G, RB, SZ, ROT>));
      const double need = double(kMaxBytes + fa.sharedSizeBytes) / double(228 * 1024);
      const int pct = std::min(100, int(need * 100.0) + 1);
      LLMQ_CUDA_CHECK(cudaFuncSetAttribute(wgemm_i4_kernel<NT, G, RB, SZ, ROT>, cudaFuncAttributePreferredSharedMemoryCarveout, pct));
      r.fill(sms);
    }
    return r;
  }();
  // K-splitting warps a CTA: up to 8 (two units each at least). Up to 8 tokens, 4 where the matrix has more
  // row-block sets than 8-warp CTAs fit on the card at once: each warp then takes twice the batches between
  // K-split reductions and twice the CTAs share an SM. H200, llama-3-8b shapes, us at 8 / 4 warps (llmq-kbench,
  // bench/results/2026-12-04-nvidia-h200-session15.txt): T = 1 qkv 9.66 / 8.84, gate_up 27.29 / 25.05, but o
  // 6.81 / 7.87 and down 14.94 / 18.54 (256 sets: one wave of 8-warp CTAs, half the warps with 4); T = 8 the
  // same way. LLMQ_WGEMM_I4_WARPS=N (1-8) caps the warps instead (comparisons).
  static const int env_warps = [] {
    const char* e = std::getenv("LLMQ_WGEMM_I4_WARPS");
    const int v = e && *e ? std::atoi(e) : 0;
    return v >= 1 && v <= kMaxWarps ? v : 0;
  }();
  const int units = int(a.K / 64);
  const int sets = int(((a.N + 15) / 16 + RB - 1) / RB);
  int nw = int(std::clamp<int64_t>(units / 2, 1, kMaxWarps));
  if (env_warps) nw = std::min(nw, env_warps);
  else if (NT == 1 && nw == kMaxWarps && int64_t(sets) * token_groups > resident_by_nw[kMaxWarps - 1]) nw = 4;
  const int resident = resident_by_nw[size_t(nw - 1)];
  constexpr int upg = G > 64 ? G / 64 : 1;  // units per group: every warp's range starts on a group
  const int per = (((units + nw - 1) / nw) + upg - 1) / upg * upg;
  const int rows = std::min(sets, std::max(1, resident / int(token_groups)));
  launch("wgemm_i4_kernel", wgemm_i4_kernel<NT, G, RB, SZ, ROT>, dim3(token_groups, unsigned(rows)), dim3(unsigned(nw * 32)),
         size_t(nw) * kRingBytes, s, a, units, per);
}

// LLMQ_WGEMM_I4_RB=1|2: row blocks per set of wgemm_i4_kernel wherever GemvArgs::i4_row_blocks leaves it open
// (comparisons).
int env_i4_rb() {
  static const int rb = [] {
    const char* e = std::getenv("LLMQ_WGEMM_I4_RB");
    const int v = e && *e ? std::atoi(e) : 0;
    return v == 1 || v == 2 ? v : 0;
  }();
  return rb;
}

template <int G>
void launch_i4(const GemvArgs& a, cudaStream_t s) {
  // Past 16 tokens, CTAs of 16 tokens each (the token groups of a row block run side by side and share its
  // weights through the L2): the 32- and 64-token instances need ~160 registers, one CTA per SM, and measured
  // 11x the 16-token time for 4x the tokens (H200, llama-3-8b gate_up: 654 vs 59 us).
  // Row blocks per set: two past 16 tokens, and from 9 to 16 where the matrix has at least 1.4 row blocks per
  // resident CTA (two a SM). H200, llama-3-8b shapes, us at 1 / 2 row blocks (llmq-kbench,
  // bench/results/2026-12-02-nvidia-h200-session8.txt): T = 16 qkv 19.4 / 15.6, gate_up 61.7 / 49.0, but o 12.5 /
  // 14.1 and down 32.4 / 34.7 (256 row blocks: half the CTAs idle with two); T = 32 and 64 two everywhere (gate_up
  // 116 / 80, 232 / 155); T = 1 one (gate_up 28.4 / 29.5, down 15.5 / 22.0). From 6 to 8 tokens the same test (the
  // one-token kernel with records): H200, us at 1 / 2 row blocks (bench/results/2026-12-04-nvidia-h200-session16.txt)
  // T = 8 qkv 11.16 / 10.42, gate_up 33.40 / 29.13; T = 6 qkv 10.06 / 10.03, gate_up 30.20 / 29.10; but T = 5 gate_up
  // 27.91 / 28.83, T = 4 27.33 / 28.53; o and down one at every T (T = 8 8.08 / 9.47, 19.04 / 22.62).
  static const int sms = [] {
    int dev = 0, n = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
    return n;
  }();
  const int64_t rbs = (a.N + 15) / 16;
  int rb = a.M > 16 || (a.M >= 6 && rbs * 10 >= int64_t(sms) * 2 * 14) ? 2 : 1;
  if (env_i4_rb()) rb = env_i4_rb();
  if (a.i4_row_blocks) rb = a.i4_row_blocks;
  // The scale/zero-point records up to 8 tokens (at 9-16 they measured slower: down 36.6 against 32.5 us);
  // LLMQ_WGEMM_I4_NO_SZ=1 loads w_scale / w_zero where they are needed instead (comparisons).
  static const bool no_sz = env_flag("LLMQ_WGEMM_I4_NO_SZ");
  const bool sz = a.i4_sz && !no_sz && a.M <= 8;
  // The K-split sums without a CTA barrier a set (sum_rotating), with the records only: opt-in with
  // LLMQ_WGEMM_I4_ROTATE=1 (or GemvArgs::i4_rotate). Measured slower where it was meant to help: H200, llmq-kbench
  // us default / rotating, T = 1: qkv 8.82 / 9.48, o 6.68 / 7.14, gate_up 24.86 / 26.66, down 14.88 / 15.79; T = 8
  // slower for every matrix too (gate_up 29.35 / 34.90); 4-layer llama-3-8b w4a16 ms a step, batch 1 0.531, 0.528 /
  // 0.561, 0.559, but batch 8 0.864, 0.862 / 0.828, 0.829 (unexplained; bench/results/2026-12-04-nvidia-h200-session17.txt).
  static const bool rotate_env = env_flag("LLMQ_WGEMM_I4_ROTATE");
  const bool rot = sz && (a.i4_rotate > 0 || (a.i4_rotate == 0 && rotate_env));
  const unsigned tg = a.M <= 8 ? 1u : unsigned((a.M + 15) / 16);
  if (a.M <= 8) {
    if (rot) return rb == 2 ? launch_i4_nt<1, G, 2, true, true>(a, tg, s) : launch_i4_nt<1, G, 1, true, true>(a, tg, s);
    if (sz) return rb == 2 ? launch_i4_nt<1, G, 2, true>(a, tg, s) : launch_i4_nt<1, G, 1, true>(a, tg, s);
    return rb == 2 ? launch_i4_nt<1, G, 2, false>(a, tg, s) : launch_i4_nt<1, G, 1, false>(a, tg, s);
  }
  return rb == 2 ? launch_i4_nt<2, G, 2, false>(a, tg, s) : launch_i4_nt<2, G, 1, false>(a, tg, s);
}

// ---- Weight-only (INT4 tiles, INT8 rows) at 9..64 tokens: the tiled kernel (GemvArgs::tiled) ----
//
// wgemm_i4_kernel splits K over a CTA's warps, so each warp reads the activations of its K range once for every
// 16-32 rows it computes: at 16 tokens that is 2 bytes of activations per byte of INT4 weights, from the L2 (128
// KB at K = 4096 does not fit the L1 beside two CTAs' rings). H200, llama-3-8b gate_up at T = 16: 30% of the copy
// bandwidth; ncu: DRAM 27%, L1 hit rate 34%, L1TEX scoreboard the largest stall. The general kernel (INT8
// weight-only) is worse past 16 tokens: one CTA per row block, activations from the L2 for every 16 rows.
// Here a CTA's 8 warps own 8 consecutive row blocks (128 rows) and walk one K range together: each of kTStages
// ring stages brings kTUnits units (128 k) of every warp's weights (INT4: with their scales and zero-point words)
// and all tokens' activations into shared memory with cp.async; every warp reads the activation fragments from
// there, so they cross the L2 once per 128 rows. Matrices with few row tiles split K over gridDim.y CTAs: their
// partial sums go to GemvArgs::tiled_ws in fragment order, and the last CTA of each tile to finish (counted in
// GemvArgs::tiled_counters; without them, a second kernel, wgemm_tiled_splitk_epilogue) adds them in split order
// (the same sum every run) and runs the epilogue (H100, session 44, same machine and call: full llama-3-8b w4a16
// batch 16 3,458 -> 3,756 tok/s against the second kernel; session 34 had the same idea ~3% slower on another H100;
// bench/results/2026-12-07-nvidia-h100-session44.txt); the split count fills one wave of the device. INT4: groups
// of 64 or 128 with K / group a multiple of 4 (a zero-point word holds four groups of a row). No fused RMSNorm
// (norm_counter). Where it wins is in tiled_default below.
constexpr int kTWarps = 8, kTStages = 4, kTUnits = 2;  // row blocks (warps) a CTA, ring stages (default), units a stage
constexpr int kTPad = 16;  // bf16 padding per activation row: a 288-byte stride, 32 mod 128 (no bank conflicts)

// One ring stage: activations [NT * 8][kTRow] bf16; weights
// [warp][unit][lane] 16 B (INT4) or [warp][unit][row half][lane] 16 B (INT8 rows); INT4 only: scales
// [warp][group][16 rows] float and zero-point words [warp][group][16 rows] uint32.
constexpr int kTRow = kTUnits * 64 + kTPad;
constexpr int kTGroups = kTUnits;  // INT4 groups a stage holds at most (groups of 64)
// The kinds the tiled kernel has instances for: the weight-only ones. (W8A8 codes through it, with m16n8k32
// steps on the 8-bit codes, lost to cuBLASLt at 16-64 tokens: 1.1-4.2x its time for FP8, decode TPOT 2.09x at
// batch 64; H200, bench/results/2026-12-05-nvidia-h200-session23.txt. Removed.)
constexpr bool tiled_kind(int kind) { return kind == kI4 || kind == kI8W; }
constexpr int tiled_act_bytes(int nt) { return nt * 8 * kTRow * 2; }
constexpr int tiled_w_bytes(int kind) { return kTWarps * kTUnits * 32 * 16 * (kind == kI4 ? 1 : 2); }
constexpr int tiled_sc_bytes(int kind) { return kind == kI4 ? kTWarps * kTGroups * 16 * 4 : 0; }
// SZ instead: the stage's pack::int4_sz_pack records, kTGroups a warp.
constexpr int tiled_rec_bytes() { return kTWarps * kTGroups * int(pack::kInt4SzRecord); }
// The whole ring's shared memory for a kind at nt n-tiles and the given ring stages (sz: INT4 with records).
constexpr int tiled_bytes(int kind, int nt, int stages = kTStages, bool sz = false) {
  return stages * (tiled_act_bytes(nt) + tiled_w_bytes(kind) + (sz ? tiled_rec_bytes() : 2 * tiled_sc_bytes(kind)));
}
template <int KIND, int NT, int S, bool SZ = false>
struct TiledLayout {
  static constexpr int kRow = kTRow;  // bf16 elements
  static constexpr int kAct = tiled_act_bytes(NT);
  static constexpr int kW = tiled_w_bytes(KIND);
  static constexpr int kSc = tiled_sc_bytes(KIND);  // (without SZ: the scales, then as many bytes of zero-point words)
  static constexpr int kStage = kAct + kW + (SZ ? tiled_rec_bytes() : 2 * kSc);
  static constexpr int kBytes = tiled_bytes(KIND, NT, S, SZ);
  static_assert(kAct % 16 == 0 && kW % 16 == 0 && kSc % 16 == 0 && tiled_rec_bytes() % 16 == 0, "16-byte aligned regions");
};

// n-tiles of 8 tokens the tiled kernel's instance for M tokens has.
constexpr int tiled_nt(int M) { return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 ? 4 : 8; }

// The tiled kernel's output value of sum acc (row rc, token tc) before the bias: the sum times the distributed
// RMSNorm's factor, and INT8 rows' scale.
template <int KIND>
__device__ __forceinline__ float tiled_value(const GemvArgs& a, float acc, int64_t rc, int64_t tc) {
  float v = acc * rms_factor(a, tc);
  if constexpr (KIND != kI4) v *= a.w_scale[rc];
  return v;
}

// The split-K sums of row block rb (splits partial tiles per row block in GemvArgs::tiled_ws, fragment order),
// added in split order into acc; one warp. Each step loads one split's NT * 4 values a lane, all before
// it adds any (and up to four splits a step, unrolled), so that the loads of a lane are in flight together: with
// the split loop innermost, each value's loads went one after another (H100, w4a16 batch 16: down_proj's 8 splits
// of 32 row-block CTAs took 12.8 us a layer; bench/results/2026-12-05-nvidia-h100-session27.txt). __ldcg: the
// L2, where other CTAs' stores are (the L1 is not coherent).
template <int NT>
__device__ __forceinline__ void tiled_splitk_sum(const GemvArgs& a, int rb, int rbs, int lane, int splits, float (&acc)[NT][4]) {
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  const float* ws = a.tiled_ws + int64_t(rb) * (NT * 4 * 32) + lane;
  const int64_t split_stride = int64_t(rbs) * (NT * 4 * 32);
#pragma unroll 4
  for (int sp = 0; sp < splits; ++sp) {
    float part[NT * 4];
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) part[i] = __ldcg(ws + sp * split_stride + i * 32);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][e] += part[n * 4 + e];
  }
}

// The operands row block rb's epilogue reads besides the sums, prefetched into L1 (GemvArgs::tiled_epi bit 0): the
// residual rows it adds to (accumulate: 64 bytes a token), the RMSNorm producer's weights, the consumer's sums of
// squares, INT8 rows' scales and the bias. No kernel before the epilogue in this launch writes them, and only this
// warp writes these rows of y (after reading them), so the lines in L1 are current. One warp.
template <int KIND>
__device__ __forceinline__ void tiled_prefetch_epilogue(const GemvArgs& a, int rb, int M, int lane) {
  auto pf = [](const void* p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); };
  if (a.accumulate)
    for (int tok = lane; tok < M; tok += 32) pf(a.y + int64_t(tok) * a.ldy + int64_t(rb) * 16);
  if (lane == 0 && a.rms_out) pf(a.rms_w + int64_t(rb) * 16);
  if (lane == 1 && a.x_sumsq) pf(a.x_sumsq);
  if constexpr (KIND != kI4)
    if (lane == 2) pf(a.w_scale + int64_t(rb) * 16);
  if (lane == 3 && a.bias) pf(a.bias + int64_t(rb) * 16);
}

// The K-split partial sums of a tile added through distributed shared memory (wgemm_tiled_kernel's CL): the
// gridDim.y CTAs of the tile are one cluster (dims 1 x gridDim.y x 1, sm_90+). Each CTA puts its warps' sums into
// its ring (float4 a lane and n-tile, [warp][n][lane]); after a cluster barrier, row block slot w (warp w's rows
// in every CTA) is added up and stored by CTA w % C. A CTA with nb slots gives each kTWarps / nb of its warps
// (spw), warp j adding sources j / nb, j / nb + spw, ... of slot r + C (j % nb) into its own float4s, which the
// slot's first warp then adds in warp order: a fixed order, the same sum every run (not the workspace path's
// split order, so not its bits). A second barrier keeps every CTA until the others have read its sums. Every
// thread of every CTA calls it, after its last ring read.
template <int KIND, int NT>
__device__ __forceinline__ void tiled_cluster_tail(const GemvArgs& a, const float (&acc)[NT][4], uint4* ring, int rbs, int M,
                                                   int warp, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int C = int(cluster.num_blocks()), r = int(cluster.block_rank());
  float4* part = reinterpret_cast<float4*>(ring);  // [kTWarps][NT][32]: this CTA's partial sums
  float4* wsum = part + kTWarps * NT * 32;          // [kTWarps][NT][32]: each warp's share of a slot's sources
  __syncthreads();                                 // every warp is done with the ring
#pragma unroll
  for (int n = 0; n < NT; ++n) part[(warp * NT + n) * 32 + lane] = make_float4(acc[n][0], acc[n][1], acc[n][2], acc[n][3]);
  cluster.sync();
  const int nb = r < kTWarps ? (kTWarps - 1 - r) / C + 1 : 0;  // slots r, r + C, ... below kTWarps
  if (nb > 0) {
    const int spw = kTWarps / nb, q = warp % nb, sw = warp / nb;  // warps a slot; this warp's slot and share
    const int w = r + C * q;
    if (sw < spw) {
      float4 sum[NT];
#pragma unroll
      for (int n = 0; n < NT; ++n) sum[n] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int src = sw; src < C; src += spw) {
        const float4* rp = cluster.map_shared_rank(part, src) + w * NT * 32 + lane;
        float4 v[NT];
#pragma unroll
        for (int n = 0; n < NT; ++n) v[n] = rp[n * 32];
#pragma unroll
        for (int n = 0; n < NT; ++n) sum[n].x += v[n].x, sum[n].y += v[n].y, sum[n].z += v[n].z, sum[n].w += v[n].w;
      }
#pragma unroll
      for (int n = 0; n < NT; ++n) wsum[(warp * NT + n) * 32 + lane] = sum[n];
    }
    __syncthreads();
    if (sw == 0) {  // warp q: slot w's shares (warps q, q + nb, ...) in warp order, then its epilogue
      float t[NT][4] = {};
      for (int k = 0; k < spw; ++k)
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          const float4 v = wsum[((q + k * nb) * NT + n) * 32 + lane];
          t[n][0] += v.x, t[n][1] += v.y, t[n][2] += v.z, t[n][3] += v.w;
        }
      const int rb = int(blockIdx.x) * kTWarps + w;
      if (rb < rbs)
        store_tile<NT, true>(a, rb, 0, M, lane, [&](int n, int e, int64_t rc, int64_t tc) { return tiled_value<KIND>(a, t[n][e], rc, tc); });
    }
  }
  cluster.sync();  // no CTA leaves while another may still read its partial sums
#else
  __trap();  // the launcher takes it on sm_90+ only
#endif
}

// cp.async of 4 or 8 bytes (through L1: the sizes below 16 have no .cg form).
__device__ __forceinline__ void cp_async4(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async8(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem), "l"(gmem) : "memory");
}

// KIND kI4 (G = 64 or 128) or kI8W (G unused); S ring stages. ILP (INT4 only): each unit of a stage sums its
// mma into its own registers (cg[cu]), added at the group's end, so that a stage's two units are two independent
// chains of mma instead of one chain through both (LLMQ_WGEMM_TILED_ILP=1, see launch_tiled_nt). It needs ~73
// registers (the default instance 58); with 3 stages it is held to 64 (4 CTAs an SM, as the default instance gets
// there; ptxas spills one register of the G = 128 instance), with 4 the shared memory allows 3 CTAs anyway.
//
// LEAN (the default for INT4; LLMQ_WGEMM_TILED_LEAN=0 for the previous loop, comparisons): the bookkeeping cut down,
// since the kernel is bound by instruction issue at 16 tokens (H200, ncu, gate_up: issue active 64% of the cycles,
// "not selected" the largest stall; the stage loop ran ~274 instructions a warp for 16 mma, ~120 of them the
// dequantization, fragment loads and mma; bench/results/2026-12-06-nvidia-h100-session38.txt). The copies keep
// running sources and ring slots instead of recomputing 64-bit addresses and stage % S at every stage, and a
// group's first mma starts from zero instead of the group sums being zeroed with moves after its scaling (the
// group boundaries are compile-time: a stage starts on a group and a split ends on one). Measured (H200, session 39,
// bench/results/2026-12-06-session39.txt): INT4 kbench gate_up at 16 tokens 37.35 -> 35.85 us, at 64 75.4 -> 70.5;
// 4-layer llama-3-8b w4a16 TPOT batch 16 0.7461 / 0.7444 -> 0.7372 / 0.7373 ms, batch 64 1.408 / 1.397 -> 1.373 /
// 1.365. INT8 rows gained nothing (64 tokens: qkv 39.0 -> 36.1 us but o 30.5 -> 35.6, a layer's four 214.3 -> 215.1)
// and keep the previous loop.
//
// SZ (INT4 at 9-16 tokens with GemvArgs::i4_sz, the default there; LEAN only): a stage's scales and zero points come
// as the warp's pack::int4_sz_pack records, 80 contiguous bytes a group copied by lanes 0-4 (0-9 for groups of 64),
// instead of 16 scales and 16 zero-point words from 32 different cache lines a group; no unit bounds test (INT4
// stages are whole). Stage loop 231 -> 197 SASS instructions, 61 -> 64 registers (4 CTAs an SM still). H100, same
// call (bench/results/2026-12-07-nvidia-h100-session45.txt): kbench at 16 tokens qkv 14.45 -> 13.56 us, o 12.58 ->
// 11.94, gate_up 44.48 -> 43.02, down 25.86 -> 21.61; full llama-3-8b w4a16 batch 16 3,732 -> 4,036 tok/s. Not at
// 32-64 tokens: those SZ instances took 105-184 registers against 80-128.
//
// CL (the SZ instance, LLMQ_WGEMM_TILED_CLUSTER=n): the gridDim.y K-splits of a tile form one thread-block cluster
// and add their partial sums through distributed shared memory (tiled_cluster_tail) instead of the workspace, the
// counter and the last CTA.
template <int KIND, int NT, int G, int S, bool ILP = false, bool LEAN = false, bool SZ = false, bool CL = false>
__global__ void __launch_bounds__(kTWarps * 32, (ILP && S == 3) || SZ ? 4 : 0)
    wgemm_tiled_kernel(const GemvArgs a, const int units, const int ups) {
  using Lay = TiledLayout<KIND, NT, S, SZ>;
  constexpr bool I4 = KIND == kI4;
  constexpr int UPG = I4 ? G / 64 : 1;  // units per group
  constexpr int GPS = kTUnits / UPG;    // groups per stage (1 or 2)
  static_assert(!ILP || I4, "ILP: INT4 only");
  static_assert(!LEAN || I4, "LEAN: INT4 only");
  static_assert(!SZ || (LEAN && !ILP), "SZ: the LEAN loop only");
  static_assert(!CL || (SZ && S == 3 && 2 * kTWarps * NT * 32 * 16 <= Lay::kBytes), "CL: the records instance (3 stages); its sums fit the ring");
  static_assert(kTUnits % UPG == 0, "a stage starts on a group (ups is a multiple of kTUnits)");
  constexpr int NC = ILP ? kTUnits : 1;  // INT4 group sums: one per unit of a stage (ILP) or one
  extern __shared__ uint4 t_ring[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int N = int(a.N), rbs = (N + 15) / 16, M = a.M, ng = I4 ? int(a.K / G) : 1;
  const int rb_raw = int(blockIdx.x) * kTWarps + warp;
  const int rb = min(rb_raw, rbs - 1);  // warps past the last row block recompute it (never stored)
  const int u_begin = int(blockIdx.y) * ups, u_end = min(units, u_begin + ups);
  const int nst = (u_end - u_begin + kTUnits - 1) / kTUnits;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(t_ring));
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(a.x);
  pdl_trigger();
  // A stage's copies in two halves: the weights (with INT4 scales and zero points), which no kernel writes and
  // so may be fetched before pdl_wait(), and the activations, which the previous kernel writes.
  // Each thread's copies come from a plan made here once: index arithmetic for every copy of every stage made the
  // kernel issue-bound (ncu at 16 tokens, H200, gate_up: 193 warp instructions for each 1,024 INT4 weights, ~100
  // of them the dequantization and MMA; bench/results/2026-12-04-nvidia-h200-session21.txt). The plan took 0.67-
  // 0.99x the time at 1-64 tokens and decode TPOT -7.6% (w8a16, batch 16) and -9.6% (batch 64) (H200,
  // bench/results/2026-12-05-nvidia-h200-session23.txt).
  //
  // Activations: a thread copies one column c of the stage (INT4: 16-byte pieces in k order; INT8 rows: 8-byte
  // chunks transposed within each unit, the 4 values at k = 16 i + 4 j to position 16 j + 4 i, so that a lane
  // (g, t) reads step j's B fragment (k = 16 t + 4 j, the INT8 rows' order) from position 16 j + 4 t: the INT4
  // reads' pattern, free of bank conflicts), kCols columns a token row, in token rows x_r0, x_r0 + kRowsPer, ...
  // The sources are element offsets from the stage's first column of x (32-bit: tokens x ldx stays far below
  // 2^31), the ring offsets one base plus whole rows. Stage stg adds stg x kTUnits units to every source, and a
  // copy of unit cu of the stage is made where cu < u_end - u0. Rows past M copy row M - 1 (computed, never
  // stored).
  constexpr int kCols = I4 ? kTUnits * 8 : kTUnits * 16;
  constexpr int kRowsPer = kTWarps * 32 / kCols;  // token rows one pass of the block's threads covers
  static_assert(kTWarps * 32 % kCols == 0, "whole rows a pass");
  constexpr int kXPer = (NT * 8 + kRowsPer - 1) / kRowsPer;
  const int x_c = int(threadIdx.x) % kCols, x_r0 = int(threadIdx.x) / kCols;
  int x_src[kXPer] = {};  // elements from x + (u_begin + stg x kTUnits) x 64
  uint32_t x_dst = 0;     // bytes from the stage's start, row x_r0
  int x_cu = kTUnits;     // the unit of the stage the column belongs to (kTUnits: this thread copies nothing)
  // Weights: INT4, this lane's 16-byte record of unit u_begin (uint4s from w); INT8 rows, bytes from w of rows
  // g and g + 8 at k = 64 u_begin + 16 t (the general kernel's A order).
  int64_t w_src[I4 ? 1 : 2] = {};
  const char* sz_src = nullptr;  // INT4: this lane's row of scales (lanes 0-15: floats) or zero points (16-31: bytes)
  if (x_r0 < NT * 8) {
    if constexpr (I4) {
      x_cu = x_c / 8;
      x_dst = uint32_t((x_r0 * Lay::kRow + x_c * 8) * 2);
    } else {
      const int cu = x_c / 16, i4 = (x_c % 16) / 4, j = x_c % 4;
      x_cu = cu;
      x_dst = uint32_t((x_r0 * Lay::kRow + cu * 64 + 16 * j + 4 * i4) * 2);
    }
  }
  const int col = I4 ? x_c * 8 : (x_c / 16) * 64 + 16 * ((x_c % 16) / 4) + 4 * (x_c % 4);
#pragma unroll
  for (int i = 0; i < kXPer; ++i) x_src[i] = min(x_r0 + i * kRowsPer, M - 1) * int(a.ldx) + col;
  if constexpr (I4) {
    w_src[0] = (int64_t(rb) * units + u_begin) * 32 + lane;
    const int row = min(rb * 16 + (lane & 15), N - 1);
    sz_src = lane < 16 ? reinterpret_cast<const char*>(a.w_scale + int64_t(row) * ng)
                       : reinterpret_cast<const char*>(a.w_zero + int64_t(row) * ng);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) w_src[h] = int64_t(min(rb * 16 + g + 8 * h, N - 1)) * a.K + int64_t(u_begin) * 64 + 16 * t;
  }
  auto copy_w = [&](int stg) {  // stage stg's weights into ring slot stg % S
    if (stg >= nst) return;
    const uint32_t base = ring_s + uint32_t((stg % S) * Lay::kStage) + Lay::kAct;
    const int left = u_end - (u_begin + stg * kTUnits);
    if constexpr (I4) {
      const uint4* w4 = static_cast<const uint4*>(a.w) + w_src[0] + int64_t(stg) * (kTUnits * 32);
#pragma unroll
      for (int cu = 0; cu < kTUnits; ++cu)
        if (cu < left) cp_async16(base + uint32_t(((warp * kTUnits + cu) * 32 + lane) * 16), w4 + cu * 32);
      // Scales (lanes 0-15, rows rb * 16 + lane) and zero-point words (lanes 16-31) of the stage's groups.
      const int g0 = u_begin / UPG + stg * GPS;  // the stage's first group
#pragma unroll
      for (int q = 0; q < GPS; ++q) {
        const int grp = g0 + q;
        if (grp >= ng || q * UPG >= left) continue;
        const uint32_t slot = uint32_t(((warp * kTGroups + q) * 16 + (lane & 15)) * 4) + (lane < 16 ? 0u : uint32_t(Lay::kSc));
        cp_async4(base + Lay::kW + slot, sz_src + (lane < 16 ? 4 * grp : grp & ~3));  // a scale or a word of 4 zeros
      }
    } else {
      const uint8_t* w8 = static_cast<const uint8_t*>(a.w) + int64_t(stg) * (kTUnits * 64);
#pragma unroll
      for (int cu = 0; cu < kTUnits; ++cu)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (cu < left) cp_async16(base + uint32_t((((warp * kTUnits + cu) * 2 + h) * 32 + lane) * 16), w8 + w_src[h] + cu * 64);
    }
  };
  auto copy_x = [&](int stg) {  // stage stg's activations
    if (stg >= nst) return;
    const uint32_t base = ring_s + uint32_t((stg % S) * Lay::kStage);
    const int left = u_end - (u_begin + stg * kTUnits);
    const int64_t x0 = int64_t(u_begin + stg * kTUnits) * 64;  // the stage's first column
    if (x_cu >= left) return;
#pragma unroll
    for (int i = 0; i < kXPer; ++i) {
      if (x_r0 + i * kRowsPer >= NT * 8) break;  // past the ring's rows (only where NT * 8 < kRowsPer)
      const uint32_t dst = base + x_dst + uint32_t(i * kRowsPer * Lay::kRow * 2);
      if constexpr (I4) cp_async16(dst, x + x0 + x_src[i]);
      else cp_async8(dst, x + x0 + x_src[i]);
    }
  };
  // LEAN: the same copies from running state (each lambda's next stage: its units left, ring address, sources).
  // (A lambda's units left: none once it is past the split's last stage.)
  [[maybe_unused]] int w_left = u_end - u_begin, w_grp = I4 ? u_begin / UPG : 0, x_left = u_end - u_begin;
  [[maybe_unused]] const uint4* w4_next = I4 ? static_cast<const uint4*>(a.w) + w_src[0] : nullptr;
  [[maybe_unused]] const __nv_bfloat16* x_next = x + int64_t(u_begin) * 64;
  [[maybe_unused]] const uint32_t w_dst = uint32_t(Lay::kAct + (warp * kTUnits * 32 + lane) * 16);  // (INT4)
  [[maybe_unused]] const uint32_t sc_dst =
      SZ ? uint32_t(Lay::kAct + Lay::kW + warp * kTGroups * int(pack::kInt4SzRecord) + lane * 16)
         : uint32_t(Lay::kAct + Lay::kW + ((warp * kTGroups) * 16 + (lane & 15)) * 4) + (lane < 16 ? 0u : uint32_t(Lay::kSc));
  // SZ: lanes 0 .. 5 GPS - 1 copy the stage's GPS records of this warp's row block (16 bytes each, contiguous).
  [[maybe_unused]] const char* rec_next =
      SZ ? static_cast<const char*>(a.i4_sz) + (int64_t(rb) * ng + u_begin / UPG) * pack::kInt4SzRecord + lane * 16 : nullptr;
  // The ring addresses of slot 0, kept in registers (ptxas otherwise recomputed them, with the shared window's
  // base, at every stage), and the next copy's, moved on a stage at a time.
  [[maybe_unused]] const uint32_t w_addr0 = LEAN ? pinned(ring_s + w_dst) : 0u, s_addr0 = LEAN ? pinned(ring_s + sc_dst) : 0u,
                                  x_addr0 = LEAN ? pinned(ring_s + x_dst) : 0u;
  [[maybe_unused]] uint32_t w_addr = w_addr0, x_addr = x_addr0;
  constexpr uint32_t kLastSlot = uint32_t((S - 1) * Lay::kStage);  // slot S - 1's offset from slot 0
  auto copy_w_lean = [&]() {  // the next stage's weights (INT4: codes, then the groups' scale/zero records)
    if (w_left <= 0) return;
    const uint32_t base = w_addr;
    const bool full = SZ || w_left >= kTUnits;
#pragma unroll
    for (int cu = 0; cu < kTUnits; ++cu)
      if (full || cu < w_left) cp_async16(base + uint32_t(cu * 32 * 16), w4_next + cu * 32);
    const uint32_t sbase = base - w_addr0 + s_addr0;
    if constexpr (SZ) {  // (INT4 stages are whole: tiled_ok)
      if (lane < 5 * GPS) cp_async16(sbase, rec_next);
      rec_next += GPS * pack::kInt4SzRecord;
    } else {
#pragma unroll
      for (int q = 0; q < GPS; ++q) {
        const int grp = w_grp + q;
        if (full || q * UPG < w_left) cp_async4(sbase + uint32_t(q * 16 * 4), sz_src + (lane < 16 ? 4 * grp : grp & ~3));
      }
    }
    w4_next += kTUnits * 32;
    w_grp += GPS;
    w_left -= kTUnits;
    w_addr = w_addr - w_addr0 == kLastSlot ? w_addr0 : w_addr + uint32_t(Lay::kStage);
  };
  auto copy_x_lean = [&]() {  // the next stage's activations
    if (x_left <= 0) return;
    if (x_cu < x_left) {
      const uint32_t base = x_addr;
#pragma unroll
      for (int i = 0; i < kXPer; ++i) {
        if (x_r0 + i * kRowsPer >= NT * 8) break;
        cp_async16(base + uint32_t(i * kRowsPer * Lay::kRow * 2), x_next + x_src[i]);
      }
    }
    x_next += kTUnits * 64;
    x_left -= kTUnits;
    x_addr = x_addr - x_addr0 == kLastSlot ? x_addr0 : x_addr + uint32_t(Lay::kStage);
  };
  // The first stages' weights before the wait, then their activations: commit group st holds stage st's
  // activations (group 0 also every prologue weight), so waiting for group st still covers all of stage st.
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if constexpr (LEAN) copy_w_lean();
    else copy_w(st);
  }
  pdl_wait();
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if constexpr (LEAN) copy_x_lean();
    else copy_x(st);
    cp_async_commit();
  }

  float acc[NT][4];
  float cg[NC][NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[n][e] = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) cg[c][n][e] = 0.f;
    }
  int r_slot = 0;  // LEAN: stage stg's ring slot, stg % S
  for (int stg = 0; stg < nst; ++stg) {
    cp_async_wait<S - 2>();         // this thread's copies of stage stg have landed ...
    __syncthreads();                // ... and everyone's; every warp is done with stage stg - 1's slot
    if constexpr (LEAN) {           // into that slot (always one commit group)
      copy_w_lean();
      copy_x_lean();
    } else {
      copy_w(stg + S - 1);
      copy_x(stg + S - 1);
    }
    cp_async_commit();
    const char* st = reinterpret_cast<const char*>(t_ring) + (LEAN ? r_slot : stg % S) * Lay::kStage;
    if constexpr (LEAN) r_slot = r_slot + 1 == S ? 0 : r_slot + 1;
    const __nv_bfloat16* act = reinterpret_cast<const __nv_bfloat16*>(st);
    const uint4* wsm = reinterpret_cast<const uint4*>(st + Lay::kAct) + warp * kTUnits * 32 * (I4 ? 1 : 2) + lane;
    const int u0 = u_begin + stg * kTUnits;
#pragma unroll
    for (int cu = 0; cu < kTUnits; ++cu) {
      const int u = u0 + cu;
      // CTA-uniform. ILP leaves the test out: INT4 stages are always whole (tiled_ok: K a multiple of 4 groups of
      // 64 or more, so units and every split's ups are even), and without the branch the compiler may interleave
      // the two units' mma.
      // SZ: not even a test (INT4 stages are whole).
      if (!ILP && !SZ && u >= u_end) break;
      if constexpr (I4) {
        // (LEAN: u0 / UPG + cu / UPG, equal to u / UPG since a stage starts on a group, and the same expression for
        // every unit of a group, so that its scales and zero-point operands are computed once.)
        const int q = cu / UPG;
        [[maybe_unused]] const int grp = LEAN ? u0 / UPG + cu / UPG : u / UPG;
        float s0, s1;
        uint32_t z0, z1;
        if constexpr (SZ) {  // record q of the warp: the float2 of rows g, g + 8 at 8 g, their zero points at 64 + 2 g
          const char* rec = st + Lay::kAct + Lay::kW + (warp * kTGroups + q) * int(pack::kInt4SzRecord);
          const float2 s2 = *reinterpret_cast<const float2*>(rec + 8 * g);
          const uint32_t zz = *reinterpret_cast<const uint16_t*>(rec + 64 + 2 * g);
          s0 = s2.x, s1 = s2.y;
          z0 = __byte_perm(zz, 0x43u, 0x4040u), z1 = __byte_perm(zz, 0x43u, 0x4141u);  // 128 + z pairs, as below
        } else {
          const float* ssc = reinterpret_cast<const float*>(st + Lay::kAct + Lay::kW) + warp * kTGroups * 16;
          const uint32_t* szw = reinterpret_cast<const uint32_t*>(st + Lay::kAct + Lay::kW + Lay::kSc) + warp * kTGroups * 16;
          s0 = ssc[q * 16 + g], s1 = ssc[q * 16 + g + 8];
          // The zero point (byte grp % 4 of the word) as a BF16 pair 128 + z: bytes z, 0x43, z, 0x43 (one PRMT).
          const uint32_t zsel = 0x4040u | uint32_t(grp & 3) * 0x101u;
          z0 = __byte_perm(szw[q * 16 + g], 0x43u, zsel), z1 = __byte_perm(szw[q * 16 + g + 8], 0x43u, zsel);
        }
        const uint4 wv = wsm[cu * 32];
        const uint32_t wd[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t A[4];
          A[0] = bf16x2_sub(and_or(wd[j], 0x000F000Fu, 0x43004300u), z0);
          A[1] = bf16x2_sub(and_or(wd[j] >> 4, 0x000F000Fu, 0x43004300u), z1);
          A[2] = bf16x2_sub(and_or(wd[j] >> 8, 0x000F000Fu, 0x43004300u), z0);
          A[3] = bf16x2_sub(and_or(wd[j] >> 12, 0x000F000Fu, 0x43004300u), z1);
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const uint2 bx = *reinterpret_cast<const uint2*>(act + (n * 8 + g) * Lay::kRow + cu * 64 + 16 * j + 4 * t);
            if (LEAN && !ILP && cu % UPG == 0 && j == 0) mma_bf16_z(cg[0][n], A, bx);  // a group's first step
            else mma_bf16(cg[ILP ? cu : 0][n], A, bx);
          }
        }
        // The end of a group's share: scale it into acc (ILP, LEAN: at compile time, stages starting on a group and
        // splits ending on one).
        if ((ILP || LEAN) ? (cu + 1) % UPG == 0 : ((u + 1) % UPG == 0 || u + 1 == u_end)) {
          // ILP: the group's units of this stage are cu - cu % UPG .. cu (a stage starts on a group).
          const int c1 = ILP ? cu : 0, c0 = ILP ? cu - cu % UPG : 0;  // constants once the loop is unrolled
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              float v = cg[c1][n][e];
#pragma unroll
              for (int c = c0; c < c1; ++c) v += cg[c][n][e], cg[c][n][e] = 0.f;
              acc[n][e] = fmaf(e < 2 ? s0 : s1, v, acc[n][e]);
              if (ILP || !LEAN) cg[c1][n][e] = 0.f;  // (LEAN: the next group's first mma overwrites it)
            }
        }
      } else {
        const uint4 wa = wsm[(cu * 2) * 32], wb = wsm[(cu * 2 + 1) * 32];
        const uint32_t ra[4] = {wa.x, wa.y, wa.z, wa.w}, rbw[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // word j of rows g and g + 8: k = 64 u + 16 t + 4 j .. + 3
          const uint32_t pa = ra[j] ^ 0x80808080u, pb = rbw[j] ^ 0x80808080u;
          const uint32_t A[4] = {i8x2_to_bf16x2(pa, 0), i8x2_to_bf16x2(pb, 0), i8x2_to_bf16x2(pa, 2), i8x2_to_bf16x2(pb, 2)};
#pragma unroll
          for (int n = 0; n < NT; ++n) {
            const uint2 bx = *reinterpret_cast<const uint2*>(act + (n * 8 + g) * Lay::kRow + cu * 64 + 16 * j + 4 * t);
            mma_bf16(acc[n], A, bx);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  const bool has_rows = rb_raw < rbs;  // (whole warps)
  if constexpr (CL) {
    return tiled_cluster_tail<KIND, NT>(a, acc, t_ring, rbs, M, warp, lane);
  }
  if (gridDim.y > 1) {
    if (has_rows) {
      float* wsp = a.tiled_ws + (int64_t(blockIdx.y) * rbs + rb) * (NT * 4 * 32) + lane;
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) wsp[(n * 4 + e) * 32] = acc[n][e];
    }
    if (!a.tiled_counters) return;  // wgemm_tiled_splitk_epilogue adds the partial sums
    // The last CTA of this tile to get here adds every split's partial sums, its own among them, from the
    // workspace (the epilogue kernel's order and bits) and runs the epilogue; the counter is left zero for the next
    // launch. (The other CTAs stored theirs before their fence and increment; this CTA reads after its own.)
    __shared__ int tile_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const int before = atomicAdd(a.tiled_counters + blockIdx.x, 1);
      tile_last = before == int(gridDim.y) - 1;
      if (tile_last) a.tiled_counters[blockIdx.x] = 0;
    }
    __syncthreads();
    if (!tile_last) return;
    __threadfence();
    if (has_rows && (a.tiled_epi & 1)) tiled_prefetch_epilogue<KIND>(a, rb, M, lane);
    if (has_rows) tiled_splitk_sum<NT>(a, rb, rbs, lane, int(gridDim.y), acc);
  }
  // tiled_epi bit 1: the warps' sums of squares through shared memory, one atomic a token and CTA (8 fewer).
  __shared__ float tile_sq[kTWarps][NT * 8];
  const bool cta_sq = (a.tiled_epi & 2) && a.rms_sumsq;
  if (has_rows)
    store_tile<NT, SZ && S == 3>(a, rb, 0, M, lane, [&](int n, int e, int64_t rc, int64_t tc) { return tiled_value<KIND>(a, acc[n][e], rc, tc); },
                                 cta_sq ? tile_sq[warp] : nullptr);
  if (cta_sq) {  // (CTA-uniform; every thread of the CTA is here)
    __syncthreads();
    const int warps = min(kTWarps, rbs - int(blockIdx.x) * kTWarps);  // those with rows
    if (int(threadIdx.x) < M) {
      double sum = 0.0;
      for (int w = 0; w < warps; ++w) sum += double(tile_sq[w][threadIdx.x]);
      atomicAdd(a.rms_sumsq + threadIdx.x, sum);
    }
  }
}

// The split-K sums as a kernel of their own (GemvArgs::tiled_counters null): one warp per row block.
template <int KIND, int NT>
__global__ void __launch_bounds__(kTWarps * 32) wgemm_tiled_splitk_epilogue(const GemvArgs a, const int splits) {
  pdl_trigger();
  pdl_wait();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rbs = int((a.N + 15) / 16), rb = int(blockIdx.x) * kTWarps + warp;
  if (rb >= rbs) return;
  float acc[NT][4];
  tiled_splitk_sum<NT>(a, rb, rbs, lane, splits, acc);
  store_tile<NT>(a, rb, 0, a.M, lane, [&](int n, int e, int64_t rc, int64_t tc) { return tiled_value<KIND>(a, acc[n][e], rc, tc); });
}

// The shared memory a block may opt in to on this device (0 if unknown).
int tiled_max_smem() {
  static const int n = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
      return 0;
    return v;
  }();
  return n;
}

// Whether wgemm_tiled_kernel serves these arguments (kind: kind_of(a)) on this device (its shared memory at the
// default 4 stages: up to 139 KB for INT8 at 64 tokens, more than sm_89 gives a block). Input rows 16-byte
// aligned (8 BF16 values).
bool tiled_ok(const GemvArgs& a, int kind) {
  if (!tiled_kind(kind)) return false;
  if (a.K % 64 || a.norm_counter || reinterpret_cast<uintptr_t>(a.x) % 16 || a.ldx % 8) return false;
  if (tiled_bytes(kind, tiled_nt(a.M)) > tiled_max_smem()) return false;
  if (kind != kI4) return true;
  return (a.group == 64 || a.group == 128) && (a.K / a.group) % 4 == 0 && reinterpret_cast<uintptr_t>(a.w_zero) % 4 == 0;
}

// Whether a weight-only matmul of 9..64 tokens (a.tiled == 0) takes the tiled kernel. LLMQ_WGEMM_TILED=0: never; =1:
// wherever it serves; unset: INT8 rows always, INT4 at 16 tokens on matrices of 2^24 weights or more and past 16 on
// those of 2^25 or more. H200, llmq-kbench --only matmul at llama-3-8b shapes, 9-64 tokens
// (bench/results/2026-12-02-nvidia-h200-session11.txt): INT8 faster at every shape (gate_up at 16 tokens 49 us against
// the general kernel's 88); INT4 faster for gate_up at 32-64 tokens and down at 16-64 (down at 32: 38 against 53 us),
// slower for qkv and o (6-25 M weights: the split-K pass and the per-stage barrier cost more than the activations' L2
// reads save) and for gate_up at 9-16. With the copy plan (session 23,
// bench/results/2026-12-05-nvidia-h200-session23.txt) INT4 at 16 tokens is faster for gate_up too (45.7 against the
// INT4 kernel's 48.8 us; down 26.4 against 31.6); 9-15 tokens not measured, so they stay on the INT4 kernel. Session 29
// (H100, 3 stages): qkv and o (2^24 weights and up) at 16 tokens too (past 16 not measured that way), 4-layer
// llama-3-8b w4a16 batch-16 TPOT 0.8747 / 0.8757 ms against 0.8831 / 0.8835 with them on the INT4 kernel. Read at every
// call, so that a test can set it.
bool tiled_default(const GemvArgs& a, int kind) {
  const char* e = std::getenv("LLMQ_WGEMM_TILED");
  if (e && *e) return *e != '0';
  return kind == kI8W || (a.M >= 16 && a.N * a.K >= (int64_t(1) << (a.M == 16 ? 24 : 25)));
}

// The split count LLMQ_WGEMM_TILED_SPLITS_AT ("NxK:n,NxK:n", read at every call) gives an N x K matrix; 0 if none.
int tiled_splits_at(int64_t N, int64_t K) {
  const char* e = std::getenv("LLMQ_WGEMM_TILED_SPLITS_AT");
  if (!e) return 0;
  for (const char* p = e; *p;) {
    long long n = 0, k = 0;
    int splits = 0, used = 0;
    if (std::sscanf(p, "%lldx%lld:%d%n", &n, &k, &splits, &used) != 3) return 0;
    if (n == N && k == K) return splits;
    p += used;
    if (*p == ',') ++p;
  }
  return 0;
}

// GemvArgs::tiled_epi for the tiled kernel: LLMQ_WGEMM_TILED_EPI=n (read at every call), default 7. H100, full
// llama-3-8b w4a16 batch 16, alternated in one call: 3 against 0 (session 45's epilogue) 4,028 / 4,030 against
// 3,947 / 3,955 tok/s (session 46); 7 (bit 2, loads first) against 3: 4,264 / 4,257 against 4,106 / 4,093 tok/s
// (session 48; bench/results/2026-12-07-nvidia-h100-session4{6,8}.txt).
int tiled_epi() {
  const char* e = std::getenv("LLMQ_WGEMM_TILED_EPI");
  return e && *e ? std::atoi(e) : 7;
}

// The records instance with cluster sums (wgemm_tiled_kernel's CL): whether clusters of `splits` CTAs (up to 16,
// past the portable 8) of that instance can be resident on this device; asked once per split count.
constexpr int kTMaxCluster = 16;
template <int KIND, int NT, int G, int S>
bool tiled_cluster_fits(int tiles, int splits) {
  static int known[kTMaxCluster + 1] = {};  // 1 fits, -1 does not, 0 not asked
  if (known[splits] == 0) {
    using Lay = TiledLayout<KIND, NT, S, true>;
    const auto kernel = wgemm_tiled_kernel<KIND, NT, G, S, false, true, true, true>;
    int n = 0;
    bool ok = device_sm90() &&
              cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Lay::kBytes) == cudaSuccess &&
              cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (ok) {
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = 1, attr.val.clusterDim.y = unsigned(splits), attr.val.clusterDim.z = 1;
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(unsigned(tiles), unsigned(splits));
      cfg.blockDim = dim3(kTWarps * 32);
      cfg.dynamicSmemBytes = size_t(Lay::kBytes);
      cfg.attrs = &attr;
      cfg.numAttrs = 1;
      ok = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n > 0;
    }
    cudaGetLastError();  // (a refusal leaves nothing behind for the next launch's check)
    known[splits] = ok ? 1 : -1;
  }
  return known[splits] > 0;
}

// (LEAN for INT4 only: see wgemm_tiled_kernel.)
template <int KIND, int NT, int G, int S, bool ILP = false, bool LEAN = (KIND == kI4), bool SZ = false>
void launch_tiled_s(const GemvArgs& a, cudaStream_t s) {
  using Lay = TiledLayout<KIND, NT, S, SZ>;
  // CTAs that run at once on the whole device (shared memory and registers allow 1-4 per SM).
  static const int slots = [] {
    const auto kernel = wgemm_tiled_kernel<KIND, NT, G, S, ILP, LEAN, SZ>;
    LLMQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Lay::kBytes));
    int dev = 0, sms = 0, per_sm = 0;
    LLMQ_CUDA_CHECK(cudaGetDevice(&dev));
    LLMQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    LLMQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kTWarps * 32, size_t(Lay::kBytes)));
    return sms * std::max(per_sm, 1);
  }();
  const int units = int(a.K / 64), rbs = int((a.N + 15) / 16), tiles = (rbs + kTWarps - 1) / kTWarps;
  // Split K so that the CTAs fill one wave (LLMQ_WGEMM_TILED_WAVES [1] waves) and no more: a second, part-full
  // wave would cost as long as the first. Whole stages, at least two per split, as far as the workspace allows.
  static const int waves = [] {
    const char* e = std::getenv("LLMQ_WGEMM_TILED_WAVES");
    return e && *e ? std::clamp(std::atoi(e), 1, 8) : 1;
  }();
  int splits = a.tiled_ws ? std::clamp(waves * slots / tiles, 1, std::max(1, units / (2 * kTUnits))) : 1;
  // The records instance (INT4, 16 tokens) also splits a CTA's K range past max_stages ring stages (default 8;
  // LLMQ_WGEMM_TILED_MAX_STAGES=n, 0 = no such limit, read at every call), even past one wave: llama-3-8b gate_up
  // (224 tiles, 2 splits of 16 stages by the rule above) took 43.5 us with 2 splits, 38.8 with 4, 38.5 with 6,
  // 43.6 with 8 (H100, llmq-kbench --t 16; qkv, o and down were fastest at the rule's 11, 16 and 16 splits,
  // bench/results/2026-12-07-nvidia-h100-session45.txt). In the model much less: full llama-3-8b w4a16 batch 16
  // 4,018 -> 4,043 tok/s (same call; 6 stages: 3,969, down then takes 19 splits).
  if constexpr (SZ) {
    const char* me = std::getenv("LLMQ_WGEMM_TILED_MAX_STAGES");
    const int max_stages = me && *me ? std::max(0, std::atoi(me)) : 8;
    if (a.tiled_ws && max_stages > 0)
      splits = std::max(splits, std::min((units + max_stages * kTUnits - 1) / (max_stages * kTUnits), units / kTUnits));
  }
  // LLMQ_WGEMM_TILED_SPLITS=n forces n splits where a workspace is given, LLMQ_WGEMM_TILED_SPLITS_AT=NxK:n[,...]
  // only for matrices of that shape (in-model comparisons, one matrix at a time; both read at every call).
  if (const char* e = std::getenv("LLMQ_WGEMM_TILED_SPLITS"); e && *e && a.tiled_ws)
    splits = std::clamp(std::atoi(e), 1, std::max(1, units / kTUnits));
  if (const int at = tiled_splits_at(a.N, a.K); at > 0 && a.tiled_ws) splits = std::clamp(at, 1, std::max(1, units / kTUnits));
  // No more splits than the workspace holds (it holds whole splits of NT * 4 * 32 floats a row block).
  splits = int(std::min<int64_t>(splits, std::max<int64_t>(1, a.tiled_ws_floats / (int64_t(rbs) * NT * 4 * 32))));
  auto per_split = [&](int sp) { return ((units + sp - 1) / sp + kTUnits - 1) / kTUnits * kTUnits; };
  const int ups = per_split(splits);
  splits = (units + ups - 1) / ups;  // (never more than before: whole stages a split)
  // LLMQ_WGEMM_TILED_CLUSTER=n (read at every call; the records instance, sm_90+): where a tile has 2..n (<= 16)
  // splits and a cluster of that many CTAs fits, they add their sums through distributed shared memory (CL above).
  // Default 4: at llama-3-8b's shapes and 16 tokens that is gate_up alone (4 splits; qkv, o and down take 11-16).
  // H100, session 48, same call: kbench gate_up 39.3 -> 34.2 us, 4-layer w4a16 batch 16 TPOT 0.8396 -> 0.8263 ms
  // (medians of three alternated runs); every split count (16) was 4.9% slower on the full model (session 46).
  if constexpr (SZ && S == 3) {
    const char* ce = std::getenv("LLMQ_WGEMM_TILED_CLUSTER");
    const int max_cluster = ce && *ce ? std::min(std::atoi(ce), kTMaxCluster) : 4;
    if (splits >= 2 && splits <= max_cluster && tiled_cluster_fits<KIND, NT, G, S>(tiles, splits)) {
      GemvArgs b = a;
      b.tiled_epi = tiled_epi() & 4;
      launch_clustered("wgemm_tiled_kernel", wgemm_tiled_kernel<KIND, NT, G, S, ILP, LEAN, SZ, true>,
                       dim3(unsigned(tiles), unsigned(splits)), dim3(kTWarps * 32), size_t(Lay::kBytes), s,
                       dim3(1u, unsigned(splits), 1u), b, units, ups);
      return;
    }
  }
  // The partial sums in each tile's last CTA where there is a counter for every tile, else in a second kernel.
  GemvArgs b = a;
  if (b.tiled_counters_n < tiles) b.tiled_counters = nullptr;
  b.tiled_epi = tiled_epi();
  launch("wgemm_tiled_kernel", wgemm_tiled_kernel<KIND, NT, G, S, ILP, LEAN, SZ>, dim3(unsigned(tiles), unsigned(splits)),
         dim3(kTWarps * 32), size_t(Lay::kBytes), s, b, units, ups);
  if (splits > 1 && !b.tiled_counters)
    launch("wgemm_tiled_splitk_epilogue", wgemm_tiled_splitk_epilogue<KIND, NT>, dim3(unsigned(tiles)), dim3(kTWarps * 32),
           0, s, b, splits);
}

// The ring's depth: 3 stages for INT4, and for INT8 rows past 32 tokens; kTStages (4) for INT8 rows up to 32
// tokens. LLMQ_WGEMM_TILED_STAGES=3|4|8 sets it (8 only up to 16 tokens, where that ring fits the device's shared
// memory; read at every call so that a test can set it). Measured on an H100 (session 29, 4-layer llama-3-8b,
// TPOT ms, two rounds, bench/results/2026-12-05-nvidia-h100-session29.txt): w4a16 batch 16 0.9190 / 0.9160 with 4
// stages against 0.8831 / 0.8835 with 3, batch 64 1.6391 / 1.6675 against 1.5886 / 1.5887; w8a16 batch 64 1.9183 /
// 1.8844 against 1.6675 / 1.6796, but batch 16 0.9425 / 0.9430 against 1.0129 / 1.0144. With 3 stages a CTA's ring
// is smaller, 4 CTAs fit an SM instead of 3 at 16 tokens (2 instead of 1 at 64), and the one-wave split rule gives
// gate_up 2 K-splits instead of 1 (H100 kbench at 16 tokens: 37.9 against 45.5 us).
// LLMQ_WGEMM_TILED_ILP=1 (INT4 at 9-16 tokens, 3 or 4 stages): the instance whose stage's units sum into their own
// registers (wgemm_tiled_kernel's ILP). The suspicion it tests (session 29, from the SASS): at 16 tokens a warp has
// two chains of 4 dependent HMMA a unit and 3-4 warps a scheduler (224 CTAs for gate_up), too few to hide the
// mma latency (ncu, session 21: no eligible warp 44% of the cycles). Measured (H100, session 29): kbench at 16
// tokens gate_up 45.5 -> 42.8 us, down 24.2 -> 22.9, but qkv 13.4 -> 16.0; w4a16 batch-16 TPOT with 3 stages and
// tiled qkv/o 0.8830 against 0.8747 ms without it. So opt-in, read at every call.
//
// LLMQ_WGEMM_TILED_LEAN=0 (read at every call): INT4's stage loop before session 38 (wgemm_tiled_kernel's LEAN), for
// comparisons; only at 16 and 64 tokens with the default ring depth, without ILP.
template <int KIND, int NT, int G>
void launch_tiled_nt(const GemvArgs& a, cudaStream_t s) {
  const char* e = std::getenv("LLMQ_WGEMM_TILED_STAGES");
  const int want = e && *e ? std::atoi(e) : (KIND == kI4 || NT == 8) ? 3 : kTStages;
  if constexpr (KIND == kI4 && (NT == 2 || NT == 8)) {
    const char* le = std::getenv("LLMQ_WGEMM_TILED_LEAN");
    if (want == 3 && le && *le == '0' && !(NT == 2 && env_flag("LLMQ_WGEMM_TILED_ILP")))
      return launch_tiled_s<KIND, NT, G, 3, false, false>(a, s);
  }
  if constexpr (KIND == kI4 && NT == 2) {
    if (env_flag("LLMQ_WGEMM_TILED_ILP")) {
      if (want == 3) return launch_tiled_s<KIND, NT, G, 3, true>(a, s);
      return launch_tiled_s<KIND, NT, G, kTStages, true>(a, s);
    }
  }
  if constexpr (KIND == kI4 && NT == 2) {
    // 16 tokens: the scales and zero points from the records (GemvArgs::i4_sz) where given; LLMQ_WGEMM_TILED_SZ=0
    // (read at every call): from w_scale / w_zero as before (comparisons). (Not at 32 and 64 tokens: there the SZ
    // instances need 105-184 registers against 80-128, fewer CTAs an SM.)
    const char* ze = std::getenv("LLMQ_WGEMM_TILED_SZ");
    if (a.i4_sz && !(ze && *ze == '0')) {
      if (want == 3) return launch_tiled_s<KIND, NT, G, 3, false, true, true>(a, s);
      if (want == 4) return launch_tiled_s<KIND, NT, G, 4, false, true, true>(a, s);
    }
  }
  if (want == 3) return launch_tiled_s<KIND, NT, G, 3>(a, s);
  if constexpr (NT <= 2)
    if (want == 8 && tiled_bytes(KIND, NT, 8) <= tiled_max_smem()) return launch_tiled_s<KIND, NT, G, 8>(a, s);
  return launch_tiled_s<KIND, NT, G, kTStages>(a, s);
}

template <int KIND, int G>
void launch_tiled_g(const GemvArgs& a, cudaStream_t s) {
  switch (tiled_nt(a.M)) {
    case 1: return launch_tiled_nt<KIND, 1, G>(a, s);
    case 2: return launch_tiled_nt<KIND, 2, G>(a, s);
    case 4: return launch_tiled_nt<KIND, 4, G>(a, s);
    default: return launch_tiled_nt<KIND, 8, G>(a, s);
  }
}

void launch_tiled(const GemvArgs& a, int kind, cudaStream_t s) {
  if (kind == kI8W) return launch_tiled_g<kI8W, 0>(a, s);
  return a.group == 64 ? launch_tiled_g<kI4, 64>(a, s) : launch_tiled_g<kI4, 128>(a, s);
}

int kind_of(const GemvArgs& a) {
  if (a.wf == WFmt::BF16 && a.xf == XFmt::BF16) return kBf16;
  if (a.wf == WFmt::I8 && a.xf == XFmt::BF16) return kI8W;
  if (a.wf == WFmt::I4 && a.xf == XFmt::BF16) return kI4;
  if (a.wf == WFmt::I8 && a.xf == XFmt::I8) return kI8I8;
  if (a.wf == WFmt::FP8 && a.xf == XFmt::FP8) return kFp8Fp8;
  return -1;
}

int64_t units_of(int kind, int64_t K) {
  return kind == kI4 ? pack::int4_mma_units(K) : K / (kind == kBf16 ? 32 : 64);
}

template <int KIND, int G>
void launch_nt(const GemvArgs& a, cudaStream_t s) {
  const int64_t units = units_of(KIND, a.K);
  // Enough warps per row block that small matrices still keep every SM's memory pipe busy.
  static const int max_warps = [] {  // LLMQ_WGEMM_WARPS: tuning experiments only
    const char* e = std::getenv("LLMQ_WGEMM_WARPS");
    return e && *e ? std::clamp(std::atoi(e), 1, kMaxWarps) : kMaxWarps;
  }();
  const int nw = int(std::clamp<int64_t>(units / 2, 1, max_warps));
  const dim3 grid(unsigned((a.N + 15) / 16)), block(unsigned(nw * 32));
  if (a.M <= 8) launch("wgemm_kernel", wgemm_kernel<KIND, 1, G>, grid, block, 0, s, a, units);
  else if (a.M <= 16) launch("wgemm_kernel", wgemm_kernel<KIND, 2, G>, grid, block, 0, s, a, units);
  else if (a.M <= 32) launch("wgemm_kernel", wgemm_kernel<KIND, 4, G>, grid, block, 0, s, a, units);
  else launch("wgemm_kernel", wgemm_kernel<KIND, 8, G>, grid, block, 0, s, a, units);
}

// LLMQ_WGEMM_GENERIC_I4=1: INT4 through the general kernel (comparisons).
bool env_generic_i4() {
  static const bool on = [] {
    const char* e = std::getenv("LLMQ_WGEMM_GENERIC_I4");
    return e && *e && *e != '0';
  }();
  return on;
}

bool aligned(const void* p, uintptr_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

__global__ void int4_mma_to_bf16_kernel(const uint32_t* packed, const float* scale, const uint8_t* zero, int64_t group,
                                        int64_t N, int64_t K, int64_t units, int64_t words, __nv_bfloat16* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t wi = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (wi >= words) return;
  // word index = ((b * units + u) * 32 + lane) * 4 + s
  const int s = int(wi % 4), lane = int((wi / 4) % 32);
  const int64_t u = (wi / 128) % units, b = wi / (128 * units);
  const int g = lane / 4, t = lane % 4;
  const uint32_t w = packed[wi];
  const int64_t ng = K / group;
  for (int q = 0; q < 8; ++q) {
    const int reg = q & 3, e = q >> 2;
    const int64_t n = b * 16 + g + 8 * (reg & 1), k = u * 64 + 16 * s + 4 * t + 2 * (reg >> 1) + e;
    if (n >= N || k >= K) continue;
    const int64_t gi = n * ng + k / group;
    out[n * K + k] = __float2bfloat16((float((w >> (4 * q)) & 0xFu) - float(zero[gi])) * scale[gi]);
  }
}

// The same expansion, one lane's 16 bytes (32 codes: rows g and g + 8, four k of each of the unit's four steps)
// per thread: a coalesced 16-byte load, and per row and step one 8-byte store of four consecutive k (the warp's
// store covers 8 rows x 32 bytes, whole sectors). Needs K % 16 == 0 (the int4_mma shapes): a step inside K lies
// wholly inside it. Why: H200, full-size llama-2-7b, a 128-token prefill took 23.4 ms in w4a16 with the
// word-per-thread kernel above (8 two-byte stores, 64-bit divisions) against 6.5 ms in bf16 (not yet re-measured).
__global__ void int4_mma_to_bf16_lanes_kernel(const uint4* packed, const float* scale, const uint8_t* zero, int64_t group,
                                              int64_t N, int64_t K, int64_t units, int64_t lanes, __nv_bfloat16* out) {
  pdl_trigger();
  pdl_wait();
  const int64_t li = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b * units + u) * 32 + lane
  if (li >= lanes) return;
  const int lane = int(li & 31);
  const int64_t bu = li >> 5, u = bu % units, b = bu / units;
  const int g = lane >> 2, t = lane & 3;
  const uint4 w = packed[li];
  const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
  const int64_t ng = K / group;
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // row g (registers 0 and 2: nibbles 0, 4, 2, 6), row g + 8 (1, 5, 3, 7)
    const int64_t n = b * 16 + g + 8 * h;
    if (n >= N) continue;
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      const int64_t k = u * 64 + 16 * st + 4 * t;
      if (k >= K) break;
      const int64_t gi = n * ng + k / group;
      const float sc = scale[gi], z = float(zero[gi]);
      const uint32_t word = ws[st];
      const float c0 = float((word >> (4 * h)) & 0xFu), c1 = float((word >> (4 * (h + 4))) & 0xFu);
      const float c2 = float((word >> (4 * (h + 2))) & 0xFu), c3 = float((word >> (4 * (h + 6))) & 0xFu);
      const __nv_bfloat162 lo = __floats2bfloat162_rn((c0 - z) * sc, (c1 - z) * sc);
      const __nv_bfloat162 hi = __floats2bfloat162_rn((c2 - z) * sc, (c3 - z) * sc);
      *reinterpret_cast<uint2*>(out + n * K + k) =
          make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
    }
  }
}

}  // namespace

bool wgemm_supports(const GemvArgs& a, int sm) {
  const int kind = kind_of(a);
  if (kind < 0 || a.M < 1 || a.M > kWgemmMaxT || a.N < 1 || a.K < 1 || !a.w || !a.x || (!a.y && !a.swiglu_out)) return false;
  if (a.ldx < a.K || (!a.swiglu_out && a.ldy < a.N)) return false;
  if (!epilogue_args_ok(a) || a.x_prep != ActKind::None) return false;  // x_prep: the GEMV's alone
  if (kind == kFp8Fp8 && sm < 89) return false;
  if (kind >= kI8I8 && !a.x_scale) return false;
  if (kind != kBf16 && !a.w_scale) return false;
  if (kind == kBf16 && a.K % 32) return false;
  if ((kind == kI8W || kind >= kI8I8) && a.K % 64) return false;
  if (kind == kI4 && (!a.w_zero || !wgemm_int4_shape(a.K, a.group) || !aligned(a.i4_sz, 16))) return false;
  if (a.i4_row_blocks != 0 && a.i4_row_blocks != 1 && a.i4_row_blocks != 2) return false;
  if (a.i4_rotate < -1 || a.i4_rotate > 1) return false;
  if (a.tiled < -1 || a.tiled > 1 || (a.tiled == 1 && !tiled_ok(a, kind))) return false;
  const int xb = kind >= kI8I8 ? 1 : 2;
  if (!aligned(a.w, 16) || !aligned(a.x, 8) || (a.ldx * xb) % 8) return false;
  return true;
}

// Whether wgemm() takes the tiled kernel for these (supported) arguments: from 9 tokens (up to 8 the one-token
// INT4 kernel, the general kernel or the GEMV serve: at 1 token the tiled kernel took 1.6x the one-token INT4 kernel's
// time on gate_up, and fp8 through it 1.42x the decode step's; H200, bench/results/2026-12-05-nvidia-h200-session23.txt).
static bool takes_tiled(const GemvArgs& a, int kind) {
  return tiled_kind(kind) && (a.tiled == 1 || (a.tiled == 0 && a.M > 8 && tiled_default(a, kind) && tiled_ok(a, kind)));
}

void wgemm(const GemvArgs& a, cudaStream_t s) {
  const int kind = kind_of(a);
  if (takes_tiled(a, kind)) return launch_tiled(a, kind, s);
  switch (kind) {
    case kBf16: return launch_nt<kBf16, 0>(a, s);
    case kI8W: return launch_nt<kI8W, 0>(a, s);
    case kI8I8: return launch_nt<kI8I8, 0>(a, s);
    case kFp8Fp8: return launch_nt<kFp8Fp8, 0>(a, s);
    case kI4:
      if (a.K % 64 == 0 && !env_generic_i4()) {
        if (a.group == 32) return launch_i4<32>(a, s);
        if (a.group == 64) return launch_i4<64>(a, s);
        return launch_i4<128>(a, s);
      }
      if (a.group == 32) return launch_nt<kI4, 32>(a, s);
      if (a.group == 64) return launch_nt<kI4, 64>(a, s);
      return launch_nt<kI4, 128>(a, s);
    default: break;
  }
  throw Error("wgemm: unsupported format pair");
}

void int4_mma_to_bf16(const void* packed, const float* scale, const uint8_t* zero, int64_t group, int64_t N, int64_t K,
                      void* out, cudaStream_t s) {
  const int64_t units = pack::int4_mma_units(K), words = pack::int4_mma_bytes(N, K) / 4;
  if (words == 0) return;
  constexpr int kThreads = 256;
  if (K % 16 == 0 && !scalar_dequant() && reinterpret_cast<uintptr_t>(packed) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0) {
    const int64_t lanes = words / 4;
    launch("int4_mma_to_bf16_lanes_kernel", int4_mma_to_bf16_lanes_kernel, unsigned((lanes + kThreads - 1) / kThreads),
           kThreads, 0, s, static_cast<const uint4*>(packed), scale, zero, group, N, K, units, lanes,
           static_cast<__nv_bfloat16*>(out));
    return;
  }
  launch("int4_mma_to_bf16_kernel", int4_mma_to_bf16_kernel, unsigned((words + kThreads - 1) / kThreads), kThreads, 0, s,
         static_cast<const uint32_t*>(packed), scale, zero, group, N, K, units, words, static_cast<__nv_bfloat16*>(out));
}

}  // namespace llmq::cuda
