#include "model/linear.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.hpp"
#include "quant/formats/formats.hpp"

namespace llmq {

void fake_quant_fp8(const float* x, int64_t n, float scale, float* out) {
  const float inv = 1.0f / scale;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) out[i] = quant::fp8_round(x[i] * inv) * scale;
}

void Linear::dequantize_rows(int64_t r0, int64_t r1, float* outp) const {
  const int64_t ng = fmt == WeightFormat::Int4Group ? in / group : 0;
  for (int64_t r = r0; r < r1; ++r) {
    float* o = outp + (r - r0) * in;
    switch (fmt) {
      case WeightFormat::Dense:
        for (int64_t k = 0; k < in; ++k) o[k] = load_as_f32(w->data, w->dtype, size_t(r * in + k));
        break;
      case WeightFormat::Int8Channel:
      case WeightFormat::Fp8Channel:
        for (int64_t k = 0; k < in; ++k) o[k] = load_as_f32(w->data, w->dtype, size_t(r * in + k)) * w_scale[size_t(r)];
        break;
      case WeightFormat::Int4Group: {
        const uint8_t* packed = static_cast<const uint8_t*>(w->data) + r * (in / 2);
        for (int64_t g = 0; g < ng; ++g) {
          const quant::Int4Params p{w_scale[size_t(r * ng + g)], w_zero[size_t(r * ng + g)]};
          for (int64_t k = g * group; k < (g + 1) * group; ++k) o[k] = quant::dequant_int4(quant::unpack_int4(packed, k), p);
        }
        break;
      }
    }
  }
}

uint64_t Linear::weight_bytes() const {
  return w->nbytes() + w_scale.size() * 4 + w_zero.size() + bias.size() * 4;
}

void Linear::forward(const float* x, int64_t M, float* y) const {
  const float* b = bias.empty() ? nullptr : bias.data();
  if (fmt == WeightFormat::Dense) {
    cpu::matmul(x, in, M, in, w->data, w->dtype, in, out, y, out, b);
    return;
  }
  auto finish = [&](auto&& value_of) {  // y = value * scale[n] (+ bias)
#pragma omp parallel for schedule(static) if (M * out > 65536)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < out; ++n) y[m * out + n] = value_of(m, n) * w_scale[size_t(n)] + (b ? b[n] : 0.f);
  };
  if (fmt == WeightFormat::Int4Group) {  // fused: codes dequantized per group inside the GEMM
    const cpu::Q4Matrix q{static_cast<const uint8_t*>(w->data), w_scale.data(), w_zero.data(), in, group};
    cpu::matmul_q4(x, in, M, q, out, y, out, b);
    return;
  }
  if (act == ActQuant::Int8Token || act == ActQuant::Int8Tensor) {
    // Per-token (or static per-tensor) symmetric INT8 activations, INT8 x INT8 -> INT32, scales after.
    std::vector<int8_t> xq(static_cast<size_t>(M * in));
    std::vector<float> sx(static_cast<size_t>(M));
#pragma omp parallel for schedule(static) if (M * in > 65536)
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * in;
      float s = act_scale;
      if (act == ActQuant::Int8Token) {
        float amax = 0.f;
        for (int64_t k = 0; k < in; ++k) amax = std::max(amax, std::fabs(xr[k]));
        s = amax > 0 ? amax / 127.0f : 1.0f;
      }
      sx[size_t(m)] = s;
      const float inv = 1.0f / s;
      for (int64_t k = 0; k < in; ++k) xq[size_t(m * in + k)] = quant::quant_int8(xr[k], inv);
    }
    std::vector<int32_t> acc(static_cast<size_t>(M * out));
    cpu::matmul_i8(xq.data(), in, M, in, static_cast<const int8_t*>(w->data), in, out, acc.data(), out);
    finish([&](int64_t m, int64_t n) { return float(acc[size_t(m * out + n)]) * sx[size_t(m)]; });
    return;
  }
  // FP8 or INT8 weights with float (or FP8 fake-quantized) activations: exact products, FP32 accumulation.
  std::vector<float> xin;
  const float* xp = x;
  if (act == ActQuant::Fp8Tensor) {
    xin.resize(size_t(M * in));
    fake_quant_fp8(x, M * in, act_scale, xin.data());
    xp = xin.data();
  }
  cpu::matmul(xp, in, M, in, w->data, w->dtype, in, out, y, out, nullptr);
  finish([&](int64_t m, int64_t n) { return y[m * out + n]; });
}

void Linear::forward_many(const float* x, int64_t M, std::initializer_list<std::pair<const Linear*, float*>> outs) {
  bool dense = true;
  for (auto& [l, y] : outs) dense = dense && l->fmt == WeightFormat::Dense;
  if (!dense) {
    for (auto& [l, y] : outs) l->forward(x, M, y);
    return;
  }
  cpu::MatmulJob jobs[8];
  int n = 0;
  for (auto& [l, y] : outs) jobs[n++] = {l->w->data, l->w->dtype, l->out, y, l->bias.empty() ? nullptr : l->bias.data()};
  cpu::matmul_multi(x, M, outs.begin()->first->in, jobs, n);
}

}  // namespace llmq
