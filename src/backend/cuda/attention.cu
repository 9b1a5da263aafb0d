#include <cfloat>
#include <type_traits>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/check.hpp"
#include "backend/cuda/device_util.cuh"

namespace llmq::cuda {

namespace {

constexpr int kWarps = 4;
constexpr int kMaxGroup = 8;  // query heads per block (more share a KV head: several blocks)

__device__ __forceinline__ int64_t slot_of(const KvCacheView& kv, int64_t seq, int64_t p) {
  return int64_t(kv.block_table[seq * kv.pages_per_seq + p / kv.page_size]) * kv.page_size + p % kv.page_size;
}

template <typename KT>
__device__ __forceinline__ float kv_load(const KT* p) {
  if constexpr (sizeof(KT) == 2) return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(p));
  else if constexpr (std::is_same_v<KT, int8_t>) return float(*p);
  else return fp8_to_float(*p);
}

__device__ __forceinline__ void store_out(const AttentionArgs& a, int64_t i, float v) {
  if (a.out_bf16) static_cast<__nv_bfloat16*>(a.out_bf16)[i] = __float2bfloat16(v);
  else a.out[i] = v;
}

__global__ void rope_kv_kernel(float* qkv, int64_t ld, const int32_t* pos, const int32_t* seq, const float* cos_tab,
                               const float* sin_tab, int64_t heads, const KvCacheView kv) {
  const int64_t t = blockIdx.x;
  const int64_t hd = kv.head_dim, half = hd / 2, kvd = kv.kv_heads * hd, qd = heads * hd;
  const int64_t p = pos[t];
  float* row = qkv + t * ld;
  const float* cs = cos_tab + p * half;
  const float* sn = sin_tab + p * half;
  for (int64_t i = threadIdx.x; i < (heads + kv.kv_heads) * half; i += blockDim.x) {
    float* vec = row + (i / half) * hd;
    const int64_t j = i % half;
    const float a = vec[j], b = vec[j + half];
    vec[j] = a * cs[j] - b * sn[j];
    vec[j + half] = b * cs[j] + a * sn[j];
  }
  __syncthreads();
  const int64_t slot = slot_of(kv, seq[t], p);
  for (int64_t j = threadIdx.x; j < kvd; j += blockDim.x) {
    const float kval = row[qd + j], vval = row[qd + kvd + j];
    const int64_t i = slot * kvd + j;
    if (kv.type == KvType::BF16) {
      static_cast<__nv_bfloat16*>(kv.k)[i] = __float2bfloat16(kval);
      static_cast<__nv_bfloat16*>(kv.v)[i] = __float2bfloat16(vval);
    } else {
      const int64_t h = j / hd;
      const float ik = 1.0f / kv.k_scale[h], iv = 1.0f / kv.v_scale[h];
      if (kv.type == KvType::FP8) {
        static_cast<uint8_t*>(kv.k)[i] = float_to_fp8(kval * ik);
        static_cast<uint8_t*>(kv.v)[i] = float_to_fp8(vval * iv);
      } else {
        static_cast<int8_t*>(kv.k)[i] = float_to_int8(kval * ik);
        static_cast<int8_t*>(kv.v)[i] = float_to_int8(vval * iv);
      }
    }
  }
}

// One block per (token, KV head, group of <= kMaxGroup query heads, split); each warp runs an online
// softmax over every fourth position of the block's range, lanes owning head dimensions lane + 32 i.
template <int DPL, typename KT>
__global__ void __launch_bounds__(kWarps * 32) attention_kernel(const AttentionArgs a, const KvCacheView kv) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t hd = kv.head_dim, kvd = kv.kv_heads * hd;
  const int64_t G = a.heads / kv.kv_heads;
  const int64_t gchunks = (G + kMaxGroup - 1) / kMaxGroup;
  const int64_t t = blockIdx.x, kvh = blockIdx.y / gchunks, g0 = (blockIdx.y % gchunks) * kMaxGroup;
  const int ng = int(G - g0 < kMaxGroup ? G - g0 : kMaxGroup);
  const int64_t split = blockIdx.z;
  const int64_t p = a.pos[t], sq = a.seq[t];
  const int64_t lo = a.window > 0 && p - a.window + 1 > 0 ? p - a.window + 1 : 0;
  const int64_t begin = a.splits > 1 ? lo + split * a.chunk : lo;
  const int64_t end = a.splits > 1 ? (begin + a.chunk < p + 1 ? begin + a.chunk : p + 1) : p + 1;
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
      store_out(a, t * a.heads * hd + h * hd + d, O / L);
    } else {
      float* pr = a.partial + ((t * a.heads + h) * a.splits + split) * (hd + 2);
      pr[d] = O;
      if (d == 0) pr[hd] = M, pr[hd + 1] = L;
    }
  }
}

__global__ void combine_kernel(const AttentionArgs a, int64_t hd) {
  const int64_t t = blockIdx.x, h = blockIdx.y;
  const float* base = a.partial + (t * a.heads + h) * a.splits * (hd + 2);
  float M = -INFINITY;
  for (int64_t s = 0; s < a.splits; ++s) M = fmaxf(M, base[s * (hd + 2) + hd]);
  for (int64_t d = threadIdx.x; d < hd; d += blockDim.x) {
    float L = 0.f, O = 0.f;
    for (int64_t s = 0; s < a.splits; ++s) {
      const float* pr = base + s * (hd + 2);
      if (pr[hd] == -INFINITY) continue;
      const float f = expf(pr[hd] - M);
      L += pr[hd + 1] * f;
      O += pr[d] * f;
    }
    store_out(a, t * a.heads * hd + h * hd + d, O / L);
  }
}

template <int DPL>
void launch_attention(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  const int64_t G = a.heads / kv.kv_heads;
  const dim3 grid(unsigned(a.T), unsigned(kv.kv_heads * ((G + kMaxGroup - 1) / kMaxGroup)), unsigned(a.splits));
  switch (kv.type) {
    case KvType::BF16: attention_kernel<DPL, uint16_t><<<grid, kWarps * 32, 0, s>>>(a, kv); break;
    case KvType::FP8: attention_kernel<DPL, uint8_t><<<grid, kWarps * 32, 0, s>>>(a, kv); break;
    case KvType::I8: attention_kernel<DPL, int8_t><<<grid, kWarps * 32, 0, s>>>(a, kv); break;
  }
  check_launch("attention_kernel", s);
}

}  // namespace

void rope_kv(float* qkv, int64_t ld, int64_t T, const int32_t* pos, const int32_t* seq, const float* cos_tab,
             const float* sin_tab, int64_t heads, const KvCacheView& kv, cudaStream_t s) {
  if (T == 0) return;
  rope_kv_kernel<<<unsigned(T), 256, 0, s>>>(qkv, ld, pos, seq, cos_tab, sin_tab, heads, kv);
  check_launch("rope_kv_kernel", s);
}

bool attention_supports(const KvCacheView& kv, int64_t heads) {
  return kv.head_dim >= 2 && kv.head_dim <= 256 && kv.head_dim % 2 == 0 && kv.kv_heads > 0 && heads % kv.kv_heads == 0;
}

void attention(const AttentionArgs& a, const KvCacheView& kv, cudaStream_t s) {
  if (a.T == 0) return;
  if (!attention_supports(kv, a.heads)) throw Error("attention: head_dim " + std::to_string(kv.head_dim) + " is not supported (at most 256)");
  if (kv.head_dim <= 64) launch_attention<2>(a, kv, s);
  else if (kv.head_dim <= 128) launch_attention<4>(a, kv, s);
  else launch_attention<8>(a, kv, s);
  if (a.splits > 1) {
    combine_kernel<<<dim3(unsigned(a.T), unsigned(a.heads)), 128, 0, s>>>(a, kv.head_dim);
    check_launch("attention_combine_kernel", s);
  }
}

}  // namespace llmq::cuda
