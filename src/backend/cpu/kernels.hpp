// CPU kernels: the scalar references and their SIMD versions (AVX2/FMA, AVX-512), chosen at run time.
//
// Every kernel computes in FP32; weights may be stored as F32, F16 or BF16 and are widened exactly.
#pragma once

#include <cstdint>

#include "common.hpp"

namespace llmq::cpu {

enum class Isa { Scalar, AVX2, AVX512 };
const char* isa_name(Isa isa);
Isa detected_isa();      // the best the processor supports
Isa active_isa();        // what the kernels use now (detected unless overridden)
void set_isa(Isa isa);   // for tests and benchmarks; throws llmq::Error if the processor lacks it

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for m < M, n < N.
//   x: [M, K] floats, row stride ldx;  w: [N, K] of type wt (F32, F16, BF16, I8 or F8E4M3), row stride ldw;
//   y: [M, N] floats, row stride ldy;  bias: [N] floats or null.
// Multi-threaded (OpenMP) over N, and over M when N is small. From kGemmPackMinM rows of x on, the SIMD versions
// widen blocks of w once into FP32 panels (prefill); below, they stream each weight row once (decode).
constexpr int64_t kGemmPackMinM = 16;
void matmul(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t N,
            float* y, int64_t ldy, const float* bias);

// Several products of the same x with different weights, in one parallel region (q/k/v, gate/up): each
// thread takes its share of every job's rows, which balances better and synchronizes once.
struct MatmulJob {
  const void* w;
  DType wt;
  int64_t N;
  float* y;            // [M, N], row stride N
  const float* bias;   // [N] or null
};
void matmul_multi(const float* x, int64_t M, int64_t K, const MatmulJob* jobs, int n_jobs);

// The same on the calling thread only (for use inside parallel regions).
void gemm_single(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t N,
                 float* y, int64_t ldy);

// Single-threaded pieces with the same contract, on rows [n0, n1) of w. The scalar one is the reference.
using GemmFn = void (*)(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw,
                        int64_t n0, int64_t n1, float* y, int64_t ldy, const float* bias);
void gemm_ref(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t n0,
              int64_t n1, float* y, int64_t ldy, const float* bias);

// y[m, n] = sum_k x[m, k] * w[n, k], exactly, in int32 (INT8 x INT8 -> INT32, as the W8A8 tensor-core
// path computes). x: [M, K] int8 in [-127, 127] (symmetric activations: the SIMD paths need -128 absent from x),
// stride ldx; w: [N, K] int8, any value, stride ldw; y: [M, N] int32, stride ldy.
void matmul_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t N,
               int32_t* y, int64_t ldy);
void gemm_i8_ref(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0,
                 int64_t n1, int32_t* y, int64_t ldy);

// INT4 group weights (quant/formats/formats.hpp): row n holds K / 2 bytes, two 4-bit codes a byte, the low nibble
// first; the code q at column k stands for (q - zero[n, k / group]) * scale[n, k / group] (one rounding, as
// quant::dequant_int4). K and group even, group divides K.
struct Q4Matrix {
  const uint8_t* q;      // [N, K / 2]
  const float* scale;    // [N, K / group]
  const uint8_t* zero;   // [N, K / group]
  int64_t K, group;
};
// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) with w dequantized as above, fused: the weights are read as
// codes and never exist whole in FP32. Multi-threaded over N like matmul. The SIMD versions decode groups that
// are multiples of 16 in registers; other group sizes are dequantized by the scalar code into their FP32 GEMM.
void matmul_q4(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t N, float* y, int64_t ldy,
               const float* bias);
using GemmQ4Fn = void (*)(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y,
                          int64_t ldy, const float* bias);
void gemm_q4_ref(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y,
                 int64_t ldy, const float* bias);

// out[r, d] = sum_{j < n} p[r, j] * v[j, d] for r < R, d < D (out overwritten): attention's weighted sum of V
// rows. p: [R, n] (row stride ldp), v: [n, D] (row stride ldv), out: [R, D] (row stride ldo). Each output is
// one FMA chain in j order (y += p * v, one rounding a step), with the sums kept in registers.
void wsum(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
          int64_t ldo);
void wsum_ref(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
              int64_t ldo);

// sum_i a[i] * b[i]
float dot(const float* a, const float* b, int64_t n);
float dot_ref(const float* a, const float* b, int64_t n);

// Measured peak of this machine: FP32 FMA GFLOP/s over all threads, and read bandwidth in GB/s.
double measure_peak_gflops();
double measure_peak_read_gbps();

namespace avx2 {
void gemm_q4(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
             const float* bias);
void wsum(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
          int64_t ldo);
void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t n0,
          int64_t n1, float* y, int64_t ldy, const float* bias);
float dot(const float* a, const float* b, int64_t n);
float fma_loop(int64_t iters);  // 10 * iters vector FMAs
int fma_loop_lanes();
void gemm_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0, int64_t n1,
             int32_t* y, int64_t ldy);
}  // namespace avx2
namespace avx512 {
void gemm_q4(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y, int64_t ldy,
             const float* bias);
void wsum(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
          int64_t ldo);
void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t n0,
          int64_t n1, float* y, int64_t ldy, const float* bias);
float dot(const float* a, const float* b, int64_t n);
float fma_loop(int64_t iters);  // 10 * iters vector FMAs
int fma_loop_lanes();
void gemm_i8(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0, int64_t n1,
             int32_t* y, int64_t ldy);
}  // namespace avx512

}  // namespace llmq::cpu
