// Scalar references: the definition every SIMD path is tested against.
#include "backend/cpu/kernels.hpp"

#include <cmath>

#include "quant/formats/formats.hpp"

namespace llmq::cpu {

void gemm_ref(const float* x, int64_t ldx, int64_t M, int64_t K, const void* w, DType wt, int64_t ldw, int64_t n0,
              int64_t n1, float* y, int64_t ldy, const float* bias) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * load_as_f32(w, wt, size_t(n * ldw + k));
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
  }
}

void gemm_i8_ref(const int8_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, int64_t ldw, int64_t n0,
                 int64_t n1, int32_t* y, int64_t ldy) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      int32_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int32_t(x[m * ldx + k]) * int32_t(w[n * ldw + k]);
      y[m * ldy + n] = acc;
    }
}

void gemm_q4_ref(const float* x, int64_t ldx, int64_t M, const Q4Matrix& w, int64_t n0, int64_t n1, float* y,
                 int64_t ldy, const float* bias) {
  const int64_t ng = w.K / w.group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w.q + n * (w.K / 2);
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) {
        const quant::Int4Params p{w.scale[n * ng + k / w.group], w.zero[n * ng + k / w.group]};
        acc += x[m * ldx + k] * quant::dequant_int4(quant::unpack_int4(row, k), p);
      }
      y[m * ldy + n] = acc + (bias ? bias[n] : 0.f);
    }
}

void wsum_ref(const float* p, int64_t ldp, int64_t R, int64_t n, const float* v, int64_t ldv, int64_t D, float* out,
              int64_t ldo) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) {
      float acc = 0.f;
      for (int64_t j = 0; j < n; ++j) acc = std::fma(p[r * ldp + j], v[j * ldv + d], acc);
      out[r * ldo + d] = acc;
    }
}

float dot_ref(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

}  // namespace llmq::cpu
