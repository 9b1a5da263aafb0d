#include "model/llama.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.hpp"
#include "quant/formats/formats.hpp"

namespace llmq {

KVCache::KVCache(const ModelConfig& c, int64_t n_seq_, int64_t capacity_)
    : n_seq(n_seq_), capacity(capacity_), layers(c.layers), kv_dim(c.kv_heads * c.head_dim) {
  const size_t n = size_t(layers * n_seq * capacity * kv_dim);
  k.assign(n, 0.f);
  v.assign(n, 0.f);
}

namespace {

std::vector<float> to_f32(const TensorView& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  for (size_t i = 0; i < out.size(); ++i) out[i] = load_as_f32(t.data, t.dtype, i);
  return out;
}

void rmsnorm(const float* x, const float* w, int64_t n, float eps, float* y) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

}  // namespace

const char* site_name(Site s) {
  switch (s) {
    case Site::AttnIn: return "attn_in";
    case Site::AttnOut: return "attn_out";
    case Site::MlpIn: return "mlp_in";
    case Site::MlpDown: return "mlp_down";
  }
  return "?";
}

std::vector<std::string> site_linear_names(Site s) {
  switch (s) {
    case Site::AttnIn: return {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"};
    case Site::AttnOut: return {"self_attn.o_proj"};
    case Site::MlpIn: return {"mlp.gate_proj", "mlp.up_proj"};
    case Site::MlpDown: return {"mlp.down_proj"};
  }
  return {};
}

std::vector<const Linear*> Model::site_linears(int64_t l, Site site) const {
  const LayerWeights& L = layers_[size_t(l)];
  switch (site) {
    case Site::AttnIn: return {&L.q, &L.k, &L.v};
    case Site::AttnOut: return {&L.o};
    case Site::MlpIn: return {&L.gate, &L.up};
    case Site::MlpDown: return {&L.down};
  }
  return {};
}

Model::Model(const std::string& dir) : dir_(dir), cfg_(load_config(dir)) {
  if (!cfg_.quantization.empty()) quant_ = parse_quant_config(cfg_.quantization, dir + "/config.json");
  ckpt_ = std::make_unique<Checkpoint>(dir);
  const ModelConfig& c = cfg_;
  auto expect = [&](const std::string& name, std::vector<int64_t> shape) -> const TensorView& {
    const TensorView& t = ckpt_->get(name);
    if (t.shape != shape) {
      TensorView want;
      want.shape = shape;
      throw Error(t.file + ": tensor '" + name + "' has shape " + t.shape_str() + " but config.json implies " +
                  want.shape_str());
    }
    return t;
  };
  auto dense_dtype = [&](const TensorView& t) {
    if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16)
      throw Error(t.file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.dtype) + ", expected F32, F16 or BF16");
    return &t;
  };
  auto want_dtype = [&](const TensorView& t, DType d) {
    if (t.dtype != d)
      throw Error(t.file + ": tensor '" + t.name + "' has dtype " + dtype_name(t.dtype) + ", expected " + dtype_name(d));
    return &t;
  };
  // A linear in weight format `fmt` with activations `act` (the checkpoint's for the decoder layers).
  auto linear = [&](const std::string& name, int64_t out, int64_t in, bool bias, WeightFormat fmt, ActQuant act) {
    Linear l;
    l.in = in;
    l.out = out;
    if (bias) l.bias = to_f32(expect(name + ".bias", {out}));
    if (fmt == WeightFormat::Dense) {
      l.w = dense_dtype(expect(name + ".weight", {out, in}));
      return l;
    }
    l.fmt = fmt;
    l.act = act;
    if (l.fmt == WeightFormat::Int4Group) {
      const int64_t g = quant_.group_size;
      if (in % g || g % 2)
        throw Error(dir_ + ": group size " + std::to_string(g) + " does not divide the input size " + std::to_string(in) +
                    " of '" + name + "'");
      l.group = g;
      l.w = want_dtype(expect(name + ".weight_packed", {out, in / 2}), DType::U8);
      l.w_scale = to_f32(expect(name + ".weight_scale", {out, in / g}));
      if (quant_.symmetric) {
        l.w_zero.assign(size_t(out * (in / g)), 8);
      } else {
        const TensorView& z = *want_dtype(expect(name + ".weight_zero_point", {out, in / g}), DType::U8);
        l.w_zero.assign(static_cast<const uint8_t*>(z.data), static_cast<const uint8_t*>(z.data) + z.nbytes());
        for (uint8_t v : l.w_zero)
          if (v > 15) throw Error(z.file + ": tensor '" + z.name + "' has a zero point above 15");
      }
    } else {
      l.w = want_dtype(expect(name + ".weight", {out, in}), l.fmt == WeightFormat::Int8Channel ? DType::I8 : DType::F8E4M3);
      l.w_scale = to_f32(expect(name + ".weight_scale", {out, 1}));
    }
    for (float v : l.w_scale)
      if (!(v > 0.f) || !std::isfinite(v)) throw Error(dir_ + ": '" + name + ".weight_scale' has a non-positive or non-finite scale");
    if (l.act == ActQuant::Int8Tensor || l.act == ActQuant::Fp8Tensor) {
      l.act_scale = to_f32(expect(name + ".input_scale", {1}))[0];
      if (!(l.act_scale > 0.f) || !std::isfinite(l.act_scale)) throw Error(dir_ + ": '" + name + ".input_scale' is not positive");
    }
    if (ckpt_->find(name + ".smooth_scale")) l.smooth = to_f32(expect(name + ".smooth_scale", {in}));
    return l;
  };
  const int64_t H = c.hidden, qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  embed_ = dense_dtype(expect("model.embed_tokens.weight", {c.vocab, H}));
  final_norm_ = to_f32(expect("model.norm.weight", {H}));
  if (c.tie_embeddings && quant_.lm_head == WeightFormat::Dense) {
    lm_head_.w = embed_;
    lm_head_.in = H;
    lm_head_.out = c.vocab;
  } else {  // (a quantized lm_head is stored on its own, tied embeddings or not)
    lm_head_ = linear("lm_head", c.vocab, H, false, quant_.lm_head, ActQuant::None);
  }
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    LayerWeights L;
    L.attn_norm = to_f32(expect(p + "input_layernorm.weight", {H}));
    L.mlp_norm = to_f32(expect(p + "post_attention_layernorm.weight", {H}));
    const WeightFormat wf = quant_.weights;
    const ActQuant af = quant_.acts;
    L.q = linear(p + "self_attn.q_proj", qd, H, c.qkv_bias, wf, af);
    L.k = linear(p + "self_attn.k_proj", kvd, H, c.qkv_bias, wf, af);
    L.v = linear(p + "self_attn.v_proj", kvd, H, c.qkv_bias, wf, af);
    L.o = linear(p + "self_attn.o_proj", H, qd, c.o_bias, wf, af);
    L.gate = linear(p + "mlp.gate_proj", c.intermediate, H, c.mlp_bias, wf, af);
    L.up = linear(p + "mlp.up_proj", c.intermediate, H, c.mlp_bias, wf, af);
    L.down = linear(p + "mlp.down_proj", H, c.intermediate, c.mlp_bias, wf, af);
    if (quant_.kv != KvFormat::None) {
      L.k_scale = to_f32(expect(p + "self_attn.k_scale", {c.kv_heads}));
      L.v_scale = to_f32(expect(p + "self_attn.v_scale", {c.kv_heads}));
    }
    layers_.push_back(std::move(L));
  }
  // Parameters of the architecture (a quantized checkpoint counts its weights unpacked, not its scales).
  params_ = c.vocab * H * (c.tie_embeddings ? 1 : 2) + H;
  for (const LayerWeights& L : layers_) {
    params_ += 2 * H;
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) params_ += l->in * l->out + int64_t(l->bias.size());
  }
  for (auto& [name, t] : ckpt_->all())
    if (name.find("rotary_emb") == std::string::npos) weight_bytes_ += t->nbytes();

  // RoPE inverse frequencies, computed in float32 the way transformers does (so angles round identically).
  const int64_t half = c.head_dim / 2;
  inv_freq_.resize(size_t(half));
  for (int64_t i = 0; i < half; ++i) {
    float e = float(2 * i) / float(c.head_dim);
    inv_freq_[size_t(i)] = 1.0f / std::pow(float(c.rope_theta), e);
  }
  if (c.rope_type == RopeType::Linear) {
    for (auto& f : inv_freq_) f = f / float(c.rope_factor);
  } else if (c.rope_type == RopeType::Llama3) {
    const float factor = float(c.rope_factor), lo = float(c.rope_low_freq_factor), hi = float(c.rope_high_freq_factor);
    const float old_ctx = float(c.rope_original_max_positions);
    const float lo_wavelen = old_ctx / lo, hi_wavelen = old_ctx / hi;
    for (auto& f : inv_freq_) {
      const float wavelen = 2.0f * float(M_PI) / f;
      float scaled = wavelen > lo_wavelen ? f / factor : f;
      if (!(wavelen < hi_wavelen) && !(wavelen > lo_wavelen)) {
        const float smooth = (old_ctx / wavelen - lo) / (hi - lo);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
}

uint64_t Model::bytes_per_token() const {
  uint64_t n = uint64_t(cfg_.hidden) * dtype_size(embed_->dtype) + lm_head_.weight_bytes();
  for (auto& L : layers_)
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) n += l->weight_bytes();
  return n;
}

double Model::flops_per_token() const {
  double n = double(lm_head_.in) * double(lm_head_.out);
  for (auto& L : layers_)
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) n += double(l->in) * double(l->out);
  return 2 * n;
}

void Model::rope_table(int64_t n_pos) const {
  const int64_t half = cfg_.head_dim / 2;
  const int64_t have = int64_t(cos_.size()) / half;
  if (have >= n_pos) return;
  cos_.resize(size_t(n_pos * half));
  sin_.resize(size_t(n_pos * half));
  for (int64_t p = have; p < n_pos; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * inv_freq_[size_t(i)];  // float32 product, as transformers computes it
      cos_[size_t(p * half + i)] = float(std::cos(double(angle)));
      sin_[size_t(p * half + i)] = float(std::sin(double(angle)));
    }
  }
}

void Model::rope_tables(int64_t n_pos, std::vector<float>& cos, std::vector<float>& sin) const {
  rope_table(n_pos);
  const size_t n = size_t(n_pos * (cfg_.head_dim / 2));
  cos.assign(cos_.begin(), cos_.begin() + int64_t(n));
  sin.assign(sin_.begin(), sin_.begin() + int64_t(n));
}

int64_t Model::validate_batch(const std::vector<BatchToken>& batch, int64_t n_seq, int64_t capacity) const {
  const ModelConfig& c = cfg_;
  int64_t max_pos = 0;
  for (auto& b : batch) {
    if (b.token < 0 || b.token >= c.vocab)
      throw Error("token id " + std::to_string(b.token) + " is outside the vocabulary (" + std::to_string(c.vocab) + ")");
    if (b.seq < 0 || b.seq >= n_seq) throw Error("sequence " + std::to_string(b.seq) + " is outside the cache");
    if (b.pos < 0 || b.pos >= capacity)
      throw Error("position " + std::to_string(b.pos) + " is beyond the context of " + std::to_string(capacity) + " tokens");
    max_pos = std::max<int64_t>(max_pos, b.pos);
  }
  return max_pos;
}

int64_t Model::check_batch(const std::vector<BatchToken>& batch, const KVCache& cache) const {
  const int64_t max_pos = validate_batch(batch, cache.n_seq, cache.capacity);
  rope_table(max_pos + 1);
  return max_pos;
}

void Model::embed_tokens(const std::vector<BatchToken>& batch, std::vector<float>& x) const {
  const int64_t H = cfg_.hidden, T = int64_t(batch.size());
  x.resize(size_t(T * H));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i)
      x[size_t(t * H + i)] = load_as_f32(embed_->data, embed_->dtype, size_t(batch[size_t(t)].token) * size_t(H) + size_t(i));
}

void Model::forward(const std::vector<BatchToken>& batch, KVCache& cache, float* logits_out, ForwardHooks* hooks) const {
  if (batch.empty()) return;
  check_batch(batch, cache);
  std::vector<float> x;
  embed_tokens(batch, x);
  for (int64_t l = 0; l < cfg_.layers; ++l) forward_layer(l, batch, cache, x, hooks, false);
  head(batch, x, logits_out, hooks);
}

void Model::forward_layer(int64_t l, const std::vector<BatchToken>& batch, KVCache& cache, std::vector<float>& x,
                          ForwardHooks* hooks, bool check) const {
  const ModelConfig& c = cfg_;
  const int64_t T = int64_t(batch.size());
  if (T == 0) return;
  const int64_t max_pos = check ? check_batch(batch, cache) : [&] {
    int64_t m = 0;
    for (auto& b : batch) m = std::max<int64_t>(m, b.pos);
    return m;
  }();
  const int64_t H = c.hidden, hd = c.head_dim, nh = c.heads, nkv = c.kv_heads, half = hd / 2;
  const int64_t qd = nh * hd, kvd = nkv * hd, I = c.intermediate;
  const LayerWeights& L = layers_[size_t(l)];
  // Activations, one row per batch token (x: [T, H] residual stream, updated in place).
  std::vector<float> h(static_cast<size_t>(T * H));             // [T, H] normed
  std::vector<float> q(static_cast<size_t>(T * qd));            // [T, heads*hd]
  std::vector<float> k(static_cast<size_t>(T * kvd)), v(static_cast<size_t>(T * kvd));  // [T, kv_heads*hd]
  std::vector<float> att(static_cast<size_t>(T * qd));          // [T, heads*hd]
  std::vector<float> g(static_cast<size_t>(T * I)), u(static_cast<size_t>(T * I));      // [T, I]
  std::vector<float> o(static_cast<size_t>(T * H));             // [T, H]
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t group = nh / nkv;
  // KV cache quantization (--kv-cache fp8|int8): K and V are stored quantize-dequantized with per-head scales.
  auto kv_fake_quant = [&](float* kr, float* vr) {
    for (int64_t kh = 0; kh < nkv; ++kh) {
      for (int pass = 0; pass < 2; ++pass) {
        float* p = (pass ? vr : kr) + kh * hd;
        const float s = (pass ? L.v_scale : L.k_scale)[size_t(kh)];
        if (quant_.kv == KvFormat::Fp8) {
          fake_quant_fp8(p, hd, s, p);
        } else {
          const float inv = 1.0f / s;
          for (int64_t i = 0; i < hd; ++i) p[i] = float(quant::quant_int8(p[i], inv)) * s;
        }
      }
    }
  };
  auto rope = [&](float* vec, int64_t pos) {  // rotate_half convention: pairs (i, i + hd/2)
    const float* cs = &cos_[size_t(pos * half)];
    const float* sn = &sin_[size_t(pos * half)];
    for (int64_t i = 0; i < half; ++i) {
      const float a = vec[i], b = vec[i + half];
      vec[i] = a * cs[i] - b * sn[i];
      vec[i + half] = b * cs[i] + a * sn[i];
    }
  };

#pragma omp parallel for schedule(static) if (T > 1)
  for (int64_t t = 0; t < T; ++t) rmsnorm(&x[size_t(t * H)], L.attn_norm.data(), H, c.rms_eps, &h[size_t(t * H)]);
  if (hooks) hooks->linear_input(l, Site::AttnIn, h.data(), T, H);
  Linear::forward_many(h.data(), T, {{&L.q, q.data()}, {&L.k, k.data()}, {&L.v, v.data()}});
#pragma omp parallel for schedule(static) if (T > 1)
  for (int64_t t = 0; t < T; ++t) {
    const BatchToken& b = batch[size_t(t)];
    for (int64_t hh = 0; hh < nh; ++hh) rope(&q[size_t(t * qd + hh * hd)], b.pos);
    for (int64_t hh = 0; hh < nkv; ++hh) rope(&k[size_t(t * kvd + hh * hd)], b.pos);
    if (!L.k_scale.empty()) kv_fake_quant(&k[size_t(t * kvd)], &v[size_t(t * kvd)]);
    std::copy_n(&k[size_t(t * kvd)], kvd, cache.k_at(l, b.seq, b.pos));
    std::copy_n(&v[size_t(t * kvd)], kvd, cache.v_at(l, b.seq, b.pos));
  }
  if (hooks) hooks->kv(l, k.data(), v.data(), T);
  // Attention: each (token, kv head) pair handles the `group` query heads that share that kv head, so each
  // cached K/V row is read once per group. Scores for all positions come from the matmul kernel (q rows
  // against K rows at the cache's stride); the weighted sum of V rows comes from cpu::wsum.
#pragma omp parallel
  {
    std::vector<float> sc(static_cast<size_t>(group * (max_pos + 1)));  // [group][positions]
#pragma omp for schedule(dynamic, 1)
    for (int64_t tg = 0; tg < T * nkv; ++tg) {
      const int64_t t = tg / nkv, g_kv = tg % nkv;
      const BatchToken& b = batch[size_t(t)];
      const int64_t lo = c.sliding_window > 0 ? std::max<int64_t>(0, b.pos - c.sliding_window + 1) : 0;
      const int64_t n = b.pos + 1 - lo;  // attended positions
      const float* qg = &q[size_t(t * qd + g_kv * group * hd)];  // [group, hd]
      cpu::gemm_single(qg, hd, group, hd, cache.k_at(l, b.seq, lo) + g_kv * hd, DType::F32, kvd, n, sc.data(), n);
      for (int64_t hh = 0; hh < group; ++hh) {
        float* s_h = &sc[size_t(hh * n)];
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s_h[j] *= scale);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (s_h[j] = std::exp(s_h[j] - mx));
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < n; ++j) s_h[j] *= inv;
      }
      float* out = &att[size_t(t * qd + g_kv * group * hd)];  // [group, hd]
      cpu::wsum(sc.data(), n, group, n, cache.v_at(l, b.seq, lo) + g_kv * hd, kvd, hd, out, hd);
    }
  }
  if (hooks) hooks->linear_input(l, Site::AttnOut, att.data(), T, qd);
  L.o.forward(att.data(), T, o.data());
  for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];

#pragma omp parallel for schedule(static) if (T > 1)
  for (int64_t t = 0; t < T; ++t) rmsnorm(&x[size_t(t * H)], L.mlp_norm.data(), H, c.rms_eps, &h[size_t(t * H)]);
  if (hooks) hooks->linear_input(l, Site::MlpIn, h.data(), T, H);
  Linear::forward_many(h.data(), T, {{&L.gate, g.data()}, {&L.up, u.data()}});
#pragma omp parallel for schedule(static) if (T * I > 65536)
  for (int64_t i = 0; i < T * I; ++i) {
    const float gv = g[size_t(i)];
    g[size_t(i)] = gv / (1.0f + std::exp(-gv)) * u[size_t(i)];
  }
  if (hooks) hooks->linear_input(l, Site::MlpDown, g.data(), T, I);
  L.down.forward(g.data(), T, o.data());
  for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
}

void Model::head(const std::vector<BatchToken>& batch, const std::vector<float>& x, float* logits_out,
                 ForwardHooks* hooks) const {
  const ModelConfig& c = cfg_;
  const int64_t T = int64_t(batch.size()), H = c.hidden;
  // Final norm and lm_head on the rows whose logits are wanted.
  std::vector<float> sel;
  int64_t n_out = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (!batch[size_t(t)].logits) continue;
    sel.resize(size_t((n_out + 1) * H));
    rmsnorm(&x[size_t(t * H)], final_norm_.data(), H, c.rms_eps, &sel[size_t(n_out * H)]);
    ++n_out;
  }
  if (n_out && hooks) hooks->head_input(sel.data(), n_out, H);
  if (n_out) lm_head_.forward(sel.data(), n_out, logits_out);
}

}  // namespace llmq

namespace llmq {

void Model::set_layer_dense(int64_t l, const std::vector<std::pair<Linear*, std::vector<float>>>& weights,
                            const std::vector<float>& attn_norm, const std::vector<float>& mlp_norm) {
  LayerWeights& L = layers_[size_t(l)];
  for (auto& [lin, w] : weights) {
    if (int64_t(w.size()) != lin->out * lin->in) throw Error("set_layer_dense: weight size mismatch");
    auto owned = std::make_unique<std::pair<TensorView, std::vector<float>>>();
    owned->second = w;
    owned->first.name = lin->w ? lin->w->name : "dense";
    owned->first.file = "(in memory)";
    owned->first.dtype = DType::F32;
    owned->first.shape = {lin->out, lin->in};
    owned->first.data = owned->second.data();
    Linear dense;
    dense.w = &owned->first;
    dense.in = lin->in;
    dense.out = lin->out;
    dense.bias = lin->bias;
    *lin = std::move(dense);
    owned_.push_back(std::move(owned));
  }
  L.attn_norm = attn_norm;
  L.mlp_norm = mlp_norm;
}

}  // namespace llmq
