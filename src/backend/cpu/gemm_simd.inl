// The SIMD GEMM body shared by the AVX2 and AVX-512 translation units. Each includes this file after
// defining `struct V` (vector traits: W lanes, load/fma/reduce, exact widening of F16/BF16 weights), MR (rows
// of x per tile) and LLMQ_ISA_NS.
//
// Tile: MR rows of x times NR (4 or 1) rows of w, accumulated along K in MR*NR vector registers, then reduced
// horizontally. Both operands are K-contiguous, so weights are read in their checkpoint layout (no repacking)
// and decode (M = 1) streams each weight row exactly once.

#include <vector>

#include "quant/formats/formats.hpp"

namespace llmq::cpu::LLMQ_ISA_NS {
namespace {

// V::loadw<F8E4M3> gives the weights times 2^-8; the tile scales its sums back. Scaling by a power of two
// commutes with every rounding of the FMA chain, so this is exact (unless a partial sum falls below 2^-118).
template <DType WT>
constexpr float kWidenScale = WT == DType::F8E4M3 ? 256.0f : 1.0f;

template <int MR_, int NR, DType WT>
inline void tile(const float* x, int64_t ldx, int64_t K, const void* w, int64_t ldw, int64_t n, float* y,
                 int64_t ldy, const float* bias) {
  typename V::T acc[MR_][NR];
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = V::zero();
  int64_t k = 0;
  for (; k + V::W <= K; k += V::W) {
    typename V::T wv[NR];
    if constexpr (MR_ == 1) {
      // Matrix-vector: each row is a short stream the hardware prefetcher barely learns before it ends, so
      // fetch the next tile's rows while this one is computed, one prefetch a cache line.
      if ((k * int64_t(dtype_size(WT))) % 64 == 0)
        for (int r = 0; r < NR; ++r)
          __builtin_prefetch(static_cast<const char*>(w) + ((n + NR + r) * ldw + k) * int64_t(dtype_size(WT)));
    }
    for (int r = 0; r < NR; ++r) wv[r] = V::template loadw<WT>(w, (n + r) * ldw + k);
    for (int m = 0; m < MR_; ++m) {
      typename V::T xv = V::load(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = V::fma(xv, wv[r], acc[m][r]);
    }
  }
  if (k < K) {
    const int rest = int(K - k);
    typename V::T wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = V::template loadw_partial<WT>(w, (n + r) * ldw + k, rest);
    for (int m = 0; m < MR_; ++m) {
      typename V::T xv = V::load_partial(x + m * ldx + k, rest);
      for (int r = 0; r < NR; ++r) acc[m][r] = V::fma(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MR_; ++m) {
    float s[NR];
    if constexpr (NR % 4 == 0) {
      for (int r = 0; r < NR; r += 4) V::reduce4(acc[m][r], acc[m][r + 1], acc[m][r + 2], acc[m][r + 3], s + r);
    } else {
      for (int r = 0; r < NR; ++r) s[r] = V::reduce(acc[m][r]);
    }
    for (int r = 0; r < NR; ++r) y[m * ldy + n + r] = s[r] * kWidenScale<WT> + (bias ? bias[n + r] : 0.f);
  }
}

template <int MR_, DType WT>
inline void row_block(const float* x, int64_t ldx, int64_t K, const void* w, int64_t ldw, int64_t n0, int64_t n1,
                      float* y, int64_t ldy, const float* bias) {
  int64_t n = n0;
  if constexpr (MR_ == 1) {  // matrix-vector: more weight rows in flight per pass
    for (; n + 8 <= n1; n += 8) tile<1, 8, WT>(x, ldx, K, w, ldw, n, y, ldy, bias);
  }
  for (; n + 4 <= n1; n += 4) tile<MR_, 4, WT>(x, ldx, K, w, ldw, n, y, ldy, bias);
  for (; n < n1; ++n) tile<MR_, 1, WT>(x, ldx, K, w, ldw, n, y, ldy, bias);
}

// ---- Many rows of x (prefill): weights widened once into FP32 panels ----
// The tile above widens every weight vector again for each MR rows of x and ends with horizontal sums: fine for
// decode, where each weight is used once, but at prefill it ran at ~1/3 of the FMA peak (BF16 weights, 2 Zen 3
// cores). Here a block of up to NCP weight rows by KCP values of k is widened once into panels of NP = 2W rows
// stored k-major ([k][NP]); MP rows of x then multiply each panel with broadcasts, MP x 2 vector accumulators
// (one FMA per weight vector and x row, no horizontal sum: each output lane is one sequential FMA chain over k,
// as in gemm_ref).
constexpr int NP = 2 * V::W;       // weight rows per panel
constexpr int MP = 6;              // x rows per register tile: 12 accumulators + 2 weight vectors + 1 broadcast
constexpr int64_t KCP = 256;       // k per packed block
constexpr int64_t NCP = 12 * NP;   // weight rows per packed block (AVX2: 192 x 256 floats = 192 KB, in L2)

// Panels of rows [nb, nb + panels * NP) (rows from n1 on as zeros), k in [k0, k0 + kc): dst[p][k][j].
template <DType WT>
void pack_panels(const void* w, int64_t ldw, int64_t nb, int64_t n1, int64_t k0, int64_t kc, int64_t panels, float* dst) {
  for (int64_t p = 0; p < panels; ++p)
    for (int j = 0; j < NP; ++j) {
      const int64_t row = nb + p * NP + j;
      float* d = dst + p * kc * NP + j;
      if (row < n1) {
        const int64_t off = row * ldw + k0;
        for (int64_t k = 0; k < kc; ++k) d[k * NP] = load_as_f32(w, WT, size_t(off + k));
      } else {
        for (int64_t k = 0; k < kc; ++k) d[k * NP] = 0.f;
      }
    }
}

// y[r, 0..nv) for r < R from one panel over kc values of k: y = acc (+ bias), or y += acc with `add`.
template <int R>
inline void panel_tile(const float* x, int64_t ldx, const float* p, int64_t kc, float* y, int64_t ldy, int nv, bool add,
                       const float* bias) {
  typename V::T acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = V::zero();
  for (int64_t k = 0; k < kc; ++k) {
    const typename V::T w0 = V::load(p + k * NP), w1 = V::load(p + k * NP + V::W);
    for (int r = 0; r < R; ++r) {
      const typename V::T xv = V::set1(x[r * ldx + k]);
      acc[r][0] = V::fma(xv, w0, acc[r][0]);
      acc[r][1] = V::fma(xv, w1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      float* yr = y + r * ldy + h * V::W;
      const int cnt = std::clamp(nv - h * V::W, 0, V::W);
      if (cnt == V::W) {
        typename V::T v = acc[r][h];
        if (add) v = V::add(v, V::load(yr));
        else if (bias) v = V::add(v, V::load(bias + h * V::W));
        V::store(yr, v);
      } else if (cnt > 0) {
        alignas(64) float t[V::W];
        V::store(t, acc[r][h]);
        for (int j = 0; j < cnt; ++j) yr[j] = (add ? yr[j] : bias ? bias[h * V::W + j] : 0.f) + t[j];
      }
    }
}

template <DType WT>
void gemm_packed(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, int64_t ldw, int64_t n0, int64_t n1,
                 float* y, int64_t ldy, const float* bias) {
  thread_local std::vector<float> buf;
  buf.resize(size_t(NCP * KCP));
  for (int64_t nb = n0; nb < n1; nb += NCP) {
    const int64_t panels = (std::min(NCP, n1 - nb) + NP - 1) / NP;
    for (int64_t k0 = 0; k0 < K; k0 += KCP) {
      const int64_t kc = std::min(KCP, K - k0);
      pack_panels<WT>(w, ldw, nb, n1, k0, kc, panels, buf.data());
      const bool add = k0 > 0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n = nb + p * NP;
        const int nv = int(std::min<int64_t>(NP, n1 - n));
        const float* pp = buf.data() + p * kc * NP;
        const float* b = add || !bias ? nullptr : bias + n;
        int64_t m = 0;
        for (; m + MP <= M; m += MP) panel_tile<MP>(x + m * ldx + k0, ldx, pp, kc, y + m * ldy + n, ldy, nv, add, b);
        const float* xm = x + m * ldx + k0;
        float* ym = y + m * ldy + n;
        switch (M - m) {
          case 1: panel_tile<1>(xm, ldx, pp, kc, ym, ldy, nv, add, b); break;
          case 2: panel_tile<2>(xm, ldx, pp, kc, ym, ldy, nv, add, b); break;
          case 3: panel_tile<3>(xm, ldx, pp, kc, ym, ldy, nv, add, b); break;
          case 4: panel_tile<4>(xm, ldx, pp, kc, ym, ldy, nv, add, b); break;
          case 5: panel_tile<5>(xm, ldx, pp, kc, ym, ldy, nv, add, b); break;
          default: break;
        }
      }
    }
  }
}

template <DType WT>
void gemm_t(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, int64_t ldw, int64_t n0, int64_t n1,
            float* y, int64_t ldy, const float* bias) {
  if (M >= kGemmPackMinM && K > 0) return gemm_packed<WT>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias);
  // Block N so that a chunk of weight rows (NC x K) stays in L2 while every tile of x passes over it.
  const int64_t row_bytes = K * int64_t(dtype_size(WT));
  const int64_t NC = std::max<int64_t>(4, ((256 * 1024) / std::max<int64_t>(row_bytes, 1)) / 4 * 4);
  for (int64_t nc = n0; nc < n1; nc += NC) {
    const int64_t ne = std::min(n1, nc + NC);
    int64_t m = 0;
    for (; m + MR <= M; m += MR) row_block<MR, WT>(x + m * ldx, ldx, K, w, ldw, nc, ne, y + m * ldy, ldy, bias);
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (M - m) {
      case 0: break;
      case 1: row_block<1, WT>(xm, ldx, K, w, ldw, nc, ne, ym, ldy, bias); break;
      case 2: if constexpr (MR > 2) row_block<2, WT>(xm, ldx, K, w, ldw, nc, ne, ym, ldy, bias); break;
      case 3: if constexpr (MR > 3) row_block<3, WT>(xm, ldx, K, w, ldw, nc, ne, ym, ldy, bias); break;
      case 4: if constexpr (MR > 4) row_block<4, WT>(xm, ldx, K, w, ldw, nc, ne, ym, ldy, bias); break;
      case 5: if constexpr (MR > 5) row_block<5, WT>(xm, ldx, K, w, ldw, nc, ne, ym, ldy, bias); break;
      default: break;
    }
  }
}

// ---- INT4 group weights (Q4Matrix) ----
// Codes are taken a chunk of QC = 2W columns (W bytes) at a time: one widening load gives the even columns (low
// nibbles) in one vector and the odd columns (high nibbles) in another. x is permuted to match once per call (each
// chunk as its even columns, then its odd ones), so both operands see the same permutation of k and the dot
// products are unchanged up to FP32 summation order. Several rows of x: the weights dequantized as the reference
// does, (q - z) * s, one rounding; one row: per-group sums on the codes (q4_tile).
constexpr int64_t QC = 2 * V::W;

// dst[m, :] = x[m, :] with every QC-chunk of columns reordered as (even columns, odd columns); K % QC == 0.
inline void q4_permute_x(const float* x, int64_t ldx, int64_t M, int64_t K, float* dst) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += QC)
      for (int i = 0; i < V::W; ++i) {
        dst[m * K + c + i] = x[m * ldx + c + 2 * i];
        dst[m * K + c + V::W + i] = x[m * ldx + c + 2 * i + 1];
      }
}

// One token (decode): NR weight rows at a time, the codes streamed once. Each group's sum is taken on the codes,
// sum_k x_k q_k, and the group's zero point and scale are applied to it once: s (sum x q - z sum x), with the
// group's sum of x (xs, [ng][W] lane by lane, shared by all rows) made once per call. That is the reference's value,
// sum x (q - z) s, up to FP32 rounding (the bound grows from sum |x| |q - z| s to sum |x| (q + z) s), and it
// takes per 2W codes one widening load, two integer ops, two conversions and two FMAs: decode at 7B size
// is compute-bound on two cores with the per-code (q - z) * s. xp is x permuted by q4_permute_x.
template <int NR>
inline void q4_tile(const float* xp, const float* xs, const Q4Matrix& w, int64_t n, float* y, const float* bias) {
  const int64_t ng = w.K / w.group, ldq = w.K / 2;
  typename V::T acc[NR];
  for (int r = 0; r < NR; ++r) acc[r] = V::zero();
  for (int64_t g = 0; g < ng; ++g) {
    typename V::T accg[NR];
    for (int r = 0; r < NR; ++r) accg[r] = V::zero();
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += QC) {
      if (k % 128 == 0)  // one cache line of codes a row: fetch the next tile's
        for (int r = 0; r < NR; ++r) __builtin_prefetch(w.q + (n + NR + r) * ldq + k / 2);
      const typename V::T x0 = V::load(xp + k), x1 = V::load(xp + k + V::W);
      for (int r = 0; r < NR; ++r) {
        typename V::T ce, co;
        V::q4(w.q + (n + r) * ldq + k / 2, &ce, &co);
        accg[r] = V::fma(x0, ce, accg[r]);
        accg[r] = V::fma(x1, co, accg[r]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const typename V::T z = V::set1(float(w.zero[(n + r) * ng + g]));
      acc[r] = V::fma(V::set1(w.scale[(n + r) * ng + g]), V::fnma(z, V::load(xs + g * V::W), accg[r]), acc[r]);
    }
  }
  float out[NR];
  if constexpr (NR % 4 == 0) {
    for (int r = 0; r < NR; r += 4) V::reduce4(acc[r], acc[r + 1], acc[r + 2], acc[r + 3], out + r);
  } else {
    for (int r = 0; r < NR; ++r) out[r] = V::reduce(acc[r]);
  }
  for (int r = 0; r < NR; ++r) y[n + r] = out[r] + (bias ? bias[n + r] : 0.f);
}

// Rows [r0, r1) of w dequantized into dst ([r1 - r0, K], FP32), columns in q4_permute_x's order.
inline void q4_dequant_rows(const Q4Matrix& w, int64_t r0, int64_t r1, float* dst) {
  const int64_t ng = w.K / w.group, ldq = w.K / 2;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const typename V::T s = V::set1(w.scale[r * ng + g]), z = V::set1(float(w.zero[r * ng + g]));
      for (int64_t k = g * w.group; k < (g + 1) * w.group; k += QC) {
        typename V::T ce, co;
        V::q4(w.q + r * ldq + k / 2, &ce, &co);
        float* d = dst + (r - r0) * w.K + k;
        V::store(d, V::mul(V::sub(ce, z), s));
        V::store(d + V::W, V::mul(V::sub(co, z), s));
      }
    }
}

}  // namespace

void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t n0,
          int64_t n1, float* y, int64_t ldy, const float* bias) {
  switch (wt) {
    case DType::F32: gemm_t<DType::F32>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias); break;
    case DType::F16: gemm_t<DType::F16>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias); break;
    case DType::BF16: gemm_t<DType::BF16>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias); break;
    case DType::I8: gemm_t<DType::I8>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias); break;
    case DType::F8E4M3: gemm_t<DType::F8E4M3>(x, ldx, M, K, w, ldw, n0, n1, y, ldy, bias); break;
    case DType::U8: break;  // not a weight type: matmul() rejects it
  }
}

void gemm_q4(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
             const float* bias) {
  thread_local std::vector<float> xp, buf;  // one token's permuted x (K floats) and a dequantized block (~512 KB)
  // Blocks of rows (~512 KB of FP32, in L2) dequantized by `dequant` into buf, each multiplied by the FP32 GEMM
  // (which packs panels from kGemmPackMinM rows of x on): each weight is then widened once for all M rows.
  const int64_t rb = std::max<int64_t>(NP, (int64_t(512 * 1024) / (w.K * 4)) / NP * NP);
  auto by_blocks = [&](const float* xx, int64_t ldxx, auto&& dequant) {
    buf.resize(size_t(rb * w.K));
    for (int64_t r0 = n0; r0 < n1; r0 += rb) {
      const int64_t r1 = std::min(n1, r0 + rb);
      dequant(r0, r1);
      gemm_t<DType::F32>(xx, ldxx, M, w.K, buf.data(), w.K, 0, r1 - r0, y + r0, ldy, bias ? bias + r0 : nullptr);
    }
  };
  const int64_t ng = w.K / w.group;
  if (w.group % QC != 0) {
    // AVX-512 hands groups of 16, 48, ... to AVX2, whose chunk divides them. Other groups: the scalar
    // definition, in column order.
    if (V::W == 16 && w.group % 16 == 0) return avx2::gemm_q4(x, ldx, M, w, n0, n1, y, ldy, bias);
    return by_blocks(x, ldx, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < w.K; ++k) {
          const quant::Int4Params p{w.scale[r * ng + k / w.group], w.zero[r * ng + k / w.group]};
          buf[size_t((r - r0) * w.K + k)] = quant::dequant_int4(quant::unpack_int4(w.q + r * (w.K / 2), k), p);
        }
    });
  }
  if (M > 1) {  // x permuted into a buffer of this call only: M * K floats, too many to keep for a long prompt
    std::vector<float> xm(size_t(M * w.K));
    q4_permute_x(x, ldx, M, w.K, xm.data());
    return by_blocks(xm.data(), w.K, [&](int64_t r0, int64_t r1) { q4_dequant_rows(w, r0, r1, buf.data()); });
  }
  xp.resize(size_t(w.K));
  q4_permute_x(x, ldx, 1, w.K, xp.data());
  thread_local std::vector<float> xs;  // [ng][W]: per group, the lane-wise sum of x over its chunks
  xs.resize(size_t(ng * V::W));
  for (int64_t g = 0; g < ng; ++g) {
    typename V::T t = V::zero();
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += QC)
      t = V::add(t, V::add(V::load(xp.data() + k), V::load(xp.data() + k + V::W)));
    V::store(xs.data() + g * V::W, t);
  }
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) q4_tile<4>(xp.data(), xs.data(), w, n, y, bias);
  for (; n < n1; ++n) q4_tile<1>(xp.data(), xs.data(), w, n, y, bias);
}

// Exact integer GEMM: y[m, n] = sum_k x[m, k] * w[n, k] in int32, rows [n0, n1). Both int8, K-contiguous.
// MR_ rows of x times NR rows of w per tile; the |w| of a step is shared by the MR_ rows of x.
template <int MR_, int NR>
inline void i8_tile(const int8_t* x, int64_t ldx, int64_t K, const int8_t* w, int64_t ldw, int64_t n, int32_t* y,
                    int64_t ldy) {
  typename V::I acc[MR_][NR];
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = V::izero();
  int64_t k = 0;
  for (; k + V::KI <= K; k += V::KI) {
    typename V::I wv[NR], wa[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = V::iload(w + (n + r) * ldw + k);
      wa[r] = V::iabs(wv[r]);
    }
    for (int m = 0; m < MR_; ++m) {
      const typename V::I xv = V::iload(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = V::idot(wa[r], wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR_; ++m)
    for (int r = 0; r < NR; ++r) {
      int32_t s = V::ireduce(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += int32_t(x[m * ldx + kk]) * int32_t(w[(n + r) * ldw + kk]);
      y[m * ldy + n + r] = s;
    }
}

template <int MR_>
inline void i8_rows(const int8_t* x, int64_t ldx, int64_t K, const int8_t* w, int64_t ldw, int64_t n0, int64_t n1,
                    int32_t* y, int64_t ldy) {
  constexpr int NR = MR_ == 1 ? 4 : V::INR;  // one token: more weight rows in flight
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) i8_tile<MR_, NR>(x, ldx, K, w, ldw, n, y, ldy);
  for (; n < n1; ++n) i8_tile<MR_, 1>(x, ldx, K, w, ldw, n, y, ldy);
}

void gemm_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0, int64_t n1,
             int32_t* y, int64_t ldy) {
  // Block N so that a chunk of weight rows (NC x K bytes) stays in L2 while every tile of x passes over it.
  const int64_t NC = std::max<int64_t>(4, ((256 * 1024) / std::max<int64_t>(K, 1)) / 4 * 4);
  for (int64_t nc = n0; nc < n1; nc += NC) {
    const int64_t ne = std::min(n1, nc + NC);
    int64_t m = 0;
    if (M > 1)
      for (; m + V::IMR <= M; m += V::IMR) i8_rows<V::IMR>(x + m * ldx, ldx, K, w, ldw, nc, ne, y + m * ldy, ldy);
    for (; m < M; ++m) i8_rows<1>(x + m * ldx, ldx, K, w, ldw, nc, ne, y + m * ldy, ldy);
  }
}

void wsum(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
          int64_t ldo) {
  constexpr int RB = 4;  // rows of p a pass: RB x 2 vector sums, 2 loads of v and RB broadcasts per j
  int64_t d = 0;
  for (; d + 2 * V::W <= D; d += 2 * V::W)
    for (int64_t r0 = 0; r0 < R; r0 += RB) {
      const int rb = int(std::min<int64_t>(RB, R - r0));
      typename V::T acc[RB][2];
      for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = V::zero();
      for (int64_t j = 0; j < n; ++j) {
        const typename V::T v0 = V::load(v + j * ldv + d), v1 = V::load(v + j * ldv + d + V::W);
        for (int r = 0; r < RB; ++r)
          if (r < rb) {
            const typename V::T b = V::set1(p[(r0 + r) * ldp + j]);
            acc[r][0] = V::fma(b, v0, acc[r][0]);
            acc[r][1] = V::fma(b, v1, acc[r][1]);
          }
      }
      for (int r = 0; r < rb; ++r) {
        V::store(out + (r0 + r) * ldo + d, acc[r][0]);
        V::store(out + (r0 + r) * ldo + d + V::W, acc[r][1]);
      }
    }
  if (d < D) wsum_ref(p, ldp, R, n, v + d, ldv, D - d, out + d, ldo);  // the columns past the last 2W
}

float dot(const float* a, const float* b, int64_t n) {
  typename V::T acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * V::W <= n; i += 2 * V::W) {
    acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
    acc1 = V::fma(V::load(a + i + V::W), V::load(b + i + V::W), acc1);
  }
  for (; i + V::W <= n; i += V::W) acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
  if (i < n) acc1 = V::fma(V::load_partial(a + i, int(n - i)), V::load_partial(b + i, int(n - i)), acc1);
  return V::reduce(V::add(acc0, acc1));
}

}  // namespace llmq::cpu::LLMQ_ISA_NS

namespace llmq::cpu::LLMQ_ISA_NS {
// 10 independent FMA chains (enough to cover the FMA latency), for measuring the core's peak.
float fma_loop(int64_t iters) {
  typename V::T a[10];
  const typename V::T m = V::set1(0.999999f), b = V::set1(1e-7f);
  for (int i = 0; i < 10; ++i) a[i] = V::set1(float(i));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < 10; ++i) a[i] = V::fma(a[i], m, b);
  typename V::T s = a[0];
  for (int i = 1; i < 10; ++i) s = V::add(s, a[i]);
  return V::reduce(s);
}
int fma_loop_lanes() { return V::W; }
}  // namespace llmq::cpu::LLMQ_ISA_NS
