#include <algorithm>
#include <cfloat>
#include <cstdio>
#include <cstdlib>
#include <type_traits>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"
#include "backend/cuda/launch.cuh"

namespace llmq::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;  // query heads per block (more share a KV head: several blocks)
constexpr int kMaxSplits = kMaxAttentionSplits;

// Cache slot of position p of sequence seq. Div = uint32_t divides in 32 bits (positions are int32): a 64-bit
// division is a long instruction sequence, which the decode kernel would run for every position a lane reads
// (the per-token kernel keeps 64 bits: with 32 its registers spill).
template <typename Div = int64_t>
__device__ __forceinline__ int64_t slot_of(const KvCacheView& kv, int64_t seq, int64_t p) {
  const Div pp = Div(p), ps = Div(kv.page_size);
  return int64_t(kv.block_table[seq * kv.pages_per_seq + int64_t(pp / ps)]) * kv.page_size + int64_t(pp % ps);
}

template <typename KT>
__device__ __forceinline__ float kv_load(const KT* p) {
  if constexpr (sizeof(KT) == 2) return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
  else if constexpr (std::is_same_v<KT, int8_t>) return float(*p);
  else return fp8_to_float(*p);
}

// Eight cache values (K or V of one position, dims d0..d0+7 at element offset `at`) as floats, dequantized:
// one 16-byte (BF16) or 8-byte (FP8, INT8) load.
__device__ __forceinline__ void kv_load8(const KvCacheView& kv, const void* base, int64_t at, float scale, float (&f)[8]) {
  if (kv.type == KvType::BF16) {
    const uint4 u = *reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(base) + at);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) f[2 * i] = bf16lo(w[i]), f[2 * i + 1] = bf16hi(w[i]);
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(base) + at);
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint8_t b = uint8_t(w[i / 4] >> (8 * (i % 4)));
      f[i] = (kv.type == KvType::FP8 ? fp8_to_float(b) : float(int8_t(b))) * scale;
    }
  }
}

// Output value (row, col) of the [T, od] attention output (od = heads * head_dim), where AttentionArgs says.
__device__ __forceinline__ void store_out(const AttentionArgs& a, int64_t row, int64_t col, int64_t od, float v) {
  const PrepOut& o = a.out_prep;
  if (!o.out) {
    a.out[row * od + col] = v;
  } else if (o.kind == ActKind::None) {
    prep_store(o, row, col, v);
  } else {  // a static scale, as prep_row applies it (1 / s, then one multiply)
    const float s = o.static_scale;
    if (col == 0 && o.row_scale) o.row_scale[row] = s;
    prep_store(o, row, col, v * (1.0f / s));
  }
}

// The code a K (is_k) or V value of KV head h is stored as: BF16 bits, or an FP8 or INT8 code of the head's
// scale (as kv_store writes it).
template <typename KT>
__device__ __forceinline__ KT kv_code(const KvCacheView& kv, int64_t h, float v, bool is_k) {
  if constexpr (sizeof(KT) == 2) {
    return __bfloat16_as_ushort(__float2bfloat16(v));
  } else {
    const float inv = 1.0f / (is_k ? kv.k_scale[h] : kv.v_scale[h]);
    if constexpr (std::is_same_v<KT, int8_t>) return float_to_int8(v * inv);
    else return float_to_fp8(v * inv);
  }
}

// Element i of this layer's K and V pages (kv head h) from their float values, quantized per the cache type.
template <typename KT>
__device__ __forceinline__ void kv_store_as(const KvCacheView& kv, int64_t i, int64_t h, float kval, float vval) {
  static_cast<KT*>(kv.k)[i] = kv_code<KT>(kv, h, kval, true);
  static_cast<KT*>(kv.v)[i] = kv_code<KT>(kv, h, vval, false);
}
__device__ __forceinline__ void kv_store(const KvCacheView& kv, int64_t i, int64_t h, float kval, float vval) {
  if (kv.type == KvType::BF16) kv_store_as<uint16_t>(kv, i, h, kval, vval);
  else if (kv.type == KvType::FP8) kv_store_as<uint8_t>(kv, i, h, kval, vval);
  else kv_store_as<int8_t>(kv, i, h, kval, vval);
}

// Rotate-half RoPE of the pair (a, b) = (x[j], x[j + half]) with c, s = cos, sin of the position's angle j:
// (a c - b s, b c + a s). Rounded products and sums with no FMA contraction, so that rope_kv_kernel and the
// fused decode kernel give the same bits (a contraction chosen differently in each flipped BF16/FP8 roundings
// of K, and moved llama-27m logits by 1e-3 between the two).
__device__ __forceinline__ float rope_lo(float a, float b, float c, float s) { return __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)); }
__device__ __forceinline__ float rope_hi(float a, float b, float c, float s) { return __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)); }

// Dimension d of one head vector after RoPE (x: the head's hd values; cs, sn: the position's table rows).
__device__ __forceinline__ float rope_at(const float* x, int64_t d, int64_t half, const float* cs, const float* sn) {
  const int64_t j = d < half ? d : d - half;
  return d < half ? rope_lo(x[j], x[j + half], cs[j], sn[j]) : rope_hi(x[j], x[j + half], cs[j], sn[j]);
}

// kRaw: the values come from raw accumulators (RawAcc; raw.acc set) instead of qkv, which gets q and k rotated.
template <bool kRaw>
__global__ void rope_kv_kernel(float* qkv, int64_t ld, const int32_t* pos, const int32_t* seq, const float* cos_tab,
                               const float* sin_tab, int64_t heads, const KvCacheView kv, const RawAcc raw) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t hd = kv.head_dim, half = hd / 2, kvd = kv.kv_heads * hd, qd = heads * hd;
  const int64_t p = pos[t];
  float* row = qkv + t * ld;
  const float* cs = cos_tab + p * half;
  const float* sn = sin_tab + p * half;
  for (int64_t i = threadIdx.x; i < (heads + kv.kv_heads) * half; i += blockDim.x) {
    const int64_t col = (i / half) * hd, j = i % half;
    float* vec = row + col;
    const float a = kRaw ? raw_value(raw, t, col + j) : vec[j], b = kRaw ? raw_value(raw, t, col + j + half) : vec[j + half];
    vec[j] = rope_lo(a, b, cs[j], sn[j]);
    vec[j + half] = rope_hi(a, b, cs[j], sn[j]);
  }
  __syncthreads();
  const int64_t slot = slot_of(kv, seq[t], p);
  for (int64_t j = threadIdx.x; j < kvd; j += blockDim.x)
    kv_store(kv, slot * kvd + j, j / hd, row[qd + j], kRaw ? raw_value(raw, t, qd + kvd + j) : row[qd + kvd + j]);
}

// Four K and V values (elements i .. i + 3 of this layer's pages, one KV head h; i a multiple of 4) as the cache
// type's codes, in one 8-byte (BF16) or 4-byte (FP8, INT8) store each: kv_store four times.
template <typename KT>
__device__ __forceinline__ void kv_store4_as(const KvCacheView& kv, int64_t i, int64_t h, const float4& k, const float4& v) {
  auto codes = [&](const float4& x, bool is_k) {
    const KT c[4] = {kv_code<KT>(kv, h, x.x, is_k), kv_code<KT>(kv, h, x.y, is_k), kv_code<KT>(kv, h, x.z, is_k),
                     kv_code<KT>(kv, h, x.w, is_k)};
    if constexpr (sizeof(KT) == 2) {
      return make_uint2(uint32_t(uint16_t(c[0])) | uint32_t(uint16_t(c[1])) << 16,
                        uint32_t(uint16_t(c[2])) | uint32_t(uint16_t(c[3])) << 16);
    } else {
      return uint32_t(uint8_t(c[0])) | uint32_t(uint8_t(c[1])) << 8 | uint32_t(uint8_t(c[2])) << 16 |
             uint32_t(uint8_t(c[3])) << 24;
    }
  };
  using W = std::conditional_t<sizeof(KT) == 2, uint2, uint32_t>;
  *reinterpret_cast<W*>(static_cast<KT*>(kv.k) + i) = codes(k, true);
  *reinterpret_cast<W*>(static_cast<KT*>(kv.v) + i) = codes(v, false);
}
__device__ __forceinline__ void kv_store4(const KvCacheView& kv, int64_t i, int64_t h, const float4& k, const float4& v) {
  if (kv.type == KvType::BF16) kv_store4_as<uint16_t>(kv, i, h, k, v);
  else if (kv.type == KvType::FP8) kv_store4_as<uint8_t>(kv, i, h, k, v);
  else kv_store4_as<int8_t>(kv, i, h, k, v);
}

// rope_kv_kernel through 16-byte loads and stores (rope_quads_ok): four consecutive dimensions j .. j + 3 of a half
// head a thread, and four cache values a store. The same operations on every element, so the same bits. The
// 4-byte kernel took 30-33 us a layer of a 2048-token llama-3-8b prefill reading FP32 qkv (bf16) and 60 (fp8) /
// 78 (int8-sq) reading the raw sums with their scales, ~2-5x the ~115 MB it moves at the copy bandwidth (H200,
// bench/results/2026-12-04-nvidia-h200-session18.txt, ...-session20.txt).
template <bool kRaw>
__global__ void rope_kv_quads_kernel(float* qkv, int64_t ld, const int32_t* pos, const int32_t* seq, const float* cos_tab,
                                     const float* sin_tab, int64_t heads, const KvCacheView kv, const RawAcc raw) {
  pdl_trigger();
  pdl_wait();
  const int64_t t = blockIdx.x;
  const int64_t hd = kv.head_dim, half = hd / 2, hq = half / 4, kvd = kv.kv_heads * hd, qd = heads * hd;
  const int64_t p = pos[t];
  float* row = qkv + t * ld;
  const float* cs = cos_tab + p * half;
  const float* sn = sin_tab + p * half;
  for (int64_t i = threadIdx.x; i < (heads + kv.kv_heads) * hq; i += blockDim.x) {
    const int64_t col = (i / hq) * hd, j = (i % hq) * 4;
    float4* lo = reinterpret_cast<float4*>(row + col + j);
    float4* hi = reinterpret_cast<float4*>(row + col + j + half);
    const float4 a = kRaw ? raw_value4(raw, t, col + j) : *lo, b = kRaw ? raw_value4(raw, t, col + j + half) : *hi;
    const float4 c = *reinterpret_cast<const float4*>(cs + j), s = *reinterpret_cast<const float4*>(sn + j);
    *lo = make_float4(rope_lo(a.x, b.x, c.x, s.x), rope_lo(a.y, b.y, c.y, s.y), rope_lo(a.z, b.z, c.z, s.z),
                      rope_lo(a.w, b.w, c.w, s.w));
    *hi = make_float4(rope_hi(a.x, b.x, c.x, s.x), rope_hi(a.y, b.y, c.y, s.y), rope_hi(a.z, b.z, c.z, s.z),
                      rope_hi(a.w, b.w, c.w, s.w));
  }
  __syncthreads();
  const int64_t slot = slot_of(kv, seq[t], p);
  for (int64_t j = int64_t(threadIdx.x) * 4; j < kvd; j += int64_t(blockDim.x) * 4) {
    const float4 k = *reinterpret_cast<const float4*>(row + qd + j);
    const float4 v = kRaw ? raw_value4(raw, t, qd + kvd + j) : *reinterpret_cast<const float4*>(row + qd + kvd + j);
    kv_store4(kv, slot * kvd + j, j / hd, k, v);
  }
}

// The end of both decode kernels: every warp has left its softmax state in shared memory (sm_m, sm_l: its
// running max and sum per head of the group; sm_acc: its unnormalized output per head and dimension). Merges
// the warps and writes the output, or for a split launch this split's partial result, after which the last
// block of the (token, head group) merges every split's.
template <int D, int NG>
__device__ __forceinline__ void attention_tail(const AttentionArgs& a, int64_t hd, int64_t t, int64_t kvh, int64_t G,
                                               int64_t g0, int ng, int64_t split, float (&sm_m)[kWarps][NG],
                                               float (&sm_l)[kWarps][NG], float (&sm_acc)[kWarps][NG][D]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < int64_t(ng) * hd; idx += blockDim.x) {
    const int g = int(idx / hd);
    const int64_t d = idx % hd;
    float M = -INFINITY;
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_m[w][g]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < kWarps; ++w) {
        const float f = expf(sm_m[w][g] - M);
        L += sm_l[w][g] * f;
        O += sm_acc[w][g][d] * f;
      }
    }
    const int64_t h = kvh * G + g0 + g;
    if (a.splits == 1) {
      store_out(a, t, h * hd + d, a.heads * hd, O / L);
    } else {
      float* pr = a.partial + ((t * a.heads + h) * a.splits + split) * (hd + 2);
      pr[d] = O;
      if (d == 0) pr[hd] = M, pr[hd + 1] = L;
    }
  }
  if (a.splits == 1) return;
  // Split launch: the last block of this (token, head group) merges every split's partial result.
  if (!last_block(a.counters + t * gridDim.y + blockIdx.y, int(a.splits))) return;
  // Each head's split maxima, then per split the weight exp(M_s - M) (0 for a split with no position) and the
  // weighted sum of L, in shared memory; then every (head, dim) adds its weighted partial outputs, the loads of
  // all splits independent of each other.
  __shared__ float sm_f[NG][kMaxSplits];
  __shared__ float sm_ltot[NG];
  const int S = int(a.splits);
  const float* part = a.partial + (t * a.heads + kvh * G + g0) * S * (hd + 2);  // head g's split s: (g * S + s)
  for (int i = threadIdx.x; i < ng * S; i += blockDim.x) sm_f[i / S][i % S] = __ldcg(part + int64_t(i) * (hd + 2) + hd);
  __syncthreads();
  for (int g = warp; g < ng; g += int(blockDim.x / 32)) {
    float M = -INFINITY;
    for (int s = lane; s < S; s += 32) M = fmaxf(M, sm_f[g][s]);
    M = warp_max(M);
    float L = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float ms = sm_f[g][s];
      const float f = ms == -INFINITY ? 0.f : expf(ms - M);
      L = fmaf(f, __ldcg(part + int64_t(g * S + s) * (hd + 2) + hd + 1), L);
      sm_f[g][s] = f;
    }
    L = warp_sum(L);
    if (lane == 0) sm_ltot[g] = L;
  }
  __syncthreads();
  for (int64_t idx = threadIdx.x; idx < int64_t(ng) * hd; idx += blockDim.x) {
    const int g = int(idx / hd);
    const int64_t d = idx % hd;
    const float* base = part + int64_t(g) * S * (hd + 2) + d;
    float O = 0.f;
#pragma unroll 4
    for (int s = 0; s < S; ++s) O = fmaf(sm_f[g][s], __ldcg(base + int64_t(s) * (hd + 2)), O);
    store_out(a, t, (kvh * G + g0 + g) * hd + d, a.heads * hd, O / sm_ltot[g]);
  }
}

// What one block of the decode kernels covers: token t, query heads kvh * G + g0 .. + ng - 1 (sharing KV head
// kvh), positions [begin, end) of sequence sq (this split's share of the causal, windowed range).
struct DecodeBlock {
  int64_t t, kvh, G, g0, split, sq, begin, end;
  int ng;
};
__device__ __forceinline__ DecodeBlock decode_block(const AttentionArgs& a, const KvCacheView& kv) {
  DecodeBlock b;
  b.G = a.heads / kv.kv_heads;
  const int64_t gchunks = (b.G + kMaxGroup - 1) / kMaxGroup;
  b.t = blockIdx.x, b.kvh = blockIdx.y / gchunks, b.g0 = (blockIdx.y % gchunks) * kMaxGroup;
  b.ng = int(b.G - b.g0 < kMaxGroup ? b.G - b.g0 : kMaxGroup);
  b.split = blockIdx.z;
  const int64_t p = a.pos[b.t];
  b.sq = a.seq[b.t];
  const int64_t lo = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
  b.begin = a.splits > 1 ? lo + b.split * a.chunk : lo;
  b.end = a.splits > 1 ? (b.begin + a.chunk < p + 1 ? b.begin + a.chunk : p + 1) : p + 1;
  return b;
}

// One block per (token, KV head, group of <= kMaxGroup query heads, split); each warp runs an online
// softmax over every fourth position of the block's range, lanes owning head dimensions lane + 32 i.
template <int DPL, typename KT>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const AttentionArgs a, const KvCacheView kv) {
  pdl_trigger();
  pdl_wait();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t hd = kv.head_dim, kvd = kv.kv_heads * hd;
  const DecodeBlock b = decode_block(a, kv);
  const int64_t t = b.t, kvh = b.kvh, G = b.G, g0 = b.g0, split = b.split, sq = b.sq, begin = b.begin, end = b.end;
  const int ng = b.ng;
  const float scale = rsqrtf(float(hd));

  float q[kMaxGroup][DPL], acc[kMaxGroup][DPL], m[kMaxGroup], l[kMaxGroup];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int64_t d = lane + 32 * i;
      q[g][i] = g < ng && d < hd ? a.q[t * a.ldq + ((kvh * G + g0 + g) * hd) + d] * scale : 0.f;
      acc[g][i] = 0.f;
    }
  }
  const float ks = kv.k_scale ? kv.k_scale[kvh] : 1.f, vs = kv.v_scale ? kv.v_scale[kvh] : 1.f;
  const KT* kbase = static_cast<const KT*>(kv.k) + kvh * hd;
  const KT* vbase = static_cast<const KT*>(kv.v) + kvh * hd;
  for (int64_t j = begin + warp; j < end; j += kWarps) {
    const int64_t off = slot_of(kv, sq, j) * kvd;
    float kd[DPL], vd[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      const int64_t d = lane + 32 * i;
      kd[i] = d < hd ? kv_load(kbase + off + d) * ks : 0.f;
      vd[i] = d < hd ? kv_load(vbase + off + d) * vs : 0.f;
    }
#pragma unroll
    for (int g = 0; g < kMaxGroup; ++g) {
      if (g >= ng) break;
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) s = fmaf(q[g][i], kd[i], s);
      s = warp_sum(s);
      const float mn = fmaxf(m[g], s);
      const float corr = expf(m[g] - mn), e = expf(s - mn);
      l[g] = l[g] * corr + e;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[g][i] = fmaf(acc[g][i], corr, e * vd[i]);
      m[g] = mn;
    }
  }
  // Merge the warps' partial softmaxes.
  __shared__ float sm_m[kWarps][kMaxGroup], sm_l[kWarps][kMaxGroup];
  __shared__ float sm_acc[kWarps][kMaxGroup][DPL * 32];
  if (lane == 0)
    for (int g = 0; g < kMaxGroup; ++g) sm_m[warp][g] = m[g], sm_l[warp][g] = l[g];
#pragma unroll
  for (int g = 0; g < kMaxGroup; ++g)
#pragma unroll
    for (int i = 0; i < DPL; ++i) sm_acc[warp][g][lane + 32 * i] = acc[g][i];
  attention_tail<DPL * 32, kMaxGroup>(a, hd, t, kvh, G, g0, ng, split, sm_m, sm_l, sm_acc);
}

// One position's eight cache values (K or V, dims d0..d0+7 at element offset `at`) as raw codes: one 16-byte
// (BF16) or 8-byte (FP8, INT8; in .x and .y) load. kv_cvt8 turns them into dequantized floats. Split in two so
// that a loop can issue the loads of several positions before it needs any of them.
template <typename KT>
__device__ __forceinline__ uint4 kv_raw8(const void* base, int64_t at) {
  if constexpr (sizeof(KT) == 2) {
    return *reinterpret_cast<const uint4*>(static_cast<const uint16_t*>(base) + at);
  } else {
    const uint2 u = *reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(base) + at);
    return make_uint4(u.x, u.y, 0u, 0u);
  }
}
template <typename KT>
__device__ __forceinline__ void kv_cvt8(const uint4 u, float scale, float (&f)[8]) {
  if constexpr (sizeof(KT) == 2) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) f[2 * i] = bf16lo(w[i]), f[2 * i + 1] = bf16hi(w[i]);
  } else {
    const uint32_t w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint8_t b = uint8_t(w[i / 4] >> (8 * (i % 4)));
      f[i] = (std::is_same_v<KT, int8_t> ? float(int8_t(b)) : fp8_to_float(b)) * scale;
    }
  }
}

// Attention for head dims 64 and 128 (most models) wherever the flash kernel does not run (decode, small
// batches): the same blocks as attention_kernel, with NG (>= the block's query heads, a power of two) fixed at
// compile time, so a model with 4 query heads per KV head holds registers for 4, not kMaxGroup (llama-3-8b: 198
// registers and 2 blocks an SM before, 168 and 3 now). A warp takes P = 32 / L positions at a time, L = HD / 8
// lanes each, every lane loading 8 dims of K and V in one 16-byte (BF16) or 8-byte load, and U such steps at
// once: all their block-table and cache loads are issued before the first score is computed, and the U scores
// of a head share one max update (U + 1 exponentials instead of 2 U). Each position slot keeps its own online
// softmax until the end, where the slots are merged with shuffles. U = kUnroll needs more registers than U = 1;
// decode_kernel_for picks between them.
//
// HS > 1 (head split): the block has kWarps * HS warps, HS of them on each position range, each of those taking
// NG / HS of the heads (the K/V loads repeated, from the L1). A warp's work is a chain of dependent instructions
// (shuffle reductions, exponentials, the merge), and with one warp per scheduler nothing hides its latencies:
// at batch 1 (40 blocks of 4 warps on 132 SMs, llama-3-8b) the kernel ran ~2,300 instructions a warp at one per
// 6 cycles (ncu on the H200). Launched where the whole grid is resident at once (decode_kernel_for).
constexpr int kUnroll = 4;

// MinB: the blocks an SM that __launch_bounds__ must leave room for (0: no minimum, the code of the instances
// without it).
//
// R > 0 (ring; HS = 1): the K/V codes come through a ring of R rounds per warp in dynamic shared memory
// (decode_ring_bytes), copied with cp.async R - 1 rounds ahead of the one being summed, instead of into registers
// one round at a time: a warp of the register instances has one round (U steps) in flight and then computes on it
// while its loads wait, ~2 KB a warp at U = 2 (H200, llmq-kbench --only decode, 64 sequences at ctx 160: 1,650 GB/s,
// ~35% of the copy bandwidth; what the ring gained: see kRingU2). Each lane copies and later reads back only its own 16 (BF16) or 8 bytes of a step,
// so no barrier is needed. The token's own position p is never copied (the block that holds it takes it from
// sm_new, where the fused KV write left it), so with fused RoPE every copy may be issued before pdl_wait().
template <typename KT>
using KvRaw = std::conditional_t<sizeof(KT) == 2, uint4, uint2>;
template <typename KT, int U, int R>
constexpr int decode_ring_bytes() { return R * kWarps * U * 2 * 32 * int(sizeof(KvRaw<KT>)); }

// The decode kernels' query heads of block b, rotated (fused RoPE: cs, sn the position's table rows; null without)
// and scaled, into shared memory: each rotation pair (j, j + HD / 2) by one of the block's kThreads threads, all
// its loads issued before any is used. (Each lane computing its own 8 dims of every head, as before, issued ~32
// dependent round trips to the L2 one after another: half of the kernel's stall samples at batch 1, and 15.5 us
// against 12.5 with this, ncu on the H200.) RQ: from the raw qkv accumulators (see attention_decode_kernel).
template <int HD, int NG, int kThreads, bool RQ>
__device__ __forceinline__ void decode_q_to_smem(const AttentionArgs& a, const DecodeBlock& b, bool rope, const float* cs,
                                                 const float* sn, float scale, float (&sm_q)[NG][HD]) {
  constexpr int64_t half = HD / 2;
  constexpr int kPairs = NG * int(half), kIters = (kPairs + kThreads - 1) / kThreads;
  float x0[kIters], x1[kIters], c[kIters], sv[kIters];
#pragma unroll
  for (int r = 0; r < kIters; ++r) {
    const int i = int(threadIdx.x) + r * kThreads, g = i / int(half), j = i % int(half);
    x0[r] = x1[r] = 0.f, c[r] = 1.f, sv[r] = 0.f;
    if (i < kPairs && g < b.ng) {
      if constexpr (RQ) {
        const int64_t col = (b.kvh * b.G + b.g0 + g) * HD + j;
        x0[r] = raw_value(a.q_raw, b.t, col), x1[r] = raw_value(a.q_raw, b.t, col + half);
      } else {
        const float* qh = a.q + b.t * a.ldq + (b.kvh * b.G + b.g0 + g) * HD;
        x0[r] = qh[j], x1[r] = qh[j + half];
      }
      if (rope) c[r] = cs[j], sv[r] = sn[j];
    }
  }
#pragma unroll
  for (int r = 0; r < kIters; ++r) {
    const int i = int(threadIdx.x) + r * kThreads, g = i / int(half), j = i % int(half);
    if (i < kPairs) {
      sm_q[g][j] = (rope ? rope_lo(x0[r], x1[r], c[r], sv[r]) : x0[r]) * scale;
      sm_q[g][j + half] = (rope ? rope_hi(x0[r], x1[r], c[r], sv[r]) : x1[r]) * scale;
    }
  }
}

// Fused KV write of the decode kernels: the block whose range holds the token's own position p rotates its k
// (cs, sn: p's table rows), stores k and v into the cache and keeps the stored codes in sm_new ([0]: K, [1]: V).
template <int HD, typename KT, bool RQ>
__device__ __forceinline__ void decode_kv_write(const AttentionArgs& a, const KvCacheView& kv, const DecodeBlock& b,
                                                int64_t p, const float* cs, const float* sn, KT (&sm_new)[2][HD]) {
  constexpr int64_t half = HD / 2;
  const int64_t kvd = kv.kv_heads * HD, t = b.t, kvh = b.kvh;
  [[maybe_unused]] const float* kh = a.q + t * a.ldq + a.kv_col + kvh * HD;
  const int64_t at = slot_of<uint32_t>(kv, b.sq, p) * kvd + kvh * HD;
  for (int64_t d = threadIdx.x; d < HD; d += blockDim.x) {
    float kf, vf;
    if constexpr (RQ) {  // rope_at's arithmetic on the raw values
      const int64_t col = a.kv_col + kvh * HD, j = d < half ? d : d - half;
      const float x0 = raw_value(a.q_raw, t, col + j), x1 = raw_value(a.q_raw, t, col + j + half);
      kf = d < half ? rope_lo(x0, x1, cs[j], sn[j]) : rope_hi(x0, x1, cs[j], sn[j]);
      vf = raw_value(a.q_raw, t, col + kvd + d);
    } else {
      kf = rope_at(kh, d, half, cs, sn);
      vf = kh[kvd + d];
    }
    const KT kc = kv_code<KT>(kv, kvh, kf, true);
    const KT vc = kv_code<KT>(kv, kvh, vf, false);
    static_cast<KT*>(kv.k)[at + d] = kc;
    static_cast<KT*>(kv.v)[at + d] = vc;
    sm_new[0][d] = kc;
    sm_new[1][d] = vc;
  }
}

// RQ (raw q; with fused RoPE): token t's q, k and v come from the W8A8 qkv GEMM's raw accumulators
// (AttentionArgs::q_raw) with their scales applied as gemm_epilogue applies them (raw_value: the same bits), so
// that the epilogue pass before this kernel goes. An instance of its own: reading raw sums as a run-time choice
// in every instance changed the registers of the tuned ones (see the engine).
template <int HD, typename KT, int NG, int U = kUnroll, int HS = 1, int MinB = 0, int R = 0, bool RQ = false>
__global__ void __launch_bounds__(kWarps * HS * 32, MinB) attention_decode_kernel(const AttentionArgs a, const KvCacheView kv) {
  pdl_trigger();
  static_assert(NG % HS == 0, "the head slices split the block's heads evenly");
  constexpr int L = HD / 8, P = 32 / L, NW = NG / HS;  // NW: heads per warp
  const int lane = threadIdx.x % 32, pw = int(threadIdx.x / 32) % kWarps, hs = int(threadIdx.x / 32) / kWarps;
  const int slot = lane / L, sub = lane % L;  // this lane's position slot and its 8 dims sub*8 .. sub*8+7
  const int64_t kvd = kv.kv_heads * HD;
  // Before pdl_wait() a block reads only what was written before this step began: the batch's pos, seq and
  // block table (uploaded before the step), the cache scales (the model's) and, with fused RoPE
  // (AttentionArgs::prewait, `early`), the cache at the positions of earlier steps. Such a step writes one
  // position per sequence, p, and only this kernel writes it: the first round's other positions are loaded
  // here, overlapping the previous kernel's tail, and p's K/V come from shared memory once the writing block
  // has stored them.
  const DecodeBlock b = decode_block(a, kv);
  const int64_t t = b.t, kvh = b.kvh, G = b.G, g0 = b.g0, split = b.split, sq = b.sq, begin = b.begin, end = b.end;
  const int ng = b.ng;
  const float scale = rsqrtf(float(HD));
  // Fused RoPE (AttentionArgs::rope_cos): the position's table rows.
  constexpr int64_t half = HD / 2;
  const bool rope = a.rope_cos != nullptr;
  const bool early = rope && a.prewait;
  const int64_t p = a.pos[t];
  const float* cs = rope ? a.rope_cos + p * half : nullptr;
  const float* sn = rope ? a.rope_sin + p * half : nullptr;
  // Warp w covers positions j0 .. j0 + P * U - 1 of each round (step u: j0 + u * P + slot).
  uint4 kr[U], vr[U];
  bool ok[U];
  // This lane's 8 values of position j in the cache (element offset).
  auto lane_at = [&](int64_t j) { return slot_of<uint32_t>(kv, sq, j) * kvd + kvh * HD + sub * 8; };
  auto load_round = [&](int64_t j0, bool skip_p) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + u * P + slot;
      ok[u] = j < end;
      kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (ok[u] && !(skip_p && j == p)) {
        const int64_t at = lane_at(j);
        kr[u] = kv_raw8<KT>(kv.k, at);
        vr[u] = kv_raw8<KT>(kv.v, at);
      }
    }
  };
  const int64_t first = begin + pw * P * U;
  constexpr int64_t kStride = kWarps * P * U;  // positions a round of the block's warps covers
  // The ring (R > 0): round r of this warp in stage r % R, step u's K and V of this lane at ring_at(stage, u, 0 | 1).
  static_assert(R == 0 || (HS == 1 && R >= 2), "the ring: one warp per position range, two stages or more");
  using Raw = KvRaw<KT>;
  extern __shared__ __align__(16) unsigned char att_ring[];
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(att_ring));
  auto ring_at = [&](int st, int u, int kvi) { return ((((st * kWarps + pw) * U + u) * 2 + kvi) * 32 + lane) * int(sizeof(Raw)); };
  const bool holds_p = rope && begin <= p && p < end;
  // Copies round j0's steps into ring stage st (not position p where this block holds it; not past end), then
  // commits them as one group (an empty one past the range, so that every round is one group).
  auto issue_round = [&](int64_t j0, int st) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = j0 + u * P + slot;
      if (j < end && !(holds_p && j == p)) {
        const int64_t at = lane_at(j);
        if constexpr (sizeof(KT) == 2) {
          cp_async16(ring_s + uint32_t(ring_at(st, u, 0)), static_cast<const uint16_t*>(kv.k) + at);
          cp_async16(ring_s + uint32_t(ring_at(st, u, 1)), static_cast<const uint16_t*>(kv.v) + at);
        } else {
          cp_async8(ring_s + uint32_t(ring_at(st, u, 0)), static_cast<const uint8_t*>(kv.k) + at);
          cp_async8(ring_s + uint32_t(ring_at(st, u, 1)), static_cast<const uint8_t*>(kv.v) + at);
        }
      }
    }
    cp_async_commit();
  };
  if constexpr (R > 0) {
    if (early)
#pragma unroll
      for (int st = 0; st < R - 1; ++st) issue_round(first + st * kStride, st);
  } else if (early) {
    load_round(first, true);
  }
  const float ks = kv.k_scale ? kv.k_scale[kvh] : 1.f, vs = kv.v_scale ? kv.v_scale[kvh] : 1.f;  // fixed per model
  pdl_wait();

  // The block's query heads, rotated (fused RoPE) and scaled, into shared memory.
  __shared__ __align__(16) float sm_q[NG][HD];
  decode_q_to_smem<HD, NG, kWarps * HS * 32, RQ>(a, b, rope, cs, sn, scale, sm_q);
  // Fused KV write: the block whose range holds the token's own position rotates its k, stores k and v, and
  // only then reads the cache (the stores are visible to the whole block after the barrier; with `early` the
  // stored codes are also kept in shared memory, where the first round takes position p from). No other block
  // reads that position: the other splits end before it, and one block per (KV head, split) exists (at most
  // kMaxGroup query heads per KV head).
  __shared__ __align__(16) KT sm_new[2][HD];  // position p's K and V as stored (early, and the ring)
  if (holds_p) decode_kv_write<HD, KT, RQ>(a, kv, b, p, cs, sn, sm_new);
  __syncthreads();
  auto take_p = [&](int u) {  // step u is position p: its K/V codes from sm_new
    kr[u] = kv_raw8<KT>(sm_new[0], sub * 8);
    vr[u] = kv_raw8<KT>(sm_new[1], sub * 8);
  };
  float q[NW][8], acc[NW][8], m[NW], l[NW];  // this warp's heads hs * NW + g
#pragma unroll
  for (int g = 0; g < NW; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
    const float4 lo = *reinterpret_cast<const float4*>(&sm_q[hs * NW + g][sub * 8]);
    const float4 hi = *reinterpret_cast<const float4*>(&sm_q[hs * NW + g][sub * 8 + 4]);
    q[g][0] = lo.x, q[g][1] = lo.y, q[g][2] = lo.z, q[g][3] = lo.w;
    q[g][4] = hi.x, q[g][5] = hi.y, q[g][6] = hi.z, q[g][7] = hi.w;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }
  // One round's U steps (kr, vr; ok: the position exists) into this warp's online softmax.
  auto consume = [&]() {
    // Scores (every lane runs the shuffles; a slot past the range scores -inf and adds nothing).
    float s[U][NW];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[8];
      kv_cvt8<KT>(kr[u], ks, kf);
#pragma unroll
      for (int g = 0; g < NW; ++g) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(q[g][i], kf[i], d);
#pragma unroll
        for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[u][g] = ok[u] ? d : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < NW; ++g) {
      float mn = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mn = fmaxf(mn, s[u][g]);
      const float corr = mn == -INFINITY ? 1.f : expf(m[g] - mn);
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][g] = s[u][g] == -INFINITY ? 0.f : expf(s[u][g] - mn);  // now the weight of step u
        sum += s[u][g];
      }
      l[g] = fmaf(l[g], corr, sum);
      m[g] = mn;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[8];
      kv_cvt8<KT>(vr[u], vs, vf);
#pragma unroll
      for (int g = 0; g < NW; ++g)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(s[u][g], vf[i], acc[g][i]);
    }
  };
  if constexpr (R > 0) {
    if (!early)
#pragma unroll
      for (int st = 0; st < R - 1; ++st) issue_round(first + st * kStride, st);
    int st = 0;  // round r's stage, r % R
    for (int64_t j0 = first; j0 < end; j0 += kStride) {
      cp_async_wait<R - 2>();  // round r's group (R - 2 later ones may still be in flight)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = j0 + u * P + slot;
        ok[u] = j < end;
        if (!ok[u]) {  // never copied: zeros, as load_round leaves them (0 x garbage could be NaN)
          kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
        } else if (holds_p && j == p) {
          take_p(u);
        } else {
          kr[u] = kv_raw8<KT>(att_ring, ring_at(st, u, 0) / int(sizeof(KT)));
          vr[u] = kv_raw8<KT>(att_ring, ring_at(st, u, 1) / int(sizeof(KT)));
        }
      }
      // Round r + R - 1 into the stage round r - 1 used: its values were read (program order; the copies'
      // asm has a memory clobber) and summed before this point.
      issue_round(j0 + (R - 1) * kStride, st == 0 ? R - 1 : st - 1);
      consume();
      st = st == R - 1 ? 0 : st + 1;
    }
  } else {
    for (int64_t j0 = first; j0 < end; j0 += kStride) {
      if (!early || j0 != first) {
        load_round(j0, false);
      } else if (holds_p) {
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (ok[u] && j0 + u * P + slot == p) take_p(u);
      }
      consume();
    }
  }
  // Merge the warp's P slots (lanes sub, sub + L, ...): max, rescale, sum; every lane ends with the warp's state.
#pragma unroll
  for (int g = 0; g < NW; ++g) {
    float M = m[g];
#pragma unroll
    for (int o = L; o < 32; o <<= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float f = m[g] == -INFINITY ? 0.f : expf(m[g] - M);
    l[g] *= f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] *= f;
#pragma unroll
    for (int o = L; o < 32; o <<= 1) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    }
    m[g] = M;
  }
  __shared__ float sm_m[kWarps][NG], sm_l[kWarps][NG];
  __shared__ float sm_acc[kWarps][NG][HD];
  if (lane == 0)
    for (int g = 0; g < NW; ++g) sm_m[pw][hs * NW + g] = m[g], sm_l[pw][hs * NW + g] = l[g];
  if (slot == 0)
#pragma unroll
    for (int g = 0; g < NW; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) sm_acc[pw][hs * NW + g][sub * 8 + i] = acc[g][i];
  attention_tail<HD, NG>(a, HD, t, kvh, G, g0, ng, split, sm_m, sm_l, sm_acc);
}

// ---- Decode on the tensor cores (AttentionArgs::tensor_cores: the engine's long-context rule; LLMQ_ATTN_TC=0|1) ----
//
// attention_decode_kernel spends ~196 warp instructions per (position, KV head) at 64 sequences (H100, ncu, session
// 35: 0.66 issued a cycle per scheduler with the DRAM at 49%): FP32 dot products, shuffle reductions and
// exponentials for every query head. Here a block (the same one: token, KV head, up to 8 query heads, split) puts
// its query heads on the M rows of mma.m16n8k16 (rows 0..NG-1; rows 8..15 are zero), so that one instruction
// scores 8 positions for all of them. Each warp takes tiles of 16 positions (tile i of the block's range: warp i
// % kWarps), copied raw from the BF16 cache with cp.async into its own two-stage ring (rows padded to HD + 8 so
// that the 4-byte B-fragment reads and ldmatrix rows hit distinct banks); S = Q K^T takes Q as three BF16 parts (hi
// + mid + lo: 24 significant bits, products with the BF16 codes exact in FP32), the online softmax is the existing
// kernels' (natural base, FP32), and O += P V takes P as two BF16 parts and V through ldmatrix.trans. The block's
// warps then merge through attention_tail, as the other decode kernels do. The token's own position p comes from
// sm_new (the fused KV write), never from the cache. BF16 caches only (FP8/INT8: the existing kernels).
// Measured (H100, session 36, llmq-kbench, BF16 cache, 32/8 heads, head dim 128): fewer instructions did not make
// short ranges faster (64 sequences at 160 positions: 26.1 against 24.7 us; one 16-position tile a warp leaves
// most of the block idle), but long ones are: 64 sequences at 1,000 positions 108 against 121 us (80% of the copy
// bandwidth), 16 at 1,000 in one split 52 against 67.
constexpr int kTcTile = 16;  // positions a warp's tile
template <int HD>
__host__ __device__ constexpr int tc_row() { return HD + 8; }  // staged row stride, BF16 elements
template <int HD>
__host__ __device__ constexpr int tc_smem() { return kWarps * 2 * 2 * kTcTile * tc_row<HD>() * 2; }  // warps x stages x (K, V)

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  // A rows 8..15 (a1, a3) are zero: the block has at most 8 query heads.
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// The pair (x, y) as BF16 bits (x low), rounded to nearest, and the residuals x - bf16(x), y - bf16(y).
__device__ __forceinline__ uint32_t bf16_pair(float x, float y, float& rx, float& ry) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  rx = x - __low2float(h), ry = y - __high2float(h);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Four 8x8 b16 matrices from shared memory, transposed (lanes 8i..8i+7 give matrix i's row addresses).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <int HD, int NG, bool RQ = false>
__global__ void __launch_bounds__(kWarps * 32) attention_decode_tc_kernel(const AttentionArgs a, const KvCacheView kv) {
  static_assert(NG <= 8, "query heads on mma rows 0..7");
  pdl_trigger();
  constexpr int KS = HD / 16, NTO = HD / 8, LDR = tc_row<HD>(), TP = kTcTile;
  constexpr int64_t half = HD / 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, tq = lane & 3;
  const DecodeBlock b = decode_block(a, kv);
  const int64_t p = a.pos[b.t], kvd = kv.kv_heads * HD;
  const float* cs = a.rope_cos ? a.rope_cos + p * half : nullptr;
  const float* sn = a.rope_cos ? a.rope_sin + p * half : nullptr;
  const bool holds_p = cs != nullptr && b.begin <= p && p < b.end;
  // This warp's ring: stage st's K rows at ring + st * 2 * TP * LDR, its V rows TP * LDR after them.
  extern __shared__ __align__(16) uint16_t tc_ring[];
  uint16_t* ring = tc_ring + warp * (2 * 2 * TP * LDR);
  // Copies tile j0's K and V codes into stage st (positions past the range and p, where this block holds it, are
  // not copied: V rows past the range are zeroed, since 0 x a stale NaN would be NaN; p's rows come from sm_new
  // after the wait). Always one commit group.
  auto issue = [&](int64_t j0, int st) {
    if (j0 < b.end) {
      uint16_t* kd = ring + st * 2 * TP * LDR;
      uint16_t* vd = kd + TP * LDR;
      constexpr int kChunks = TP * (HD / 8);  // 16-byte pieces of the tile's K (and of its V)
#pragma unroll
      for (int r = 0; r < kChunks / 32; ++r) {
        const int c = lane + 32 * r, row = c / (HD / 8), d0 = (c % (HD / 8)) * 8;
        const int64_t j = j0 + row;
        if (j < b.end && !(holds_p && j == p)) {
          const int64_t at = slot_of<uint32_t>(kv, b.sq, j) * kvd + b.kvh * HD + d0;
          cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(kd + row * LDR + d0)), static_cast<const uint16_t*>(kv.k) + at);
          cp_async16(static_cast<uint32_t>(__cvta_generic_to_shared(vd + row * LDR + d0)), static_cast<const uint16_t*>(kv.v) + at);
        } else if (j >= b.end) {
          *reinterpret_cast<uint4*>(vd + row * LDR + d0) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    cp_async_commit();
  };

  // With fused RoPE and AttentionArgs::prewait, the first tile (earlier steps' positions only: p is skipped) is
  // copied before pdl_wait(), overlapping the previous kernel's tail, as attention_decode_kernel's first rounds.
  const bool early = cs != nullptr && a.prewait;
  constexpr int64_t kStride = int64_t(kWarps) * TP;
  if (early) issue(b.begin + warp * TP, 0);
  pdl_wait();
  __shared__ __align__(16) float sm_q[NG][HD];
  decode_q_to_smem<HD, NG, kWarps * 32, RQ>(a, b, cs != nullptr, cs, sn, rsqrtf(float(HD)), sm_q);
  __shared__ __align__(16) uint16_t sm_new[2][HD];
  if (holds_p) decode_kv_write<HD, uint16_t, RQ>(a, kv, b, p, cs, sn, sm_new);
  __syncthreads();

  // This lane's A fragments of Q: row g (head g), columns 16 kk + 2 tq (+1) and + 8 (+9), three BF16 parts.
  uint32_t qa[3][KS][2];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = kk * 16 + 2 * tq + 8 * h;
      float x = g < b.ng ? sm_q[g < NG ? g : 0][c] : 0.f, y = g < b.ng ? sm_q[g < NG ? g : 0][c + 1] : 0.f;
      float rx, ry;
      qa[0][kk][h] = bf16_pair(x, y, rx, ry);
      x = rx, y = ry;
      qa[1][kk][h] = bf16_pair(x, y, rx, ry);
      qa[2][kk][h] = bf16_pair(rx, ry, x, y);
    }

  float o[NTO][4];
#pragma unroll
  for (int d = 0; d < NTO; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m = -INFINITY, l = 0.f;  // row g's running max, and this lane's share of its sum
  int st = 0;
  if (!early) issue(b.begin + warp * TP, 0);
  for (int64_t j0 = b.begin + warp * TP; j0 < b.end; j0 += kStride) {
    issue(j0 + kStride, st ^ 1);  // the next tile into the other stage (read two tiles ago)
    cp_async_wait<1>();
    const uint16_t* ks = ring + st * 2 * TP * LDR;
    const uint16_t* vs = ks + TP * LDR;
    if (holds_p && p >= j0 && p < j0 + TP) {  // p's codes from the fused KV write: lane i < HD / 8 K's piece i, then V's
      static_assert(HD <= 128, "one 16-byte piece of K or V a lane");
      const int row = int(p - j0);
      if (lane < HD / 8) *reinterpret_cast<uint4*>(const_cast<uint16_t*>(ks) + row * LDR + lane * 8) = *reinterpret_cast<const uint4*>(&sm_new[0][lane * 8]);
      else if (lane < HD / 4) *reinterpret_cast<uint4*>(const_cast<uint16_t*>(vs) + row * LDR + (lane - HD / 8) * 8) = *reinterpret_cast<const uint4*>(&sm_new[1][(lane - HD / 8) * 8]);
    }
    __syncwarp();  // every lane's copies and stores of this tile are visible to the warp

    // S = Q K^T: n-tile jn holds positions j0 + 8 jn .. + 7; sc[jn][0..1]: head g, positions 8 jn + 2 tq (+1).
    float sc[2][4];
#pragma unroll
    for (int jn = 0; jn < 2; ++jn) {
      sc[jn][0] = sc[jn][1] = sc[jn][2] = sc[jn][3] = 0.f;
      const uint16_t* krow = ks + (jn * 8 + g) * LDR + 2 * tq;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
#pragma unroll
        for (int part = 0; part < 3; ++part) mma_bf16_16816(sc[jn], qa[part][kk][0], qa[part][kk][1], b0, b1);
      }
    }
    float mx = -INFINITY;
#pragma unroll
    for (int jn = 0; jn < 2; ++jn)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (j0 + jn * 8 + 2 * tq + e >= b.end) sc[jn][e] = -INFINITY;
        mx = fmaxf(mx, sc[jn][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m, mx);  // finite: position j0 is in the range
    const float corr = m == -INFINITY ? 0.f : expf(m - mn);
    m = mn;
    l *= corr;
#pragma unroll
    for (int d = 0; d < NTO; ++d) o[d][0] *= corr, o[d][1] *= corr;
#pragma unroll
    for (int jn = 0; jn < 2; ++jn)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[jn][e] = sc[jn][e] == -INFINITY ? 0.f : expf(sc[jn][e] - mn);
        l += sc[jn][e];
      }
    // O += P V: P's accumulator layout is the A operand's (n-tiles 0 and 1 make the k-step of 16 positions), in
    // two BF16 parts.
    float r0, r1, r2, r3, u0, u1;
    const uint32_t ph0 = bf16_pair(sc[0][0], sc[0][1], r0, r1), ph2 = bf16_pair(sc[1][0], sc[1][1], r2, r3);
    const uint32_t pl0 = bf16_pair(r0, r1, u0, u1), pl2 = bf16_pair(r2, r3, u0, u1);
    const uint16_t* vrow = vs + ((lane & 7) + ((lane >> 3) & 1) * 8) * LDR + (lane >> 4) * 8;
#pragma unroll
    for (int d = 0; d < NTO; d += 2) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, vrow + d * 8);
      mma_bf16_16816(o[d], ph0, ph2, vb[0], vb[1]);
      mma_bf16_16816(o[d], pl0, pl2, vb[0], vb[1]);
      mma_bf16_16816(o[d + 1], ph0, ph2, vb[2], vb[3]);
      mma_bf16_16816(o[d + 1], pl0, pl2, vb[2], vb[3]);
    }
    __syncwarp();  // this stage is read before the next issue() refills it
    st ^= 1;
  }
  cp_async_wait<0>();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __shared__ float sm_m[kWarps][NG], sm_l[kWarps][NG];
  // The warps' partial outputs go where the rings were (once every warp is done with its ring): 16 KB less static
  // shared memory a block, three blocks an SM instead of two at head dim 128.
  static_assert(sizeof(float) * kWarps * NG * HD <= size_t(tc_smem<HD>()), "sm_acc fits in the rings");
  __syncthreads();
  auto& sm_acc = *reinterpret_cast<float (*)[kWarps][NG][HD]>(tc_ring);
  if (g < NG) {
    if (tq == 0) sm_m[warp][g] = m, sm_l[warp][g] = l;
#pragma unroll
    for (int d = 0; d < NTO; ++d) sm_acc[warp][g][d * 8 + 2 * tq] = o[d][0], sm_acc[warp][g][d * 8 + 2 * tq + 1] = o[d][1];
  }
  attention_tail<HD, NG>(a, HD, b.t, b.kvh, b.G, b.g0, b.ng, b.split, sm_m, sm_l, sm_acc);
}

// ---- Prefill: flash attention on the tensor cores ----
//
// One CTA per (tile of <= 64 query tokens of one sequence, query head); each of its 4 warps owns 16 query
// rows. K and V tiles of 64 positions are read from the paged cache (any KV type), converted to FP16 and
// staged in shared memory; S = Q K^T and O += P V run on mma.m16n8k16 (FP16 inputs, FP32 accumulators) with
// the online softmax in FP32 (base 2; the 1/sqrt(hd) scale and log2(e) are folded into Q). FP16 rather than
// BF16 operands (11 significant bits); Q is split in two FP16 parts, so only P and the K/V conversion round.
constexpr int kFlashWarps = 4;

__device__ __forceinline__ uint32_t half2_bits(float a, float b) {
  const __half2 h = __floats2half2_rn(fminf(fmaxf(a, -65504.f), 65504.f), fminf(fmaxf(b, -65504.f), 65504.f));
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
               "{%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Eight cache values (K or V of one position, dims d0..d0+7) as FP16, into 16 bytes of shared memory.
__device__ __forceinline__ void stage8(const KvCacheView& kv, const void* base, int64_t at, float scale, __half* dst) {
  float f[8];
  kv_load8(kv, base, at, scale, f);
  uint4 o;
  o.x = half2_bits(f[0], f[1]);
  o.y = half2_bits(f[2], f[3]);
  o.z = half2_bits(f[4], f[5]);
  o.w = half2_bits(f[6], f[7]);
  *reinterpret_cast<uint4*>(dst) = o;
}

// kPipe (the default; LLMQ_FLASH_PIPE=0 for the plain instance): the K/V tiles come through a two-stage cp.async
// ring of the cache's raw codes in dynamic shared memory (flash_pipe_smem bytes): tile kt + 1's copies are in
// flight while tile kt is converted and multiplied. Without it each tile's loads (a block-table entry, then K and
// V; eight of each a thread) and the tensor-core work take turns between barriers. H200, llama-3-8b cut to 4
// layers, 2048-token prefill, this kernel's median CUPTI duration (one layer's attention): 498-520 us with the ring,
// 722-734 without (bf16, fp8, int8-sq; bench/results/2026-12-04-nvidia-h200-session19.txt).
constexpr int kFlashBN = 64;  // positions per K/V tile
template <int HD>
constexpr size_t flash_pipe_smem() { return size_t(2) * 2 * kFlashBN * HD * 2; }  // 2 stages x K, V x BF16 size

// Copies tile kt's K and V codes (positions kt .. min(kt + BN - 1, kend)) of KV head kvh into raw (K: [BN][HD]
// codes, V after it), as cp.async by all the block's NW warps. Positions past kend are not copied.
template <int HD, int NW>
__device__ __forceinline__ void flash_issue(const KvCacheView& kv, int64_t sq, int64_t kvh, int kt, int kend, uint8_t* raw) {
  const int esz = kv.type == KvType::BF16 ? 2 : 1;
  const int64_t kvd = kv.kv_heads * HD;
  uint8_t* rv = raw + kFlashBN * HD * esz;
  for (int i = threadIdx.x; i < kFlashBN * (HD / 8); i += NW * 32) {
    const int key = i / (HD / 8), d0 = (i % (HD / 8)) * 8, j = kt + key;
    if (j > kend) continue;
    const int64_t at = (slot_of<uint32_t>(kv, sq, j) * kvd + kvh * HD + d0) * esz;
    const int64_t to = int64_t(key * HD + d0) * esz;
    const uint32_t dk = static_cast<uint32_t>(__cvta_generic_to_shared(raw + to));
    const uint32_t dv = static_cast<uint32_t>(__cvta_generic_to_shared(rv + to));
    if (esz == 2) {
      cp_async16(dk, static_cast<const uint8_t*>(kv.k) + at);
      cp_async16(dv, static_cast<const uint8_t*>(kv.v) + at);
    } else {
      cp_async8(dk, static_cast<const uint8_t*>(kv.k) + at);
      cp_async8(dv, static_cast<const uint8_t*>(kv.v) + at);
    }
  }
}

// HPB (heads a block; 2 is the default at head dim 128 where the group is even, LLMQ_FLASH_GQA=1 gives 1): query
// heads of one KV head that share the block's K/V tiles, four warps each (HPB x 4 warps), so that each tile is
// loaded and converted once for HPB heads.
// kQLo (default; LLMQ_FLASH_Q1=1 drops it, opt-in): Q's second FP16 part and its mma (a third of the tensor-core
// work and 32 registers a thread): Q keeps 22 significant bits (hi + lo) in the scores instead of FP16's 11.
template <int HD, bool kPipe = false, int HPB = 1, bool kQLo = true>
__global__ void __launch_bounds__(HPB * kFlashWarps * 32) flash_prefill_kernel(const AttentionArgs a, const KvCacheView kv) {
  constexpr int NW = HPB * kFlashWarps;
  pdl_trigger();
  pdl_wait();
  constexpr int BN = kFlashBN;  // positions per K/V tile
  constexpr int KS = HD / 16;   // k-steps of S = Q K^T
  constexpr int NT = HD / 8;    // n-tiles of O
  constexpr int LDS = HD + 8;   // shared row stride in halves: 16 bytes of padding keep the reads conflict-free
  __shared__ __align__(16) __half ks[BN * LDS];
  __shared__ __align__(16) __half vs[BN * LDS];
  __shared__ int s_lo, s_hi;
  const int64_t tile = a.n_tiles - 1 - blockIdx.x;  // the last tiles of a sequence have the most positions: first
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) % kFlashWarps, g = lane >> 2, tq = lane & 3;
  const int h = blockIdx.y * HPB + int(threadIdx.x >> 5) / kFlashWarps;  // (HPB divides heads / kv_heads)
  const int t0 = a.tiles[2 * tile], n = a.tiles[2 * tile + 1];
  const int64_t sq = a.seq[t0], kvd = kv.kv_heads * HD;
  const int64_t kvh = h / (a.heads / kv.kv_heads);

  if (threadIdx.x == 0) s_lo = 0x7fffffff, s_hi = -1;
  __syncthreads();
  if (int(threadIdx.x) < n) {
    const int p = a.pos[t0 + threadIdx.x];
    atomicMin(&s_lo, a.window > 0 && p - a.window + 1 > 0 ? int(p - a.window + 1) : 0);
    atomicMax(&s_hi, p);
  }
  // This lane's two query rows (g and g + 8 of the warp's 16); rows past n repeat the last (never stored).
  const int r0 = warp * 16 + g, r1 = r0 + 8;
  const int64_t q0t = t0 + (r0 < n ? r0 : n - 1), q1t = t0 + (r1 < n ? r1 : n - 1);
  const int p0 = a.pos[q0t], p1 = a.pos[q1t];
  const int lo0 = a.window > 0 && p0 - a.window + 1 > 0 ? int(p0 - a.window + 1) : 0;
  const int lo1 = a.window > 0 && p1 - a.window + 1 > 0 ? int(p1 - a.window + 1) : 0;
  const float qs = rsqrtf(float(HD)) * 1.4426950408889634f;
  // Q as two FP16 parts, q = hi + lo (22 significant bits): S = hi K + lo K keeps the scores as exact as FP32
  // products of the cached K, so W8A8 models see the same o_proj inputs as with FP32 attention.
  uint32_t qf[KS][4], ql[kQLo ? KS : 1][4];
  {
    const float* q0 = a.q + q0t * a.ldq + int64_t(h) * HD;
    const float* q1 = a.q + q1t * a.ldq + int64_t(h) * HD;
    auto split = [&](float x, float y, uint32_t& hi, uint32_t& lo) {
      hi = half2_bits(x, y);
      const __half2 hh = *reinterpret_cast<const __half2*>(&hi);
      lo = half2_bits(x - __low2float(hh), y - __high2float(hh));
    };
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
      const int c = kk * 16 + 2 * tq, kl = kQLo ? kk : 0;  // (without kQLo, ql is scratch)
      split(q0[c] * qs, q0[c + 1] * qs, qf[kk][0], ql[kl][0]);
      split(q1[c] * qs, q1[c + 1] * qs, qf[kk][1], ql[kl][1]);
      split(q0[c + 8] * qs, q0[c + 9] * qs, qf[kk][2], ql[kl][2]);
      split(q1[c + 8] * qs, q1[c + 9] * qs, qf[kk][3], ql[kl][3]);
    }
  }
  float o[NT][4];
#pragma unroll
  for (int d = 0; d < NT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // l: this lane's share of the row sums
  const float ksc = kv.k_scale ? kv.k_scale[kvh] : 1.f, vsc = kv.v_scale ? kv.v_scale[kvh] : 1.f;
  __syncthreads();
  const int kbeg = (s_lo / BN) * BN, kend = s_hi;
  extern __shared__ __align__(16) uint8_t flash_raw[];  // kPipe: two stages of K and V codes
  constexpr int kStage = 2 * BN * HD * 2;
  if constexpr (kPipe) {
    flash_issue<HD, NW>(kv, sq, kvh, kbeg, kend, flash_raw);
    cp_async_commit();
  }

  for (int kt = kbeg, it = 0; kt <= kend; kt += BN, ++it) {
    if constexpr (kPipe) {
      // The next tile's copies into the other stage (converted out of it two barriers ago), then this tile's.
      if (kt + BN <= kend) flash_issue<HD, NW>(kv, sq, kvh, kt + BN, kend, flash_raw + ((it + 1) & 1) * kStage);
      cp_async_commit();
      cp_async_wait<1>();
    }
    __syncthreads();  // the previous tile has been read (kPipe: and every thread's copies of this one landed)
    const uint8_t* rk = flash_raw + (it & 1) * kStage;
    const uint8_t* rv = rk + BN * HD * (kv.type == KvType::BF16 ? 2 : 1);
    for (int i = threadIdx.x; i < BN * (HD / 8); i += NW * 32) {
      const int key = i / (HD / 8), d0 = (i % (HD / 8)) * 8, j = kt + key;
      __half* kd = ks + key * LDS + d0;
      __half* vd = vs + key * LDS + d0;
      if (j <= kend) {
        if constexpr (kPipe) {
          stage8(kv, rk, key * HD + d0, ksc, kd);
          stage8(kv, rv, key * HD + d0, vsc, vd);
        } else {
          const int64_t at = slot_of(kv, sq, j) * kvd + kvh * HD + d0;
          stage8(kv, kv.k, at, ksc, kd);
          stage8(kv, kv.v, at, vsc, vd);
        }
      } else {
        *reinterpret_cast<uint4*>(kd) = make_uint4(0u, 0u, 0u, 0u);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    __syncthreads();
    // S = Q K^T for 64 positions: n-tile jn holds positions kt + 8 jn .. + 7.
    float sc[BN / 8][4];
#pragma unroll
    for (int jn = 0; jn < BN / 8; ++jn) {
      sc[jn][0] = sc[jn][1] = sc[jn][2] = sc[jn][3] = 0.f;
      const __half* krow = ks + (jn * 8 + g) * LDS + 2 * tq;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(krow + kk * 16);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(krow + kk * 16 + 8);
        mma_f16(sc[jn], qf[kk], b0, b1);
        if constexpr (kQLo) mma_f16(sc[jn], ql[kk], b0, b1);
      }
    }
    // Causal (and sliding-window) mask, then the online softmax of rows r0 (c0, c1) and r1 (c2, c3).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int jn = 0; jn < BN / 8; ++jn)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = kt + jn * 8 + 2 * tq + (e & 1);
        const bool ok = e < 2 ? (j <= p0 && j >= lo0) : (j <= p1 && j >= lo1);
        if (!ok) sc[jn][e] = -INFINITY;
        if (e < 2) mx0 = fmaxf(mx0, sc[jn][e]);
        else mx1 = fmaxf(mx1, sc[jn][e]);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A row with no position yet keeps base 0: exp2(-inf - 0) = 0, never inf - inf.
    const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
    const float c0 = exp2f(m0 - b0), c1 = exp2f(m1 - b1);
    m0 = mn0, m1 = mn1;
    l0 *= c0, l1 *= c1;
#pragma unroll
    for (int d = 0; d < NT; ++d) o[d][0] *= c0, o[d][1] *= c0, o[d][2] *= c1, o[d][3] *= c1;
#pragma unroll
    for (int jn = 0; jn < BN / 8; ++jn) {
      sc[jn][0] = exp2f(sc[jn][0] - b0), sc[jn][1] = exp2f(sc[jn][1] - b0);
      sc[jn][2] = exp2f(sc[jn][2] - b1), sc[jn][3] = exp2f(sc[jn][3] - b1);
      l0 += sc[jn][0] + sc[jn][1];
      l1 += sc[jn][2] + sc[jn][3];
    }
    // O += P V: P's accumulator layout is the A operand's (two n-tiles make one k-step of 16 positions).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {half2_bits(sc[2 * kk][0], sc[2 * kk][1]), half2_bits(sc[2 * kk][2], sc[2 * kk][3]),
                              half2_bits(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                              half2_bits(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
      const __half* vrow = vs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + (lane >> 4) * 8;
#pragma unroll
      for (int d = 0; d < NT; d += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vrow + d * 8);
        mma_f16(o[d], pa, vb[0], vb[1]);
        mma_f16(o[d + 1], pa, vb[2], vb[3]);
      }
    }
  }
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float i0 = 1.f / l0, i1 = 1.f / l1;
  const int64_t od = a.heads * HD;
#pragma unroll
  for (int d = 0; d < NT; ++d) {
    const int64_t col = int64_t(h) * HD + d * 8 + 2 * tq;
    if (r0 < n) {
      store_out(a, t0 + r0, col, od, o[d][0] * i0);
      store_out(a, t0 + r0, col + 1, od, o[d][1] * i0);
    }
    if (r1 < n) {
      store_out(a, t0 + r1, col, od, o[d][2] * i1);
      store_out(a, t0 + r1, col + 1, od, o[d][3] * i1);
    }
  }
}

// Whether the card grants `kernel` the cp.async ring's dynamic shared memory (asked once per instance).
template <int HD>
bool flash_grant(void (*kernel)(AttentionArgs, KvCacheView)) {
  const bool granted = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(flash_pipe_smem<HD>())) ==
                       cudaSuccess;
  if (!granted) {
    cudaGetLastError();
    std::fprintf(stderr, "llmq: note: the card grants no %zu bytes of dynamic shared memory; "
                 "prefill attention stays on the plain kernel\n", flash_pipe_smem<HD>());
  }
  return granted;
}

// The cp.async instance (kPipe), where the card grants its dynamic shared memory and LLMQ_FLASH_PIPE is not 0.
template <int HD>
bool flash_pipe() {
  static const bool ok = [] {
    return !env_off("LLMQ_FLASH_PIPE") && flash_grant<HD>(flash_prefill_kernel<HD, true>);
  }();
  return ok;
}

// Head dim 128 with the ring: the instance by head group and switches. H200, llama-3-8b (32 heads, 8 KV heads),
// 2048-token prefill, CUPTI median a layer (bench/results/2026-12-04-nvidia-h200-session20.txt): one head a block
// 493 us, two (the default; LLMQ_FLASH_GQA=1 for one) 400 us, two with LLMQ_FLASH_Q1=1 (Q as one FP16 part,
// opt-in: scores rounded as FP16 Q gives, for 4% more) 384 us.
struct FlashVariant {
  void (*kernel)(AttentionArgs, KvCacheView) = nullptr;  // null: the default instance
  int hpb = 1;                                            // query heads a block
};
FlashVariant flash_variant_128(int64_t group) {
  using K = void (*)(AttentionArgs, KvCacheView);
  static const int gqa = [] {
    const char* e = std::getenv("LLMQ_FLASH_GQA");
    return e && std::atoi(e) == 1 ? 1 : 2;
  }();
  static const bool q1 = env_flag("LLMQ_FLASH_Q1");
  const int hpb = gqa == 2 && group % 2 == 0 ? 2 : 1;
  if (hpb == 1 && !q1) return {};
  auto granted = [](K k) { return flash_grant<128>(k) ? k : nullptr; };
  static const K k21 = granted(flash_prefill_kernel<128, true, 2, true>);
  static const K k12 = granted(flash_prefill_kernel<128, true, 1, false>);
  static const K k22 = granted(flash_prefill_kernel<128, true, 2, false>);
  return {hpb == 2 ? (q1 ? k22 : k21) : k12, hpb};
}

template <int HD>
void launch_flash(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  const dim3 grid(unsigned(a.n_tiles), unsigned(a.heads));
  const bool pipe = flash_pipe<HD>();
  if constexpr (HD == 128) {
    if (pipe)
      if (const FlashVariant v = flash_variant_128(a.heads / kv.kv_heads); v.kernel)
        return launch("flash_prefill_kernel", v.kernel, dim3(grid.x, unsigned(a.heads / v.hpb)), v.hpb * kFlashWarps * 32,
                      flash_pipe_smem<HD>(), s, a, kv);
  }
  if (pipe)
    return launch("flash_prefill_kernel", flash_prefill_kernel<HD, true>, grid, kFlashWarps * 32, flash_pipe_smem<HD>(), s, a, kv);
  launch("flash_prefill_kernel", flash_prefill_kernel<HD>, grid, kFlashWarps * 32, 0, s, a, kv);
}

// A decode kernel (one block per token, head group and split; see DecodeBlock), instantiated for the cache type.
using DecodeKernel = void (*)(AttentionArgs, KvCacheView);
dim3 decode_grid(const AttentionArgs& a, const KvCacheView& kv) {
  const int64_t G = a.heads / kv.kv_heads;
  return dim3(unsigned(a.T), unsigned(kv.kv_heads * ((G + kMaxGroup - 1) / kMaxGroup)), unsigned(a.splits));
}
void launch_blocks(const char* name, DecodeKernel bf16, DecodeKernel fp8, DecodeKernel i8, const AttentionArgs& a,
                   const KvCacheView& kv, cudaStream_t s) {
  launch(name, kv.type == KvType::BF16 ? bf16 : kv.type == KvType::FP8 ? fp8 : i8, decode_grid(a, kv), kWarps * 32, 0, s, a, kv);
}

// The dynamic shared memory of an attention_decode_kernel instance (its ring; 0 without one), granted to the
// kernel once (past the default 48 KB a block) before its first launch or occupancy query.
template <int HD, typename KT, int NG, int U, int HS, int MinB, int R, bool RQ = false>
int decode_smem() {
  if constexpr (R == 0) {
    return 0;
  } else {
    static const int bytes = [] {
      constexpr int b = decode_ring_bytes<KT, U, R>();
      LLMQ_CUDA_CHECK(cudaFuncSetAttribute(attention_decode_kernel<HD, KT, NG, U, HS, MinB, R, RQ>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, b));
      return b;
    }();
    return bytes;
  }
}

// Blocks of one attention_decode_kernel instance resident on the card at once.
template <int HD, typename KT, int NG, int U, int HS, int MinB = 0, int R = 0>
int64_t decode_resident() {
  static const int64_t resident = [] {
    int per_sm = 0, dev = 0, sms = 0;
    LLMQ_CUDA_CHECK(cudaGetDevice(&dev));
    LLMQ_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    LLMQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, attention_decode_kernel<HD, KT, NG, U, HS, MinB, R>,
                                                                  kWarps * HS * 32, size_t(decode_smem<HD, KT, NG, U, HS, MinB, R>())));
    return int64_t(per_sm) * sms;
  }();
  return resident;
}

// Where the one-step kernel would run (batch 64 of llama-3-8b: 512 blocks) and a block has at most 4 query heads,
// the instance with two positions a warp in flight, held to 128 registers (8 bytes of spill at sm_90a) so that as
// many blocks stay resident as with one step (four an SM). At batch 64 each block walks its ~160-position range in
// 20 steps, each a load round trip and then the arithmetic on it; two in flight halve the round trips. H200,
// llmq-kbench --only decode, 64 sequences, ctx 160, BF16 cache: 31.5 us one step / 25.4 two; llama-3-8b cut to 4
// layers, batch 64, tpot bf16 1.084 / 1.053 ms, fp8 0.888 / 0.858 (bench/results/2026-12-04-nvidia-h200-session19.txt).
// LLMQ_ATTN_U2=0: one step (comparisons). LLMQ_ATTN_U2=2: the two-step instance wherever the unrolled and
// head-split ones are not taken (for tests; with LLMQ_ATTN_NO_HEADSPLIT=1 every launch of at most 4 heads a block).
int attn_u2() {
  static const int v = [] {
    const char* e = std::getenv("LLMQ_ATTN_U2");
    return e && *e ? std::atoi(e) : 1;
  }();
  return v;
}

// The two-step instance loads its K/V through a cp.async ring of kRingU2 rounds (attention_decode_kernel's R).
// H100, llmq-kbench --only decode (32 heads / 8 KV heads / hd 128, BF16 cache), us with registers / ring, two
// rounds: 64 sequences at ctx 160 27.3, 26.7 / 24.6, 24.8; at ctx 1000 136.9, 136.8 / 121.8, 121.9 (64% -> 72% of
// the copy bandwidth) (bench/results/2026-12-06-nvidia-h100-session33.txt). Until session 42 LLMQ_ATTN_RING=0 kept
// the register instance (comparisons) and =2 gave the unrolled one-wave instance a ring too (R = 3; opt-in: 16
// sequences at ctx 1000 47.5 -> 42.0 us, but 16 at ctx 160 17.4 -> 18.1-20.6 and one sequence 8.2 -> 9.3). Their
// 42 instances (a quarter of this file's machine code, a third of its compile time, on every architecture) were
// removed; both are in git history (a07e845) should a long-context rule want the second back.
constexpr int kRingU2 = 4;  // ring rounds (stages) of the two-step instance

// LLMQ_ATTN_NO_HEADSPLIT=1: never the head-split instances (comparisons).
bool no_head_split() {
  static const bool off = env_flag("LLMQ_ATTN_NO_HEADSPLIT");
  return off;
}

// The instance for a launch of `blocks` blocks: where they are all resident at once, the head-split kernel (HS
// = NG up to 4 warps per position range) or else the unrolled one; past that one step at a time, which needs
// fewer registers and so keeps more blocks resident. H200, llmq-kbench --only decode, 32 heads / 8 KV heads / hd
// 128, ctx 160, BF16 cache, us unrolled / one step: 1 sequence (16 splits) 17.4 / 16.5, 8 splits 15.0 / 15.7; 16
// sequences (3 splits, 384 blocks) 20.2 / 23.5; 64 sequences (1 split, 512 blocks, more than the 3 x 132
// resident unrolled) 42.3 / 34.1 (bench/results/2026-12-02-nvidia-h200-session9.txt). Head split against the
// unrolled kernel (both with the query in shared memory): 1 sequence, 8 splits 7.43 / 12.25; 16 sequences, 1
// split (128 blocks) 11.24 / 17.18 (bench/results/2026-12-04-nvidia-h200-session13.txt).
struct DecodeChoice {
  DecodeKernel kernel;
  int warps;
  bool one_wave;  // every block resident at once
  int smem = 0;   // dynamic shared memory (the ring instances: > 0)
  DecodeKernel raw_q = nullptr;  // the same instance reading raw qkv accumulators (RQ), where there is one
};
// Warps per position range of the head-split instance for NG heads a block (1: none).
template <int NG>
constexpr int kHeadSplit = NG < 4 ? NG : 4;
template <int HD, typename KT, int NG>
DecodeChoice decode_kernel_for(int64_t blocks) {
  constexpr int HS = kHeadSplit<NG>;
  if constexpr (HS > 1)
    if (!no_head_split() && blocks <= decode_resident<HD, KT, NG, kUnroll, HS>())
      return {attention_decode_kernel<HD, KT, NG, kUnroll, HS>, kWarps * HS, true};
  if (attn_u2() != 2 && blocks <= decode_resident<HD, KT, NG, kUnroll, 1>()) return {attention_decode_kernel<HD, KT, NG>, kWarps, true};
  if constexpr (NG <= 4)  // (eight heads a block spill ~1 KB a thread at 128 registers)
    if (attn_u2() == 2 || (attn_u2() == 1 && blocks <= decode_resident<HD, KT, NG, 2, 1, 4, kRingU2>())) {
      decode_smem<HD, KT, NG, 2, 1, 4, kRingU2, true>();  // (the same bytes; granted to the RQ instance too)
      return {attention_decode_kernel<HD, KT, NG, 2, 1, 4, kRingU2>, kWarps,
              blocks <= decode_resident<HD, KT, NG, 2, 1, 4, kRingU2>(), decode_smem<HD, KT, NG, 2, 1, 4, kRingU2>(),
              attention_decode_kernel<HD, KT, NG, 2, 1, 4, kRingU2, true>};
    }
  return {attention_decode_kernel<HD, KT, NG, 1>, kWarps, false};
}
template <int HD, int NG>
DecodeChoice decode_choice(KvType t, int64_t blocks) {
  return t == KvType::BF16 ? decode_kernel_for<HD, uint16_t, NG>(blocks)
         : t == KvType::FP8 ? decode_kernel_for<HD, uint8_t, NG>(blocks)
                            : decode_kernel_for<HD, int8_t, NG>(blocks);
}
// attention_decode_tc_kernel (BF16 caches, at least two query heads a KV head): where the launch asks for it
// (AttentionArgs::tensor_cores), or always (LLMQ_ATTN_TC=1) or never (=0).
bool use_decode_tc(const AttentionArgs& a) {
  static const bool on = env_flag("LLMQ_ATTN_TC"), off = env_off("LLMQ_ATTN_TC");
  return on || (!off && a.tensor_cores);
}
template <int HD, int NG>
void launch_decode_tc(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  static const bool granted = [] {
    LLMQ_CUDA_CHECK(cudaFuncSetAttribute(attention_decode_tc_kernel<HD, NG, false>, cudaFuncAttributeMaxDynamicSharedMemorySize, tc_smem<HD>()));
    LLMQ_CUDA_CHECK(cudaFuncSetAttribute(attention_decode_tc_kernel<HD, NG, true>, cudaFuncAttributeMaxDynamicSharedMemorySize, tc_smem<HD>()));
    return true;
  }();
  (void)granted;
  launch("attention_decode_tc_kernel", a.q_raw.acc ? attention_decode_tc_kernel<HD, NG, true> : attention_decode_tc_kernel<HD, NG, false>,
         decode_grid(a, kv), dim3(unsigned(kWarps * 32)), size_t(tc_smem<HD>()), s, a, kv);
}

template <int HD, int NG>
void launch_decode_ng(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  if constexpr (NG >= 2)
    if (kv.type == KvType::BF16 && use_decode_tc(a)) return launch_decode_tc<HD, NG>(a, kv, s);
  const int64_t blocks = attention_counters(a.T, a.heads, kv.kv_heads) * a.splits;
  const DecodeChoice c = decode_choice<HD, NG>(kv.type, blocks);
  // Pre-wait cache loads (AttentionArgs::prewait) only where every block of the launch is resident at once: a
  // 64-sequence step (512 blocks, one position at a time) was 2.5% slower with them (H200, 4-layer llama-3-8b,
  // bf16 1.111 against 1.084 ms, w4a16 1.678 against 1.658), a one-sequence step 0-2.5% faster.
  // The ring instances' early copies hold no registers: they are issued before the wait wherever RoPE is fused.
  if (a.q_raw.acc && !c.raw_q) throw Error("attention: raw qkv accumulators where the decode kernel cannot read them");
  AttentionArgs b = a;
  b.prewait = a.prewait && (c.one_wave || c.smem > 0);
  static const bool show = env_flag("LLMQ_ATTN_SHOW");  // which instance a launch takes (diagnostics)
  if (show)
    std::fprintf(stderr, "llmq: attention decode: %lld blocks, %d warps, ring %d (%d B), one wave %d, prewait %d\n",
                 (long long)blocks, c.warps, int(c.smem > 0), c.smem, int(c.one_wave), int(b.prewait));
  launch("attention_decode_kernel", a.q_raw.acc ? c.raw_q : c.kernel, decode_grid(a, kv), dim3(unsigned(c.warps * 32)),
         size_t(c.smem), s, b, kv);
}
template <int HD, int NG>
int64_t decode_wave_ng(KvType t) {
  constexpr int HS = kHeadSplit<NG>;
  if constexpr (HS > 1) {
    if (no_head_split()) return 0;
    return t == KvType::BF16 ? decode_resident<HD, uint16_t, NG, kUnroll, HS>()
           : t == KvType::FP8 ? decode_resident<HD, uint8_t, NG, kUnroll, HS>()
                              : decode_resident<HD, int8_t, NG, kUnroll, HS>();
  }
  return 0;
}
template <int HD>
int64_t decode_wave(const KvCacheView& kv, int64_t heads) {
  const int64_t G = std::min<int64_t>(heads / kv.kv_heads, kMaxGroup);
  return G <= 1 ? decode_wave_ng<HD, 1>(kv.type) : G <= 2 ? decode_wave_ng<HD, 2>(kv.type)
         : G <= 4 ? decode_wave_ng<HD, 4>(kv.type) : decode_wave_ng<HD, 8>(kv.type);
}

template <int HD, int NG>
bool decode_raw_q_ng(const KvCacheView& kv, int64_t blocks) {
  return decode_choice<HD, NG>(kv.type, blocks).raw_q != nullptr;
}
template <int HD>
bool decode_raw_q(const KvCacheView& kv, int64_t heads, int64_t blocks) {
  const int64_t G = std::min<int64_t>(heads / kv.kv_heads, kMaxGroup);
  return G <= 1 ? decode_raw_q_ng<HD, 1>(kv, blocks) : G <= 2 ? decode_raw_q_ng<HD, 2>(kv, blocks)
         : G <= 4 ? decode_raw_q_ng<HD, 4>(kv, blocks) : decode_raw_q_ng<HD, 8>(kv, blocks);
}

// The block's query heads (G, at most kMaxGroup) rounded up to a power of two: registers for no more heads
// than a block has (llama-3-8b: 4, llama-2-7b: 1).
template <int HD>
void launch_decode(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  const int64_t G = std::min<int64_t>(a.heads / kv.kv_heads, kMaxGroup);
  if (G <= 1) return launch_decode_ng<HD, 1>(a, kv, s);
  if (G <= 2) return launch_decode_ng<HD, 2>(a, kv, s);
  if (G <= 4) return launch_decode_ng<HD, 4>(a, kv, s);
  launch_decode_ng<HD, 8>(a, kv, s);
}

template <int DPL>
void launch_attention(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  launch_blocks("attention_kernel", attention_kernel<DPL, uint16_t>, attention_kernel<DPL, uint8_t>,
                attention_kernel<DPL, int8_t>, a, kv, s);
}

// rope_kv_quads_kernel for prefill steps (more than 64 tokens; decode steps keep the 4-byte kernel) where every row,
// table row and cache element it touches 16 at a time is aligned. The default since session 21 (LLMQ_ROPE_QUADS=0: the
// 4-byte kernel): a llama-3-8b layer at 2048 tokens on an H200, bf16 29.5 -> 24.9 us, fp8 45 -> 35, int8-sq 58 -> 51.
bool rope_quads_ok(const float* qkv, int64_t ld, int64_t T, const float* cos_tab, const float* sin_tab,
                   const KvCacheView& kv, const RawAcc* raw) {
  static const bool on = !env_off("LLMQ_ROPE_QUADS");
  if (!on || T <= 64 || kv.head_dim % 8 || ld % 4 || !aligned16(qkv) || !aligned16(cos_tab) || !aligned16(sin_tab)) return false;
  const size_t esz = kv.type == KvType::BF16 ? 8 : 4;  // four cache elements
  if (reinterpret_cast<uintptr_t>(kv.k) % esz || reinterpret_cast<uintptr_t>(kv.v) % esz) return false;
  return !(raw && raw->acc) || (raw->ld % 4 == 0 && aligned16(raw->acc) && (!raw->w_scale || aligned16(raw->w_scale)));
}

}  // namespace

void rope_kv(float* qkv, int64_t ld, int64_t T, const int32_t* pos, const int32_t* seq, const float* cos_tab,
             const float* sin_tab, int64_t heads, const KvCacheView& kv, cudaStream_t s, const RawAcc* raw) {
  if (T == 0) return;
  const bool from_raw = raw && raw->acc;
  const RawAcc in = from_raw ? *raw : RawAcc{};
  if (rope_quads_ok(qkv, ld, T, cos_tab, sin_tab, kv, raw))
    return launch("rope_kv_quads_kernel", from_raw ? rope_kv_quads_kernel<true> : rope_kv_quads_kernel<false>, unsigned(T),
                  256, 0, s, qkv, ld, pos, seq, cos_tab, sin_tab, heads, kv, in);
  launch("rope_kv_kernel", from_raw ? rope_kv_kernel<true> : rope_kv_kernel<false>, unsigned(T), 256, 0, s, qkv, ld, pos, seq,
         cos_tab, sin_tab, heads, kv, in);
}

int64_t attention_tiles(const int32_t* seq, int64_t T, int32_t* tiles) {
  int64_t n = 0;
  for (int64_t t = 0; t < T;) {
    int64_t e = t + 1;
    while (e < T && e - t < kFlashTile && seq[e] == seq[t]) ++e;
    tiles[2 * n] = int32_t(t);
    tiles[2 * n + 1] = int32_t(e - t);
    ++n;
    t = e;
  }
  return n;
}

bool attention_flash_supports(int64_t head_dim) {
  return head_dim == 32 || head_dim == 48 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

int64_t attention_counters(int64_t T, int64_t heads, int64_t kv_heads) {
  return T * kv_heads * ((heads / kv_heads + kMaxGroup - 1) / kMaxGroup);
}

// LLMQ_ATTN_V1=1 keeps head dims 64/128 on the per-token kernel (comparisons).
static bool attention_v1() {
  static const bool v1 = [] {
    const char* e = std::getenv("LLMQ_ATTN_V1");
    return e && *e && *e != '0';
  }();
  return v1;
}

bool attention_decode_tc_supports(const KvCacheView& kv, int64_t heads) {
  return kv.type == KvType::BF16 && (kv.head_dim == 64 || kv.head_dim == 128) && kv.kv_heads > 0 &&
         heads % kv.kv_heads == 0 && heads / kv.kv_heads >= 2 && !attention_v1();
}

bool attention_rope_supports(const KvCacheView& kv, int64_t heads) {
  return (kv.head_dim == 64 || kv.head_dim == 128) && kv.kv_heads > 0 && heads % kv.kv_heads == 0 &&
         heads / kv.kv_heads <= kMaxGroup && !attention_v1();
}

bool attention_supports(const KvCacheView& kv, int64_t heads) {
  return kv.head_dim >= 2 && kv.head_dim <= 256 && kv.head_dim % 2 == 0 && kv.kv_heads > 0 && heads % kv.kv_heads == 0;
}

int64_t attention_decode_wave(const KvCacheView& kv, int64_t heads) {
  if (attention_v1() || kv.kv_heads < 1 || heads % kv.kv_heads) return 0;
  if (kv.head_dim == 128) return decode_wave<128>(kv, heads);
  if (kv.head_dim == 64) return decode_wave<64>(kv, heads);
  return 0;
}

bool attention_decode_raw_q(const KvCacheView& kv, int64_t heads, int64_t T, int64_t splits) {
  if (!attention_rope_supports(kv, heads) || T < 1 || splits < 1 || splits > kMaxAttentionSplits) return false;
  const int64_t blocks = attention_counters(T, heads, kv.kv_heads) * splits;
  return kv.head_dim == 128 ? decode_raw_q<128>(kv, heads, blocks) : decode_raw_q<64>(kv, heads, blocks);
}

void attention(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  if (a.T == 0) return;
  if (a.q_raw.acc && (!a.rope_cos || (a.tiles && a.n_tiles > 0)))
    throw Error("attention: raw qkv accumulators need fused RoPE in a decode step");
  if (!attention_supports(kv, a.heads)) throw Error("attention: head_dim " + std::to_string(kv.head_dim) + " is not supported (at most 256)");
  if (a.tiles && a.n_tiles > 0 && a.splits == 1 && attention_flash_supports(kv.head_dim)) {
    switch (kv.head_dim) {
      case 32: return launch_flash<32>(a, kv, s);
      case 48: return launch_flash<48>(a, kv, s);
      case 64: return launch_flash<64>(a, kv, s);
      case 96: return launch_flash<96>(a, kv, s);
      default: return launch_flash<128>(a, kv, s);
    }
  }
  if (a.splits > 1 && (!a.partial || !a.counters)) throw Error("attention: a split launch needs partial and counters");
  if (a.out_prep.out && (a.out_prep.kind == ActKind::I8Token || a.out_prep.ld < a.heads * kv.head_dim))
    throw Error("attention: out_prep takes BF16 or a static scale, rows of at least heads * head_dim");
  if (a.rope_cos && (!a.rope_sin || !attention_rope_supports(kv, a.heads) || (a.tiles && a.n_tiles > 0)))
    throw Error("attention: fused RoPE needs head dim 64 or 128, at most 8 query heads per KV head and no prefill tiles");
  if (a.splits > kMaxAttentionSplits) throw Error("attention: more than " + std::to_string(kMaxAttentionSplits) + " splits");
  // Head dims 64 and 128 through attention_decode_kernel (any T, splits or not); LLMQ_ATTN_V1=1 keeps them on
  // the per-token kernel (comparisons). H200, llama-3-8b cut to 4 layers, batch 1, context ~190: attention
  // 14 us a layer against 18.5 (step time with and without it, LLMQ_SKIP_OPS).
  const bool v2 = !attention_v1();
  if (v2 && kv.head_dim == 128) return launch_decode<128>(a, kv, s);
  if (v2 && kv.head_dim == 64) return launch_decode<64>(a, kv, s);
  if (kv.head_dim <= 64) launch_attention<2>(a, kv, s);
  else if (kv.head_dim <= 128) launch_attention<4>(a, kv, s);
  else launch_attention<8>(a, kv, s);
}

}  // namespace llmq::cuda
