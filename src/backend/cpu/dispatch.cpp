// Run-time choice of the SIMD kernels, and the threading of matmul.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/kernels.hpp"

namespace llmq::cpu {

namespace {

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::AVX2;
  return Isa::Scalar;
}

Isa initial() {
  Isa best = detect();
  // LLMQ_ISA=scalar|avx2|avx512 caps the choice (for comparisons); never above what the processor has.
  if (const char* e = std::getenv("LLMQ_ISA")) {
    Isa want = std::strcmp(e, "scalar") == 0 ? Isa::Scalar : std::strcmp(e, "avx2") == 0 ? Isa::AVX2 : best;
    if (int(want) < int(best)) return want;
  }
  return best;
}

std::atomic<Isa> g_isa{initial()};

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar: return "scalar";
    case Isa::AVX2: return "avx2";
    case Isa::AVX512: return "avx512";
  }
  return "?";
}

Isa detected_isa() {
  static const Isa d = detect();
  return d;
}
Isa active_isa() { return g_isa.load(std::memory_order_relaxed); }
void set_isa(Isa isa) {
  if (int(isa) > int(detected_isa())) throw Error(std::string("this processor does not support ") + isa_name(isa));
  g_isa.store(isa);
}

static GemmFn gemm_fn() {
  switch (active_isa()) {
    case Isa::AVX512: return avx512::gemm;
    case Isa::AVX2: return avx2::gemm;
    default: return gemm_ref;
  }
}

void matmul_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N,
               int32_t* y, int64_t ldy) {
  auto fn = active_isa() == Isa::AVX512 ? avx512::gemm_i8 : active_isa() == Isa::AVX2 ? avx2::gemm_i8 : gemm_i8_ref;
  const int nt = (M * N * K < (int64_t(1) << 16) || omp_in_parallel()) ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int64_t per = (N + nt - 1) / nt;
    const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
    if (n0 < n1) fn(x, ldx, M, K, w, ldw, n0, n1, y, ldy);
  }
}

void matmul(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t N,
            float* y, int64_t ldy, const float* bias) {
  if (wt == DType::U8) throw Error("matmul: U8 is not a weight type");
  GemmFn fn = gemm_fn();
  const int64_t work = M * N * K;
  const int nt = work < (int64_t(1) << 16) ? 1 : omp_get_max_threads();
  if (nt == 1 || omp_in_parallel()) {
    fn(x, ldx, M, K, w, wt, ldw, 0, N, y, ldy, bias);
    return;
  }
  // Split N into one contiguous range per thread (each thread's weights stay in its own cache); when N is
  // too small for that, split M instead.
  if (N >= int64_t(nt) * 16) {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      int64_t per = (N + nt - 1) / nt;
      per = (per + 3) / 4 * 4;
      const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
      if (n0 < n1) fn(x, ldx, M, K, w, wt, ldw, n0, n1, y, ldy, bias);
    }
  } else {
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num();
      const int64_t per = (M + nt - 1) / nt;
      const int64_t m0 = std::min(M, t * per), m1 = std::min(M, m0 + per);
      if (m0 < m1) fn(x + m0 * ldx, ldx, m1 - m0, K, w, wt, ldw, 0, N, y + m0 * ldy, ldy, bias);
    }
  }
}

void matmul_q4(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t N, float* y, int64_t ldy,
               const float* bias) {
  if (w.K % 2 || w.group <= 0 || w.group % 2 || w.K % w.group)
    throw Error("matmul_q4: K = " + std::to_string(w.K) + " and group = " + std::to_string(w.group) +
                " must be even and the group must divide K");
  GemmQ4Fn fn = active_isa() == Isa::AVX512 ? avx512::gemm_q4 : active_isa() == Isa::AVX2 ? avx2::gemm_q4 : gemm_q4_ref;
  const int nt = (M * N * w.K < (int64_t(1) << 16) || omp_in_parallel()) ? 1 : omp_get_max_threads();
  if (nt == 1) {
    fn(x, ldx, M, w, 0, N, y, ldy, bias);
    return;
  }
  // As matmul: one contiguous range of weight rows per thread, or of x rows when N is small.
  const bool split_n = N >= int64_t(nt) * 16;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    if (split_n) {
      const int64_t per = ((N + nt - 1) / nt + 3) / 4 * 4;
      const int64_t n0 = std::min(N, t * per), n1 = std::min(N, n0 + per);
      if (n0 < n1) fn(x, ldx, M, w, n0, n1, y, ldy, bias);
    } else {
      const int64_t per = (M + nt - 1) / nt;
      const int64_t m0 = std::min(M, t * per), m1 = std::min(M, m0 + per);
      if (m0 < m1) fn(x + m0 * ldx, ldx, m1 - m0, w, 0, N, y + m0 * ldy, ldy, bias);
    }
  }
}

void matmul_multi(const float* x, int64_t M, int64_t K, const MatmulJob* jobs, int n_jobs) {
  GemmFn fn = gemm_fn();
  int64_t total_n = 0;
  for (int j = 0; j < n_jobs; ++j) total_n += jobs[j].N;
  const int nt = (M * total_n * K < (int64_t(1) << 16) || omp_in_parallel()) ? 1 : omp_get_max_threads();
  if (nt == 1 || M > 16) {  // large M: the per-job split over N keeps each thread's weights apart already
    for (int j = 0; j < n_jobs; ++j)
      matmul(x, K, M, K, jobs[j].w, jobs[j].wt, K, jobs[j].N, jobs[j].y, jobs[j].N, jobs[j].bias);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    for (int j = 0; j < n_jobs; ++j) {
      const MatmulJob& jb = jobs[j];
      int64_t per = (jb.N + nt - 1) / nt;
      per = (per + 7) / 8 * 8;
      const int64_t n0 = std::min(jb.N, t * per), n1 = std::min(jb.N, n0 + per);
      if (n0 < n1) fn(x, K, M, K, jb.w, jb.wt, K, n0, n1, jb.y, jb.N, jb.bias);
    }
  }
}

void gemm_single(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t N,
                 float* y, int64_t ldy) {
  gemm_fn()(x, ldx, M, K, w, wt, ldw, 0, N, y, ldy, nullptr);
}

void wsum(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
          int64_t ldo) {
  switch (active_isa()) {
    case Isa::AVX512: avx512::wsum(p, ldp, R, n, v, ldv, D, out, ldo); break;
    case Isa::AVX2: avx2::wsum(p, ldp, R, n, v, ldv, D, out, ldo); break;
    default: wsum_ref(p, ldp, R, n, v, ldv, D, out, ldo);
  }
}

float dot(const float* a, const float* b, int64_t n) {
  switch (active_isa()) {
    case Isa::AVX512: return avx512::dot(a, b, n);
    case Isa::AVX2: return avx2::dot(a, b, n);
    default: return dot_ref(a, b, n);
  }
}

}  // namespace llmq::cpu

namespace llmq::cpu {

double measure_peak_gflops() {
  float (*loop)(int64_t) = nullptr;
  int lanes = 1;
  if (active_isa() == Isa::AVX512) {
    loop = avx512::fma_loop;
    lanes = avx512::fma_loop_lanes();
  } else if (active_isa() == Isa::AVX2) {
    loop = avx2::fma_loop;
    lanes = avx2::fma_loop_lanes();
  } else {
    return 0;
  }
  const int64_t iters = 20'000'000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    sink += loop(iters);
    double dt = omp_get_wtime() - t0;
    if (sink == 12345.f) dt += 1e-9;  // keep the result alive
    best = std::max(best, double(iters) * 10 * lanes * 2 * omp_get_max_threads() / dt / 1e9);
  }
  return best;
}

double measure_peak_read_gbps() {
  const size_t n = size_t(64) << 20;  // 256 MiB of floats: far beyond the caches
  std::vector<float> buf(n, 1.0f);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    double t0 = omp_get_wtime();
    double total = 0;
#pragma omp parallel for reduction(+ : total) schedule(static)
    for (int64_t c = 0; c < int64_t(n / 4096); ++c) {
      const float* p = buf.data() + c * 4096;
      total += dot(p, p, 4096);  // one stream read: both operands are the same cache lines
    }
    double dt = omp_get_wtime() - t0;
    if (total < 0) dt += 1e-9;
    best = std::max(best, double(n) * 4 / dt / 1e9);
  }
  return best;
}

}  // namespace llmq::cpu
