#include "quant/quantize.hpp"

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "io/mmap_file.hpp"
#include "io/output_dir.hpp"
#include "model/llama.hpp"
#include "quant/calib/calib.hpp"
#include "quant/methods/methods.hpp"
#include "tokenizer/tokenizer.hpp"

namespace llmq::quant {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::vector<std::string> kMethods = {"fp8", "int8-sq", "w8a16", "w4a16-rtn", "w4a16-awq", "w4a16-gptq"};

namespace {

// Files a quantization copies into its temporary directory beside the safetensors and config.json.
constexpr std::array<const char*, 6> kCopiedFiles = {"tokenizer.json",         "tokenizer.json.gz",
                                                     "tokenizer_config.json",  "generation_config.json",
                                                     "special_tokens_map.json", "tokenizer.model"};

// Float working copy of one decoder layer.
struct FLayer {
  FLinear q, k, v, o, gate, up, down;
  std::vector<float> attn_norm, mlp_norm;
  bool norms_changed = false;
  std::vector<float> smooth[kNumSites];  // the migration factors applied at each site (empty: none)
  std::vector<FLinear*> site(Site s) {
    switch (s) {
      case Site::AttnIn: return {&q, &k, &v};
      case Site::AttnOut: return {&o};
      case Site::MlpIn: return {&gate, &up};
      case Site::MlpDown: return {&down};
    }
    return {};
  }
};

// Rows [row0, row1) of the linear (default all) as float; its bias only when whole.
FLinear to_float(const Linear& l, const std::string& name, int64_t row0 = 0, int64_t row1 = -1) {
  if (row1 < 0) row1 = l.out;
  const int64_t n = row1 - row0;
  FLinear f{name, n, l.in, std::vector<float>(size_t(n * l.in)), n == l.out ? l.bias : std::vector<float>{}};
  constexpr int64_t kRows = 64;
  bool finite = true;
#pragma omp parallel for schedule(static) reduction(&& : finite) if (n * l.in > (int64_t(1) << 16))
  for (int64_t r0 = row0; r0 < row1; r0 += kRows) {
    const int64_t r1 = std::min(row1, r0 + kRows);
    float* w = f.w.data() + (r0 - row0) * l.in;
    l.dequantize_rows(r0, r1, w);
    for (int64_t i = 0; i < (r1 - r0) * l.in; ++i) finite = finite && std::isfinite(w[i]);
  }
  if (!finite) throw Error(l.w->file + ": tensor '" + l.w->name + "' contains NaN or infinite values");
  return f;
}

// Per-channel statistic of the o_proj input made equal across the query heads sharing a KV head (so that it
// can be folded into v_proj's rows): max or mean over the heads of each group.
std::vector<float> tie_gqa(const std::vector<float>& v, const ModelConfig& c, bool take_max) {
  const int64_t hd = c.head_dim, group = c.heads / c.kv_heads;
  std::vector<float> out(v.size());
  for (int64_t g = 0; g < c.kv_heads; ++g)
    for (int64_t d = 0; d < hd; ++d) {
      float acc = 0.f;
      for (int64_t h = g * group; h < (g + 1) * group; ++h)
        acc = take_max ? std::max(acc, v[size_t(h * hd + d)]) : acc + v[size_t(h * hd + d)] / float(group);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) out[size_t(h * hd + d)] = acc;
    }
  return out;
}

// Migrates s from the site's input into its weights: x' = x / s (folded into the op before), W' = W diag(s).
void fold(FLayer& L, Site site, const std::vector<float>& s, const ModelConfig& c) {
  for (FLinear* l : L.site(site))
    for (int64_t r = 0; r < l->out; ++r)
      for (int64_t j = 0; j < l->in; ++j) l->w[size_t(r * l->in + j)] *= s[size_t(j)];
  auto scale_rows = [](FLinear& l, int64_t row, float div) {
    for (int64_t j = 0; j < l.in; ++j) l.w[size_t(row * l.in + j)] /= div;
    if (!l.bias.empty()) l.bias[size_t(row)] /= div;
  };
  switch (site) {
    case Site::AttnIn:
      for (size_t j = 0; j < s.size(); ++j) L.attn_norm[j] /= s[j];
      L.norms_changed = true;
      break;
    case Site::MlpIn:
      for (size_t j = 0; j < s.size(); ++j) L.mlp_norm[j] /= s[j];
      L.norms_changed = true;
      break;
    case Site::MlpDown:  // down's input is silu(gate) * up: dividing up's row j divides input channel j
      for (int64_t j = 0; j < int64_t(s.size()); ++j) scale_rows(L.up, j, s[size_t(j)]);
      break;
    case Site::AttnOut: {  // o's input channel (head h, dim d) is a mix of v rows (kv head h/group, dim d)
      const int64_t hd = c.head_dim, group = c.heads / c.kv_heads;
      for (int64_t g = 0; g < c.kv_heads; ++g)
        for (int64_t d = 0; d < hd; ++d) scale_rows(L.v, g * hd + d, s[size_t(g * group * hd + d)]);
      break;
    }
  }
  L.smooth[int(site)] = s;
}

std::vector<float> weight_col_absmax(const std::vector<FLinear*>& ls) {
  std::vector<float> m(static_cast<size_t>(ls[0]->in), 0.f);
  for (const FLinear* l : ls)
    for (int64_t r = 0; r < l->out; ++r)
      for (int64_t j = 0; j < l->in; ++j) m[size_t(j)] = std::max(m[size_t(j)], std::fabs(l->w[size_t(r * l->in + j)]));
  return m;
}

std::vector<float> hessian_f32(const SiteStats& st, const std::vector<float>& s) {
  const int64_t n = st.dim;
  std::vector<float> h(static_cast<size_t>(n * n));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      h[size_t(i * n + j)] = float(st.hessian[size_t(i * n + j)] / (s.empty() ? 1.0 : double(s[size_t(i)]) * s[size_t(j)]));
  return h;
}

// AWQ: the exponent alpha of the mean activation magnitude whose scales minimize the site's output error
// after INT4 rounding. Returns the scales (all ones when alpha = 0 wins).
std::vector<float> awq_search(FLayer& L, Site site, const SiteStats& st, const ModelConfig& c, int64_t group,
                              bool symmetric) {
  std::vector<float> mean(static_cast<size_t>(st.dim));
  for (int64_t j = 0; j < st.dim; ++j) mean[size_t(j)] = float(st.abs_sum[size_t(j)] / double(std::max<int64_t>(1, st.tokens)));
  if (site == Site::AttnOut) mean = tie_gqa(mean, c, false);
  const std::vector<float> h = hessian_f32(st, {});
  std::vector<float> best(static_cast<size_t>(st.dim), 1.f);
  double best_err = INFINITY;
  for (int step = 0; step <= 20; ++step) {
    const float alpha = 0.05f * float(step);
    std::vector<float> s(static_cast<size_t>(st.dim));
    float smax = 0.f, smin = INFINITY;
    for (int64_t j = 0; j < st.dim; ++j) {
      s[size_t(j)] = std::pow(std::max(mean[size_t(j)], 1e-6f), alpha);
      smax = std::max(smax, s[size_t(j)]);
      smin = std::min(smin, s[size_t(j)]);
    }
    const float norm = std::sqrt(smax * smin);
    for (float& v : s) v /= norm;
    double err = 0;
    for (FLinear* l : L.site(site)) {
      FLinear scaled = *l;
      for (int64_t r = 0; r < l->out; ++r)
        for (int64_t j = 0; j < l->in; ++j) scaled.w[size_t(r * l->in + j)] *= s[size_t(j)];
      std::vector<float> wq = dequant(rtn_int4(scaled, group, symmetric));
      for (int64_t r = 0; r < l->out; ++r)
        for (int64_t j = 0; j < l->in; ++j) wq[size_t(r * l->in + j)] /= s[size_t(j)];
      err += output_error(*l, wq, h);
    }
    if (err < best_err) {
      best_err = err;
      best = s;
    }
  }
  return best;
}

// The output projection as INT8 rows (--lm-head int8), a block of rows at a time: its float copy would take
// vocab x hidden x 4 bytes (2.1 GB for Llama 3). The same rounding as w8a16's layers (emit_int8_channel).
void emit_lm_head_int8(const Linear& head, std::vector<TensorData>& out) {
  TensorData w{"lm_head.weight", DType::I8, {head.out, head.in}, {}}, sc{"lm_head.weight_scale", DType::F32, {head.out, 1}, {}};
  w.bytes.reserve(size_t(head.out * head.in));
  sc.bytes.reserve(size_t(head.out) * 4);
  constexpr int64_t kBlock = 2048;
  for (int64_t r0 = 0; r0 < head.out; r0 += kBlock) {
    std::vector<TensorData> part;
    emit_int8_channel(to_float(head, "lm_head", r0, std::min(head.out, r0 + kBlock)), part);
    w.bytes.insert(w.bytes.end(), part[0].bytes.begin(), part[0].bytes.end());
    sc.bytes.insert(sc.bytes.end(), part[1].bytes.begin(), part[1].bytes.end());
  }
  out.push_back(std::move(w));
  out.push_back(std::move(sc));
}

void check_group(int64_t group, const ModelConfig& c) {
  if (group <= 0 || group % 2) throw Error("--group-size must be a positive even number");
  const std::pair<const char*, int64_t> inputs[] = {
      {"hidden_size (q/k/v/gate/up input)", c.hidden}, {"heads*head_dim (o_proj input)", c.heads * c.head_dim},
      {"intermediate_size (down_proj input)", c.intermediate}};
  for (auto& [what, n] : inputs)
    if (n % group)
      throw Error("--group-size " + std::to_string(group) + " does not divide " + what + " = " + std::to_string(n) +
                  "; choose a divisor (for example 32, 64 or 128)");
}

void copy_file(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::copy_file(from, to, fs::copy_options::overwrite_existing, ec);
  if (ec) throw Error(to + ": cannot write: " + ec.message());
}

}  // namespace

QuantizeReport quantize_model(const std::string& in_dir, const std::string& out_dir, const QuantizeOptions& opt,
                              const std::function<void(const std::string&)>& log) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string& m = opt.method;
  if (std::find(kMethods.begin(), kMethods.end(), m) == kMethods.end())
    throw Error("unknown method '" + m + "' (fp8, int8-sq, w8a16, w4a16-rtn, w4a16-awq, w4a16-gptq)");
  if (fs::exists(out_dir)) throw Error(out_dir + ": already exists; choose a new output directory or remove it");
  Model model(in_dir);  // sequential methods install their quantized layers into it as they go
  if (!model.quant().method.empty())
    throw Error(in_dir + ": the model is already quantized (" + model.quant().method + "); quantize the original checkpoint");
  const ModelConfig& c = model.config();
  const bool int4 = m.rfind("w4a16", 0) == 0;
  if (int4) check_group(opt.group_size, c);
  if (!(opt.sq_alpha >= 0.f && opt.sq_alpha <= 1.f)) throw Error("--sq-alpha must be in [0, 1]");
  if (!(opt.fp8_headroom >= 1.f && opt.fp8_headroom <= 256.f)) throw Error("--fp8-headroom must be in [1, 256]");
  if (opt.lm_head != WeightFormat::Dense && opt.lm_head != WeightFormat::Int8Channel)
    throw Error("--lm-head must be none or int8");

  QuantizeReport rep;
  rep.method = m;
  rep.bytes_in = model.weight_bytes();
  const bool need_calib = m == "fp8" || m == "int8-sq" || m == "w4a16-awq" || m == "w4a16-gptq" || opt.kv != KvFormat::None;
  const bool need_hessian = m == "w4a16-awq" || m == "w4a16-gptq";
  const bool sequential = need_hessian;  // GPTQ and AWQ calibrate each layer on the quantized layers before it
  CalibStats st;
  std::unique_ptr<SequentialCalibrator> seq;
  if (need_calib) {
    if (opt.calib.empty())
      throw Error("method " + m + (opt.kv != KvFormat::None ? " with --kv-cache" : "") +
                  " needs calibration data: pass --calib FILE (plain text or JSONL with a \"text\" field)");
    Tokenizer tok = Tokenizer::load(in_dir);
    int64_t found = 0;
    auto samples = load_calibration(opt.calib, tok, opt.calib_samples, opt.calib_seq_len, &found);
    rep.calib_samples = int64_t(samples.size());
    if (int64_t(samples.size()) < opt.calib_samples)
      rep.notes.push_back("calibration text has " + std::to_string(found) + " tokens: " + std::to_string(samples.size()) +
                          " samples of " + std::to_string(opt.calib_seq_len) + " instead of " +
                          std::to_string(opt.calib_samples) + " (" + std::to_string(opt.calib_samples * opt.calib_seq_len) +
                          " tokens needed)");
    log("calibrating on " + std::to_string(samples.size()) + " x " + std::to_string(opt.calib_seq_len) + " tokens of " +
        opt.calib + (sequential ? " (layer by layer, with Hessians)" : ""));
    const auto tc = std::chrono::steady_clock::now();
    if (sequential) {
      st = make_stats(model);
      seq = std::make_unique<SequentialCalibrator>(model, samples);
      rep.calib_tokens = int64_t(samples.size()) * opt.calib_seq_len;
    } else {
      st = calibrate(model, samples, false, [&](int64_t done, int64_t total) {
        if (done == total || done % 16 == 0) log("  calibration " + std::to_string(done) + "/" + std::to_string(total));
      });
      rep.calib_tokens = st.tokens;
    }
    rep.calib_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
  }

  QuantConfig qc;
  qc.method = m;
  qc.kv = opt.kv;
  qc.group_size = int4 ? opt.group_size : 0;
  qc.symmetric = opt.symmetric;
  qc.lm_head = opt.lm_head;
  qc.weights = m == "fp8" ? WeightFormat::Fp8Channel : (m == "int8-sq" || m == "w8a16") ? WeightFormat::Int8Channel
                                                                                          : WeightFormat::Int4Group;
  qc.acts = m == "fp8" ? ActQuant::Fp8Tensor : m == "int8-sq" ? (opt.act_static ? ActQuant::Int8Tensor : ActQuant::Int8Token)
                                                               : ActQuant::None;

  // The checkpoint is written into a temporary directory beside the target (OutputDir), tensor by tensor as each
  // layer is done (memory holds one layer's outputs, not the model's), and renamed into place at the end.
  std::vector<std::string> names = {"model.safetensors.tmp", "model.safetensors", "config.json"};
  names.insert(names.end(), kCopiedFiles.begin(), kCopiedFiles.end());
  OutputDir dir(out_dir, names);
  const std::string& tmp = dir.tmp();
  // Header space: ~130 bytes a tensor, up to ~30 tensors a layer; a larger header still works (copied once).
  SafetensorsWriter writer(tmp + "/model.safetensors", 4096 + uint64_t(c.layers) * 4096);
  std::vector<TensorData> out;  // the current layer's tensors, until flush() hands them to the writer
  auto flush = [&] {
    for (const TensorData& t : out) writer.add(t);
    out.clear();
  };
  auto copy_tensor = [&](const TensorView& t) {
    out.push_back({t.name, t.dtype, t.shape,
                   std::vector<uint8_t>(static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.nbytes())});
  };
  copy_tensor(model.embed());
  copy_tensor(model.checkpoint().get("model.norm.weight"));
  if (opt.lm_head == WeightFormat::Int8Channel) {
    log("  lm_head as INT8 rows");
    emit_lm_head_int8(model.lm_head(), out);  // (tied embeddings too: the quantized copy is stored on its own)
  } else if (!c.tie_embeddings) {
    copy_tensor(*model.lm_head().w);
  }
  flush();

  uint64_t q_bytes = 0, q_params = 0;
  double max_damp = opt.damp;
  for (int64_t li = 0; li < c.layers; ++li) {
    if (seq) {
      const auto tc = std::chrono::steady_clock::now();
      seq->observe(li, true, st);
      rep.calib_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
    }
    const LayerWeights& LW = model.layers()[size_t(li)];
    const std::string p = "model.layers." + std::to_string(li) + ".";
    FLayer L{to_float(LW.q, p + "self_attn.q_proj"), to_float(LW.k, p + "self_attn.k_proj"),
             to_float(LW.v, p + "self_attn.v_proj"),  to_float(LW.o, p + "self_attn.o_proj"),
             to_float(LW.gate, p + "mlp.gate_proj"),  to_float(LW.up, p + "mlp.up_proj"),
             to_float(LW.down, p + "mlp.down_proj"),  LW.attn_norm, LW.mlp_norm, false, {}};
    const std::array<SiteStats, kNumSites> no_stats{};
    const auto& S = need_calib ? st.sites[size_t(li)] : no_stats;
    const Site sites[] = {Site::AttnIn, Site::AttnOut, Site::MlpIn, Site::MlpDown};
    std::vector<float> input_absmax[kNumSites];  // per site, after smoothing: for static activation scales

    if (m == "int8-sq" && opt.sq_alpha > 0.f) {
      for (Site s : sites) {
        const SiteStats& ss = S[int(s)];
        std::vector<float> act = ss.absmax, wmax = weight_col_absmax(L.site(s));
        if (s == Site::AttnOut) {
          act = tie_gqa(act, c, true);
          wmax = tie_gqa(wmax, c, true);
        }
        std::vector<float> sm(act.size());
        for (size_t j = 0; j < sm.size(); ++j)
          sm[j] = std::clamp(std::pow(std::max(act[j], 1e-5f), opt.sq_alpha) / std::pow(std::max(wmax[j], 1e-5f), 1.0f - opt.sq_alpha),
                             1e-4f, 1e4f);
        fold(L, s, sm, c);
      }
    }
    if (m == "w4a16-awq")
      for (Site s : sites) fold(L, s, awq_search(L, s, S[int(s)], c, opt.group_size, opt.symmetric), c);
    if (need_calib)
      for (Site s : sites) {
        input_absmax[int(s)] = S[int(s)].absmax;
        if (!L.smooth[int(s)].empty())
          for (size_t j = 0; j < input_absmax[int(s)].size(); ++j) input_absmax[int(s)][j] /= L.smooth[int(s)][j];
      }

    // Norms (F32 when smoothing changed them, else as stored).
    if (L.norms_changed) {
      emit_f32(p + "input_layernorm.weight", L.attn_norm, {c.hidden}, out);
      emit_f32(p + "post_attention_layernorm.weight", L.mlp_norm, {c.hidden}, out);
    } else {
      copy_tensor(model.checkpoint().get(p + "input_layernorm.weight"));
      copy_tensor(model.checkpoint().get(p + "post_attention_layernorm.weight"));
    }
    std::vector<std::pair<Linear*, std::vector<float>>> installed;  // sequential: the layer as quantized
    LayerWeights& MW = model.mutable_layers()[size_t(li)];
    Linear* model_linears[kNumSites][3] = {{&MW.q, &MW.k, &MW.v}, {&MW.o}, {&MW.gate, &MW.up}, {&MW.down}};
    for (Site s : sites) {
      int idx = 0;
      for (FLinear* l : L.site(s)) {
        const size_t before = out.size();
        if (m == "fp8") emit_fp8_channel(*l, out);
        else if (m == "int8-sq" || m == "w8a16") emit_int8_channel(*l, out);
        else if (m == "w4a16-rtn") emit_int4(l->name, rtn_int4(*l, opt.group_size, opt.symmetric), out);
        else if (m == "w4a16-awq") {
          Int4Weights q = rtn_int4(*l, opt.group_size, opt.symmetric,
                                   awq_clip_search(*l, opt.group_size, opt.symmetric, hessian_f32(S[int(s)], L.smooth[int(s)])));
          model_linears[int(s)][idx]->bias = l->bias;  // smoothing may have rescaled it
          installed.push_back({model_linears[int(s)][idx], dequant(q)});
          emit_int4(l->name, q, out);
        } else {  // w4a16-gptq
          GptqResult g = gptq(*l, S[int(s)].hessian, opt.group_size, opt.symmetric, opt.act_order, 128, opt.damp);
          if (g.fell_back_to_rtn) {
            rep.notes.push_back(l->name + ": Cholesky failed even with dampening 10x the mean diagonal; quantized with RTN");
          }
          max_damp = std::max(max_damp, g.damp_used);
          model_linears[int(s)][idx]->bias = l->bias;
          installed.push_back({model_linears[int(s)][idx], dequant(g.q)});
          emit_int4(l->name, g.q, out);
        }
        ++idx;
        for (size_t i = before; i < out.size(); ++i) q_bytes += out[i].bytes.size();
        q_params += uint64_t(l->out * l->in);
        const float amax = input_absmax[int(s)].empty() ? 0.f : *std::max_element(input_absmax[int(s)].begin(), input_absmax[int(s)].end());
        if (qc.acts == ActQuant::Fp8Tensor || qc.acts == ActQuant::Int8Tensor) {
          const float scale = amax <= 0 ? 1.0f
                              : qc.acts == ActQuant::Fp8Tensor ? opt.fp8_headroom * amax / 448.0f : amax / 127.0f;
          emit_f32(l->name + ".input_scale", {scale}, {1}, out);
        }
        if (!L.smooth[int(s)].empty()) emit_f32(l->name + ".smooth_scale", L.smooth[int(s)], {l->in}, out);
        emit_bias(*l, out);
      }
    }
    if (opt.kv != KvFormat::None) {
      const int64_t hd = c.head_dim, group = c.heads / c.kv_heads;
      const float qmax = opt.kv == KvFormat::Fp8 ? 448.0f / opt.fp8_headroom : 127.0f;
      std::vector<float> ks(static_cast<size_t>(c.kv_heads)), vs(static_cast<size_t>(c.kv_heads));
      for (int64_t g = 0; g < c.kv_heads; ++g) {
        float ka = 0.f, va = 0.f;
        for (int64_t d = 0; d < hd; ++d) {
          ka = std::max(ka, st.k_absmax[size_t(li)][size_t(g * hd + d)]);
          const float div = L.smooth[int(Site::AttnOut)].empty() ? 1.f : L.smooth[int(Site::AttnOut)][size_t(g * group * hd + d)];
          va = std::max(va, st.v_absmax[size_t(li)][size_t(g * hd + d)] / div);
        }
        ks[size_t(g)] = ka > 0 ? ka / qmax : 1.f;
        vs[size_t(g)] = va > 0 ? va / qmax : 1.f;
      }
      emit_f32(p + "self_attn.k_scale", ks, {c.kv_heads}, out);
      emit_f32(p + "self_attn.v_scale", vs, {c.kv_heads}, out);
    }
    if (seq) {
      model.set_layer_dense(li, installed, L.attn_norm, L.mlp_norm);
      const auto tc = std::chrono::steady_clock::now();
      seq->advance(li);
      rep.calib_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - tc).count();
      st.sites[size_t(li)] = {};  // free this layer's Hessians
    }
    flush();
    log("  layer " + std::to_string(li + 1) + "/" + std::to_string(c.layers) + " quantized");
  }
  if (max_damp > opt.damp) rep.notes.push_back("GPTQ raised the dampening to " + std::to_string(max_damp) + " for some layers");
  rep.bits_per_weight = q_params ? double(q_bytes) * 8.0 / double(q_params) : 0;
  rep.bytes_out = writer.data_bytes();

  writer.finish({{"format", "pt"}});
  json cfg = json::parse(read_text_file(in_dir + "/config.json"));
  json qj = json::parse(quant_config_json(qc));
  if (need_calib)
    qj["calibration"] = {{"file", fs::path(opt.calib).filename().string()}, {"samples", rep.calib_samples},
                         {"seq_len", opt.calib_seq_len}, {"tokens", rep.calib_tokens}};
  if (m == "int8-sq") qj["sq_alpha"] = opt.sq_alpha;
  if (m == "fp8" || opt.kv == KvFormat::Fp8) qj["fp8_headroom"] = opt.fp8_headroom;
  if (m == "w4a16-gptq") qj["act_order"] = opt.act_order;
  cfg["quantization_config"] = qj;
  write_text_file(tmp + "/config.json", cfg.dump(2) + "\n");
  for (const char* name : kCopiedFiles)
    if (file_exists(in_dir + "/" + name)) copy_file(in_dir + "/" + name, tmp + "/" + name);
  dir.commit();
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

}  // namespace llmq::quant
