// The SIMD GEMM body shared by the AVX2 and AVX-512 translation units. Each includes this file after
// defining `struct V` (vector traits: W lanes, load/fma/reduce, exact widening of F16/BF16 weights), MR (rows
// of x per tile) and LLMQ_ISA_NS.
//
// Tile: MR rows of x times NR (4 or 1) rows of w, accumulated along K in MR*NR vector registers, then reduced
// horizontally. Both operands are K-contiguous, so weights are read in their checkpoint layout (no repacking)
// and decode (M = 1) streams each weight row exactly once.

namespace llmq::cpu::LLMQ_ISA_NS {
namespace {

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
      // fetch the next tile's rows while this one is computed.
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
    for (int r = 0; r < NR; ++r) y[m * ldy + n + r] = s[r] + (bias ? bias[n + r] : 0.f);
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

template <DType WT>
void gemm_t(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, int64_t ldw, int64_t n0, int64_t n1,
            float* y, int64_t ldy, const float* bias) {
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

// Exact integer GEMM: y[m, n] = sum_k x[m, k] * w[n, k] in int32, rows [n0, n1). Both int8, K-contiguous.
void gemm_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0, int64_t n1,
             int32_t* y, int64_t ldy) {
  constexpr int NR = 4;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* xm = x + m * ldx;
    int64_t n = n0;
    for (; n < n1; n += NR) {
      const int nr = int(std::min<int64_t>(NR, n1 - n));
      typename V::I acc[NR];
      for (int r = 0; r < NR; ++r) acc[r] = V::izero();
      int64_t k = 0;
      for (; k + V::KI <= K; k += V::KI)
        for (int r = 0; r < nr; ++r) acc[r] = V::i8_madd(xm + k, w + (n + r) * ldw + k, acc[r]);
      for (int r = 0; r < nr; ++r) {
        int32_t s = V::ireduce(acc[r]);
        for (int64_t kk = k; kk < K; ++kk) s += int32_t(xm[kk]) * int32_t(w[(n + r) * ldw + kk]);
        y[m * ldy + n + r] = s;
      }
    }
  }
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

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const typename V::T av = V::set1(alpha);
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) V::store(y + i, V::fma(av, V::load(x + i), V::load(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
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
