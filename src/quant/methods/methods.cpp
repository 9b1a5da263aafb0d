#include "quant/methods/methods.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/cpu/kernels.hpp"
#include "quant/formats/formats.hpp"

namespace llmq::quant {

namespace {

std::vector<uint8_t> as_bytes(const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  return std::vector<uint8_t>(b, b + n);
}

Int4Params group_params(const float* w, int64_t n, bool symmetric, float clip) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, w[i]);
    hi = std::max(hi, w[i]);
  }
  return int4_params(lo * clip, hi * clip, symmetric);
}

}  // namespace

Int4Weights rtn_int4(const FLinear& l, int64_t group, bool symmetric, const std::vector<float>& clip) {
  Int4Weights q{l.out, l.in, group, symmetric, {}, {}, {}};
  const int64_t ng = l.in / group;
  q.codes.resize(size_t(l.out * l.in));
  q.scale.resize(size_t(l.out * ng));
  q.zero.resize(size_t(l.out * ng));
#pragma omp parallel for schedule(static) if (l.out * l.in > (int64_t(1) << 16))
  for (int64_t r = 0; r < l.out; ++r)
    for (int64_t g = 0; g < ng; ++g) {
      const float* w = &l.w[size_t(r * l.in + g * group)];
      const Int4Params p = group_params(w, group, symmetric, clip.empty() ? 1.f : clip[size_t(r * ng + g)]);
      q.scale[size_t(r * ng + g)] = p.scale;
      q.zero[size_t(r * ng + g)] = p.zero;
      for (int64_t k = 0; k < group; ++k) q.codes[size_t(r * l.in + g * group + k)] = quant_int4(w[k], p);
    }
  return q;
}

std::vector<float> dequant(const Int4Weights& q) {
  const int64_t ng = q.in / q.group;
  std::vector<float> w(q.codes.size());
#pragma omp parallel for schedule(static) if (q.out * q.in > (int64_t(1) << 16))
  for (int64_t r = 0; r < q.out; ++r)
    for (int64_t k = 0; k < q.in; ++k) {
      const int64_t g = r * ng + k / q.group;
      w[size_t(r * q.in + k)] = dequant_int4(q.codes[size_t(r * q.in + k)], {q.scale[size_t(g)], q.zero[size_t(g)]});
    }
  return w;
}

void emit_f32(const std::string& name, const std::vector<float>& v, std::vector<int64_t> shape,
              std::vector<TensorData>& out) {
  out.push_back({name, DType::F32, std::move(shape), as_bytes(v.data(), v.size() * 4)});
}

void emit_bias(const FLinear& l, std::vector<TensorData>& out) {
  if (!l.bias.empty()) emit_f32(l.name + ".bias", l.bias, {l.out}, out);
}

void emit_int4(const std::string& name, const Int4Weights& q, std::vector<TensorData>& out) {
  std::vector<uint8_t> packed(static_cast<size_t>(q.out * q.in / 2));
#pragma omp parallel for schedule(static) if (packed.size() > (size_t(1) << 16))
  for (size_t i = 0; i < packed.size(); ++i) packed[i] = pack_int4(q.codes[2 * i], q.codes[2 * i + 1]);
  const int64_t ng = q.in / q.group;
  out.push_back({name + ".weight_packed", DType::U8, {q.out, q.in / 2}, std::move(packed)});
  emit_f32(name + ".weight_scale", q.scale, {q.out, ng}, out);
  if (!q.symmetric) out.push_back({name + ".weight_zero_point", DType::U8, {q.out, ng}, q.zero});
}

namespace {

// Per-channel symmetric encoding: scale = row absmax / qmax, one code byte per weight.
template <class Encode>
void emit_channel(const FLinear& l, DType dtype, float qmax, Encode&& encode, std::vector<TensorData>& out) {
  std::vector<uint8_t> codes(size_t(l.out * l.in));
  std::vector<float> scale(size_t(l.out));
#pragma omp parallel for schedule(static) if (l.out * l.in > (int64_t(1) << 16))
  for (int64_t r = 0; r < l.out; ++r) {
    float amax = 0.f;
    for (int64_t k = 0; k < l.in; ++k) amax = std::max(amax, std::fabs(l.w[size_t(r * l.in + k)]));
    const float s = amax > 0 ? amax / qmax : 1.0f;
    scale[size_t(r)] = s;
    for (int64_t k = 0; k < l.in; ++k) codes[size_t(r * l.in + k)] = encode(l.w[size_t(r * l.in + k)], s);
  }
  out.push_back({l.name + ".weight", dtype, {l.out, l.in}, std::move(codes)});
  emit_f32(l.name + ".weight_scale", scale, {l.out, 1}, out);
}

}  // namespace

void emit_int8_channel(const FLinear& l, std::vector<TensorData>& out) {
  emit_channel(l, DType::I8, 127.0f, [](float w, float s) { return uint8_t(quant_int8(w, 1.0f / s)); }, out);
}

void emit_fp8_channel(const FLinear& l, std::vector<TensorData>& out) {
  emit_channel(l, DType::F8E4M3, kFp8Max, [](float w, float s) { return f32_to_fp8(w / s); }, out);
}

double output_error(const FLinear& l, const std::vector<float>& wq, const std::vector<float>& h) {
  std::vector<float> d(l.w.size()), p(l.w.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = l.w[i] - wq[i];
  // P = D H (H symmetric: its rows serve as the weight rows), then sum of D .* P
  cpu::matmul(d.data(), l.in, l.out, l.in, h.data(), DType::F32, l.in, l.in, p.data(), l.in, nullptr);
  double e = 0;
  for (size_t i = 0; i < d.size(); ++i) e += double(d[i]) * double(p[i]);
  return e;
}

std::vector<float> awq_clip_search(const FLinear& l, int64_t group, bool symmetric, const std::vector<float>& h) {
  const int64_t ng = l.in / group;
  std::vector<float> best(static_cast<size_t>(l.out * ng), 1.f);
  // H's diagonal blocks, one per group: [ng][group, group]
  std::vector<float> blocks(static_cast<size_t>(ng * group * group));
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t i = 0; i < group; ++i)
      for (int64_t j = 0; j < group; ++j)
        blocks[size_t((g * group + i) * group + j)] = h[size_t((g * group + i) * l.in + g * group + j)];
#pragma omp parallel
  {
    std::vector<float> delta(static_cast<size_t>(group)), hd(static_cast<size_t>(group));
#pragma omp for schedule(dynamic, 8)
    for (int64_t rg = 0; rg < l.out * ng; ++rg) {
      const int64_t r = rg / ng, g = rg % ng;
      const float* w = &l.w[size_t(r * l.in + g * group)];
      const float* hb = &blocks[size_t(g * group * group)];
      double best_err = INFINITY;
      for (int step = 0; step < 10; ++step) {
        const float ratio = 1.0f - 0.05f * float(step);
        const Int4Params p = group_params(w, group, symmetric, ratio);
        for (int64_t k = 0; k < group; ++k) delta[size_t(k)] = w[k] - dequant_int4(quant_int4(w[k], p), p);
        double e = 0;
        for (int64_t i = 0; i < group; ++i) e += double(delta[size_t(i)]) * cpu::dot(hb + i * group, delta.data(), group);
        if (e < best_err) {
          best_err = e;
          best[size_t(rg)] = ratio;
        }
      }
    }
  }
  return best;
}

namespace {

// In-place Cholesky A = L L^T of a symmetric positive-definite [n, n] matrix; L in the lower triangle.
bool cholesky(std::vector<double>& a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    double d = a[size_t(j * n + j)];
    for (int64_t k = 0; k < j; ++k) d -= a[size_t(j * n + k)] * a[size_t(j * n + k)];
    if (!(d > 0) || !std::isfinite(d)) return false;
    d = std::sqrt(d);
    a[size_t(j * n + j)] = d;
#pragma omp parallel for schedule(static) if (n - j > 256)
    for (int64_t i = j + 1; i < n; ++i) {
      double s = a[size_t(i * n + j)];
      const double* ai = &a[size_t(i * n)];
      const double* aj = &a[size_t(j * n)];
      for (int64_t k = 0; k < j; ++k) s -= ai[k] * aj[k];
      a[size_t(i * n + j)] = s / d;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) a[size_t(i * n + j)] = 0;
  return true;
}

// Upper Cholesky factor U of H^-1 (H^-1 = U^T U), from H's lower factor L: H^-1 = L^-T L^-1.
bool inverse_upper_factor(std::vector<double>& hmat, int64_t n) {
  if (!cholesky(hmat, n)) return false;
  // Linv = L^-1 (lower triangular), by forward substitution column by column.
  std::vector<double> linv(static_cast<size_t>(n * n), 0.0);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t c = 0; c < n; ++c) {
    linv[size_t(c * n + c)] = 1.0 / hmat[size_t(c * n + c)];
    for (int64_t i = c + 1; i < n; ++i) {
      double s = 0;
      for (int64_t k = c; k < i; ++k) s += hmat[size_t(i * n + k)] * linv[size_t(k * n + c)];
      linv[size_t(i * n + c)] = -s / hmat[size_t(i * n + i)];
    }
  }
  // Hinv = Linv^T Linv
  std::vector<double> hinv(static_cast<size_t>(n * n), 0.0);
#pragma omp parallel for schedule(dynamic, 16)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) {
      double s = 0;
      for (int64_t k = j; k < n; ++k) s += linv[size_t(k * n + i)] * linv[size_t(k * n + j)];
      hinv[size_t(i * n + j)] = hinv[size_t(j * n + i)] = s;
    }
  if (!cholesky(hinv, n)) return false;
  // U = L_hinv^T
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) hmat[size_t(i * n + j)] = j >= i ? hinv[size_t(j * n + i)] : 0.0;
  return true;
}

}  // namespace

GptqResult gptq(const FLinear& l, const std::vector<double>& h_in, int64_t group, bool symmetric, bool act_order,
                int64_t block, double damp0) {
  const int64_t n = l.in, rows = l.out, ng = n / group;
  GptqResult res;
  res.q = Int4Weights{rows, n, group, symmetric, std::vector<uint8_t>(size_t(rows * n)),
                      std::vector<float>(size_t(rows * ng)), std::vector<uint8_t>(size_t(rows * ng))};
  std::vector<double> w(l.w.begin(), l.w.end());  // [rows, n], permuted columns when act_order
  std::vector<double> h = h_in;
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  for (int64_t j = 0; j < n; ++j)
    if (h[size_t(j * n + j)] == 0) {  // a dead input channel: nothing to preserve
      h[size_t(j * n + j)] = 1;
      for (int64_t r = 0; r < rows; ++r) w[size_t(r * n + j)] = 0;
    }
  // Group parameters: static (from the original weights) with act_order, else found as each group starts.
  // Group range: the shrink of [min, max] (1.00, 0.99, ..., 0.80) with the least |w - q(w)|^2.4 over the
  // group, as the reference GPTQ's `mse` option searches.
  auto set_params = [&](int64_t r, int64_t g, const double* src, int64_t stride) {
    float lo = 0.f, hi = 0.f;
    for (int64_t k = 0; k < group; ++k) {
      lo = std::min(lo, float(src[k * stride]));
      hi = std::max(hi, float(src[k * stride]));
    }
    Int4Params p = int4_params(lo, hi, symmetric);
    double best = INFINITY;
    for (int i = 0; i <= 20; ++i) {
      const float shrink = 1.0f - 0.01f * float(i);
      const Int4Params cand = int4_params(lo * shrink, hi * shrink, symmetric);
      double e = 0;
      for (int64_t k = 0; k < group; ++k) {
        const float x = float(src[k * stride]);
        e += std::pow(std::fabs(double(x - dequant_int4(quant_int4(x, cand), cand))), 2.4);
      }
      if (e < best) {
        best = e;
        p = cand;
      }
    }
    res.q.scale[size_t(r * ng + g)] = p.scale;
    res.q.zero[size_t(r * ng + g)] = p.zero;
  };
  if (act_order) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < ng; ++g) set_params(r, g, &w[size_t(r * n + g * group)], 1);
    std::stable_sort(perm.begin(), perm.end(),
                     [&](int64_t a, int64_t b) { return h[size_t(a * n + a)] > h[size_t(b * n + b)]; });
    std::vector<double> wp(w.size()), hp(h.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < n; ++j) wp[size_t(r * n + j)] = w[size_t(r * n + perm[size_t(j)])];
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) hp[size_t(i * n + j)] = h[size_t(perm[size_t(i)] * n + perm[size_t(j)])];
    w.swap(wp);
    h.swap(hp);
  }
  double mean_diag = 0;
  for (int64_t j = 0; j < n; ++j) mean_diag += h[size_t(j * n + j)];
  mean_diag /= double(n);
  std::vector<double> u;
  bool ok = false;
  for (double damp = damp0; damp <= 10.0 && !ok; damp *= 10) {
    u = h;
    for (int64_t j = 0; j < n; ++j) u[size_t(j * n + j)] += damp * mean_diag;
    ok = inverse_upper_factor(u, n);
    res.damp_used = damp;
  }
  if (!ok) {
    res.fell_back_to_rtn = true;
    res.q = rtn_int4(l, group, symmetric);
    return res;
  }
  std::vector<double> err(static_cast<size_t>(rows * block));
  for (int64_t i1 = 0; i1 < n; i1 += block) {
    const int64_t i2 = std::min(n, i1 + block), bs = i2 - i1;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      double* wr = &w[size_t(r * n)];
      for (int64_t i = i1; i < i2; ++i) {
        const int64_t col = perm[size_t(i)];  // original column index
        const int64_t g = col / group;
        if (!act_order && col % group == 0) set_params(r, g, wr + i, 1);
        const Int4Params p{res.q.scale[size_t(r * ng + g)], res.q.zero[size_t(r * ng + g)]};
        const uint8_t code = quant_int4(float(wr[i]), p);
        res.q.codes[size_t(r * n + col)] = code;
        const double e = (wr[i] - double(dequant_int4(code, p))) / u[size_t(i * n + i)];
        const double* ui = &u[size_t(i * n)];
        for (int64_t j = i + 1; j < i2; ++j) wr[j] -= e * ui[j];
        err[size_t(r * block + (i - i1))] = e;
      }
      // lazy update of the columns after the block
      for (int64_t i = 0; i < bs; ++i) {
        const double e = err[size_t(r * block + i)];
        const double* ui = &u[size_t((i1 + i) * n)];
        for (int64_t j = i2; j < n; ++j) wr[j] -= e * ui[j];
      }
    }
  }
  return res;
}

}  // namespace llmq::quant
