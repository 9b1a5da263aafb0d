#include "eval/compare.hpp"

#include "runtime/engine.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

namespace llmq {

namespace {

// log-softmax of a row, in double
void log_softmax(const float* x, int64_t n, std::vector<double>& out) {
  out.resize(size_t(n));
  float mx = x[0];
  for (int64_t i = 1; i < n; ++i) mx = std::max(mx, x[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(x[i]) - mx);
  const double lse = std::log(sum) + mx;
  for (int64_t i = 0; i < n; ++i) out[size_t(i)] = double(x[i]) - lse;
}

struct LayerErrorHooks : ForwardHooks {
  const Model& q;
  const Model& base;
  std::vector<double> err2, ref2;  // per linear: sum ||Yq - Y||^2, sum ||Y||^2
  std::vector<std::string> names;
  LayerErrorHooks(const Model& qm, const Model& bm) : q(qm), base(bm) {
    for (int64_t l = 0; l < base.config().layers; ++l)
      for (int s = 0; s < kNumSites; ++s)
        for (const std::string& n : site_linear_names(Site(s))) names.push_back("model.layers." + std::to_string(l) + "." + n);
    if (q.lm_head().fmt != WeightFormat::Dense) names.push_back("lm_head");  // (--lm-head int8; the last entry)
    err2.assign(names.size(), 0);
    ref2.assign(names.size(), 0);
  }
  size_t index(int64_t layer, Site site, size_t i) const {
    static const size_t offs[kNumSites] = {0, 3, 4, 6};
    return size_t(layer) * 7 + offs[int(site)] + i;
  }
  void linear_input(int64_t layer, Site site, const float* x, int64_t T, int64_t dim) override {
    auto bl = base.site_linears(layer, site);
    auto ql = q.site_linears(layer, site);
    for (size_t i = 0; i < bl.size(); ++i) {
      std::vector<float> yb(size_t(T * bl[i]->out)), yq(yb.size());
      bl[i]->forward(x, T, yb.data());
      const float* xin = x;
      std::vector<float> xs;
      if (!ql[i]->smooth.empty()) {
        xs.assign(x, x + T * dim);
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < dim; ++j) xs[size_t(t * dim + j)] /= ql[i]->smooth[size_t(j)];
        xin = xs.data();
      }
      ql[i]->forward(xin, T, yq.data());
      // up_proj and v_proj rows also carry the next site's smoothing (divided by it): undo that on the output.
      const LayerWeights& QL = q.layers()[size_t(layer)];
      const ModelConfig& c = q.config();
      const int64_t n_out = ql[i]->out;
      if (ql[i] == &QL.up && !QL.down.smooth.empty()) {
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < n_out; ++j) yq[size_t(t * n_out + j)] *= QL.down.smooth[size_t(j)];
      } else if (ql[i] == &QL.v && !QL.o.smooth.empty()) {
        const int64_t hd = c.head_dim, group = c.heads / c.kv_heads;
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < n_out; ++j) yq[size_t(t * n_out + j)] *= QL.o.smooth[size_t((j / hd) * group * hd + j % hd)];
      }
      add(index(layer, site, i), yq, yb);
    }
  }
  void head_input(const float* x, int64_t T, int64_t dim) override {
    if (q.lm_head().fmt == WeightFormat::Dense) return;
    std::vector<float> yb(size_t(T * base.lm_head().out)), yq(yb.size());
    base.lm_head().forward(x, T, yb.data());
    q.lm_head().forward(x, T, yq.data());
    add(names.size() - 1, yq, yb);
  }
  void add(size_t i, const std::vector<float>& yq, const std::vector<float>& yb) {
    double e = 0, r = 0;
    for (size_t k = 0; k < yb.size(); ++k) {
      e += double(yq[k] - yb[k]) * double(yq[k] - yb[k]);
      r += double(yb[k]) * double(yb[k]);
    }
    err2[i] += e;
    ref2[i] += r;
  }
};

}  // namespace

CompareResult compare(const Model& model, const Model& baseline, const std::vector<int32_t>& tokens, int64_t ctx,
                      int64_t max_windows, bool per_layer, const std::function<void(int64_t, int64_t)>& progress,
                      const std::string& device) {
  const ModelConfig& c = model.config();
  const ModelConfig& b = baseline.config();
  if (c.vocab != b.vocab || c.layers != b.layers || c.hidden != b.hidden)
    throw Error("the model and the baseline differ in shape (vocab, layers or hidden size); compare a model with its own original");
  if (ctx < 2 || ctx > c.max_positions) throw Error("--ctx must be in [2, " + std::to_string(c.max_positions) + "]");
  int64_t windows = int64_t(tokens.size()) / ctx;
  if (windows == 0)
    throw Error("the text has " + std::to_string(tokens.size()) + " tokens, fewer than one window of " + std::to_string(ctx));
  if (max_windows > 0) windows = std::min(windows, max_windows);
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t V = c.vocab;
  std::vector<float> lq(size_t(ctx * V)), lb(size_t(ctx * V));
  KVCache cb(b, 1, ctx);  // the baseline's cache when it runs on the CPU with hooks
  std::unique_ptr<Engine> eq = make_engine(model, device);
  std::unique_ptr<Engine> eb = per_layer ? nullptr : make_engine(baseline, device);
  eq->reset(1, ctx);
  if (eb) eb->reset(1, ctx);
  std::vector<double> klds;
  double nll_q = 0, nll_b = 0, dp2 = 0;
  int64_t agree = 0;
  LayerErrorHooks hooks(model, baseline);
  struct PositionStats {
    double kld, lq, lb, dp;  // KL(base || q), both log-probabilities of the target, their probabilities' difference
    bool agree;              // same top-1 token
  };
  std::vector<PositionStats> pos(static_cast<size_t>(ctx - 1));
  for (int64_t w = 0; w < windows; ++w) {
    std::vector<BatchToken> batch;
    for (int64_t i = 0; i < ctx; ++i) batch.push_back({tokens[size_t(w * ctx + i)], 0, int32_t(i), i + 1 < ctx});
    eq->forward(batch, lq.data());
    if (eb) eb->forward(batch, lb.data());
    else baseline.forward(batch, cb, lb.data(), &hooks);
    // Each position's statistics on its own thread (three vocabularies of exponentials each), accumulated below in
    // position order, so that the results do not depend on the thread count.
#pragma omp parallel
    {
      std::vector<double> ls_q, ls_b;
#pragma omp for schedule(static)
      for (int64_t i = 0; i < ctx - 1; ++i) {
        const int32_t target = tokens[size_t(w * ctx + i + 1)];
        log_softmax(&lq[size_t(i * V)], V, ls_q);
        log_softmax(&lb[size_t(i * V)], V, ls_b);
        double kld = 0;
        int64_t aq = 0, ab = 0;
        for (int64_t v = 0; v < V; ++v) {
          kld += std::exp(ls_b[size_t(v)]) * (ls_b[size_t(v)] - ls_q[size_t(v)]);
          if (ls_q[size_t(v)] > ls_q[size_t(aq)]) aq = v;
          if (ls_b[size_t(v)] > ls_b[size_t(ab)]) ab = v;
        }
        PositionStats& p = pos[size_t(i)];
        p.kld = std::max(0.0, kld);
        p.agree = aq == ab;
        p.lq = ls_q[size_t(target)];
        p.lb = ls_b[size_t(target)];
        p.dp = std::exp(ls_q[size_t(target)]) - std::exp(ls_b[size_t(target)]);
      }
    }
    for (int64_t i = 0; i + 1 < ctx; ++i) {
      const PositionStats& p = pos[size_t(i)];
      klds.push_back(p.kld);
      agree += p.agree;
      nll_q -= p.lq;
      nll_b -= p.lb;
      dp2 += p.dp * p.dp;
    }
    if (progress) progress(w + 1, windows);
  }
  CompareResult r;
  r.windows = windows;
  r.predicted = int64_t(klds.size());
  const double n = double(r.predicted);
  r.ppl = std::exp(nll_q / n);
  r.baseline_ppl = std::exp(nll_b / n);
  r.delta_ppl_pct = 100.0 * (r.ppl - r.baseline_ppl) / r.baseline_ppl;
  double ksum = 0;
  for (double k : klds) ksum += k;
  r.mean_kld = ksum / n;
  std::vector<double> sorted = klds;
  const size_t p99 = std::min(sorted.size() - 1, size_t(std::ceil(0.99 * double(sorted.size()))) - 1);
  std::nth_element(sorted.begin(), sorted.begin() + int64_t(p99), sorted.end());
  r.kld_p99 = sorted[p99];
  r.top1_agreement = double(agree) / n;
  r.rms_delta_p = std::sqrt(dp2 / n);
  if (per_layer) {
    for (size_t i = 0; i < hooks.names.size(); ++i)
      r.layers.push_back({hooks.names[i], hooks.ref2[i] > 0 ? std::sqrt(hooks.err2[i] / hooks.ref2[i]) : 0.0});
    std::sort(r.layers.begin(), r.layers.end(), [](const LayerError& a, const LayerError& b2) { return a.rel_error > b2.rel_error; });
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace llmq
