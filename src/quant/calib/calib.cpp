#include "quant/calib/calib.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backend/cpu/kernels.hpp"
#include "io/mmap_file.hpp"

namespace llmq::quant {

std::vector<std::vector<int32_t>> load_calibration(const std::string& path, const Tokenizer& tok, int64_t n_samples,
                                                   int64_t seq_len, int64_t* tokens_found) {
  if (n_samples < 1 || seq_len < 2) throw Error("--calib-samples must be >= 1 and --calib-seq-len >= 2");
  if (!file_exists(path)) throw Error(path + ": calibration file not found");
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open");
  const int64_t needed = n_samples * seq_len;
  std::vector<int32_t> ids;
  std::string line, para;
  bool jsonl = false, decided = false;
  int64_t line_no = 0;
  auto add_text = [&](const std::string& t) {
    if (t.empty()) return;
    if (!ids.empty()) {
      auto sep = tok.encode("\n\n", false);
      ids.insert(ids.end(), sep.begin(), sep.end());
    }
    auto v = tok.encode(t, false);
    ids.insert(ids.end(), v.begin(), v.end());
  };
  while (int64_t(ids.size()) < needed && std::getline(f, line)) {
    ++line_no;
    if (!decided) {
      auto p = line.find_first_not_of(" \t\r");
      if (p == std::string::npos) continue;
      jsonl = line[p] == '{';
      decided = true;
    }
    if (jsonl) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception&) {
        throw Error(path + ":" + std::to_string(line_no) + ": invalid JSON line (JSONL calibration needs {\"text\": ...} per line)");
      }
      if (!j.contains("text") || !j["text"].is_string())
        throw Error(path + ":" + std::to_string(line_no) + ": no \"text\" string field");
      add_text(j["text"].get<std::string>());
    } else {
      // Plain text: tokenize paragraph by paragraph to bound memory.
      para += line;
      para += '\n';
      if (para.size() > (1u << 16)) {
        auto v = tok.encode(para, false);
        ids.insert(ids.end(), v.begin(), v.end());
        para.clear();
      }
    }
  }
  if (!para.empty()) {
    auto v = tok.encode(para, false);
    ids.insert(ids.end(), v.begin(), v.end());
  }
  if (tokens_found) *tokens_found = int64_t(ids.size());
  if (int64_t(ids.size()) < seq_len)
    throw Error(path + ": calibration text has " + std::to_string(ids.size()) + " tokens; at least " +
                std::to_string(seq_len) + " (one sequence of --calib-seq-len) are needed, " + std::to_string(needed) +
                " for --calib-samples " + std::to_string(n_samples));
  std::vector<std::vector<int32_t>> out;
  for (int64_t s = 0; s < n_samples && int64_t(ids.size()) >= (s + 1) * seq_len; ++s)
    out.emplace_back(ids.begin() + s * seq_len, ids.begin() + (s + 1) * seq_len);
  return out;
}

float SiteStats::tensor_absmax() const { return absmax.empty() ? 0.f : *std::max_element(absmax.begin(), absmax.end()); }

namespace {

struct Observer : ForwardHooks {
  CalibStats& st;
  bool hessian;
  std::vector<float> xt, h;  // scratch: X^T [dim, T], one sample's X^T X [dim, dim]
  Observer(CalibStats& s, bool hs) : st(s), hessian(hs) {}

  void linear_input(int64_t layer, Site site, const float* x, int64_t T, int64_t dim) override {
    SiteStats& s = st.sites[size_t(layer)][size_t(site)];
    if (s.dim == 0) {
      s.dim = dim;
      s.absmax.assign(size_t(dim), 0.f);
      s.abs_sum.assign(size_t(dim), 0.0);
      if (hessian) s.hessian.assign(size_t(dim * dim), 0.0);
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < dim; ++i) {
        const float v = x[t * dim + i];
        if (!std::isfinite(v))
          throw Error("calibration: layer " + std::to_string(layer) + " " + site_name(site) +
                      " input has a NaN or infinite activation (the weights or the model are broken)");
        s.absmax[size_t(i)] = std::max(s.absmax[size_t(i)], std::fabs(v));
        s.abs_sum[size_t(i)] += std::fabs(v);
      }
    s.tokens += T;
    if (!hessian) return;
    xt.resize(size_t(dim * T));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < dim; ++i) xt[size_t(i * T + t)] = x[t * dim + i];
    h.resize(size_t(dim * dim));
    cpu::matmul(xt.data(), T, dim, T, xt.data(), DType::F32, T, dim, h.data(), dim, nullptr);
    for (size_t i = 0; i < h.size(); ++i) s.hessian[i] += double(h[i]);
  }

  void kv(int64_t layer, const float* k, const float* v, int64_t T) override {
    auto& ka = st.k_absmax[size_t(layer)];
    auto& va = st.v_absmax[size_t(layer)];
    const int64_t d = int64_t(ka.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) {
        ka[size_t(i)] = std::max(ka[size_t(i)], std::fabs(k[t * d + i]));
        va[size_t(i)] = std::max(va[size_t(i)], std::fabs(v[t * d + i]));
      }
  }
};

}  // namespace

CalibStats make_stats(const Model& model) {
  const ModelConfig& c = model.config();
  CalibStats st;
  st.sites.resize(size_t(c.layers));
  st.k_absmax.assign(size_t(c.layers), std::vector<float>(size_t(c.kv_heads * c.head_dim), 0.f));
  st.v_absmax = st.k_absmax;
  return st;
}

SequentialCalibrator::SequentialCalibrator(const Model& model, const std::vector<std::vector<int32_t>>& samples)
    : model_(model) {
  for (auto& s : samples) {
    std::vector<BatchToken> b;
    for (size_t i = 0; i < s.size(); ++i) b.push_back({s[i], 0, int32_t(i), false});
    x_.emplace_back();
    model.embed_tokens(b, x_.back());
    batches_.push_back(std::move(b));
  }
}

void SequentialCalibrator::observe(int64_t l, bool with_hessian, CalibStats& st) {
  Observer obs(st, with_hessian);
  for (size_t s = 0; s < x_.size(); ++s) {
    KVCache cache(model_.config(), 1, int64_t(batches_[s].size()));
    std::vector<float> x = x_[s];
    model_.forward_layer(l, batches_[s], cache, x, &obs);
  }
  if (l == 0) {
    st.samples = int64_t(x_.size());
    for (auto& b : batches_) st.tokens += int64_t(b.size());
  }
}

void SequentialCalibrator::advance(int64_t l) {
  for (size_t s = 0; s < x_.size(); ++s) {
    KVCache cache(model_.config(), 1, int64_t(batches_[s].size()));
    model_.forward_layer(l, batches_[s], cache, x_[s], nullptr);
  }
}

CalibStats calibrate(const Model& model, const std::vector<std::vector<int32_t>>& samples, bool with_hessian,
                     const std::function<void(int64_t, int64_t)>& progress) {
  const ModelConfig& c = model.config();
  CalibStats st = make_stats(model);
  Observer obs(st, with_hessian);
  for (size_t s = 0; s < samples.size(); ++s) {
    KVCache cache(c, 1, int64_t(samples[s].size()));
    std::vector<BatchToken> batch;
    for (size_t i = 0; i < samples[s].size(); ++i) batch.push_back({samples[s][i], 0, int32_t(i), false});
    model.forward(batch, cache, nullptr, &obs);
    st.samples++;
    st.tokens += int64_t(samples[s].size());
    if (progress) progress(int64_t(s + 1), int64_t(samples.size()));
  }
  return st;
}

}  // namespace llmq::quant
