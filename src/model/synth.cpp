#include "model/synth.hpp"

#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "common.hpp"
#include "io/output_dir.hpp"
#include "io/safetensors.hpp"

namespace fs = std::filesystem;

namespace llmq {

const std::vector<SynthShape>& synth_shapes() {
  // Published configs (config.json of each model's Hugging Face repository).
  static const std::vector<SynthShape> shapes = {
      {"llama-2-7b", "LlamaForCausalLM", "llama", 4096, 11008, 32, 32, 32, 32000, 4096, 10000.0, 1e-5, false, 0},
      {"llama-3-8b", "LlamaForCausalLM", "llama", 4096, 14336, 32, 32, 8, 128256, 8192, 500000.0, 1e-5, false, 0},
      {"mistral-7b", "MistralForCausalLM", "mistral", 4096, 14336, 32, 32, 8, 32000, 32768, 10000.0, 1e-5, false, 4096},
      {"qwen2-7b", "Qwen2ForCausalLM", "qwen2", 3584, 18944, 28, 28, 4, 152064, 32768, 1000000.0, 1e-6, true, 0},
      {"tiny", "LlamaForCausalLM", "llama", 128, 384, 2, 4, 2, 8192, 512, 10000.0, 1e-5, false, 0},
  };
  return shapes;
}

namespace {

uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// N(0, std^2) approximated by the sum of four uniforms (Irwin-Hall), or a constant when std is 0.
TensorData make_tensor(const std::string& name, std::vector<int64_t> shape, float std_dev, float constant, uint64_t seed) {
  TensorData t;
  t.name = name;
  t.dtype = DType::BF16;
  t.shape = shape;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  t.bytes.resize(size_t(n) * 2);
  uint16_t* out = reinterpret_cast<uint16_t*>(t.bytes.data());
  const uint64_t base = splitmix64(seed ^ name_hash(name));
  const float k = std_dev * 1.7320508f / 65536.0f;  // sqrt(3): the sum of 4 U(0,1) has variance 1/3
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (std_dev == 0.f) {
      out[i] = f32_to_bf16(constant);
      continue;
    }
    const uint64_t h = splitmix64(base + uint64_t(i));
    const float s = float(h & 0xFFFF) + float((h >> 16) & 0xFFFF) + float((h >> 32) & 0xFFFF) + float(h >> 48);
    out[i] = f32_to_bf16((s - 2.0f * 65536.0f) * k);
  }
  return t;
}

}  // namespace

SynthResult synth_model(const std::string& shape_name, const std::string& out_dir, uint64_t seed,
                        const std::string& tokenizer, const std::function<void(const std::string&)>& log,
                        int64_t layers) {
  const SynthShape* sp = nullptr;
  std::string known;
  for (const SynthShape& s : synth_shapes()) {
    if (s.name == shape_name) sp = &s;
    known += (known.empty() ? "" : ", ") + s.name;
  }
  if (!sp) throw Error("unknown shape '" + shape_name + "' (known: " + known + ")");
  if (layers < 0) throw Error("--layers must be positive (0: the shape's own count)");
  SynthShape s = *sp;
  if (layers > 0) s.layers = layers;
  if (fs::exists(out_dir)) throw Error(out_dir + " already exists; choose a new output directory");
  if (!tokenizer.empty() && !fs::is_regular_file(tokenizer)) throw Error("tokenizer file " + tokenizer + " not found");

  const int64_t H = s.hidden, hd = H / s.heads, qd = s.heads * hd, kvd = s.kv_heads * hd;
  nlohmann::json cfg = {{"architectures", {s.architecture}},
                        {"model_type", s.model_type},
                        {"hidden_size", H},
                        {"intermediate_size", s.intermediate},
                        {"num_hidden_layers", s.layers},
                        {"num_attention_heads", s.heads},
                        {"num_key_value_heads", s.kv_heads},
                        {"vocab_size", s.vocab},
                        {"max_position_embeddings", s.max_positions},
                        {"rope_theta", s.rope_theta},
                        {"rms_norm_eps", s.rms_eps},
                        {"hidden_act", "silu"},
                        {"tie_word_embeddings", false},
                        {"torch_dtype", "bfloat16"},
                        {"bos_token_id", 1},
                        {"eos_token_id", 2},
                        {"llmq_synth", {{"shape", s.name}, {"seed", seed}, {"layers", s.layers}}}};
  if (s.sliding_window) cfg["sliding_window"] = s.sliding_window;
  if (s.model_type == "qwen2") cfg["use_sliding_window"] = false;

  // Tensors in checkpoint order, cut into shards of about 4 GiB.
  struct Spec {
    std::string name;
    std::vector<int64_t> shape;
    float std_dev, constant;
  };
  std::vector<Spec> specs;
  specs.push_back({"model.embed_tokens.weight", {s.vocab, H}, 0.02f, 0});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_layernorm.weight", {H}, 0, 1});
    specs.push_back({p + "self_attn.q_proj.weight", {qd, H}, 0.02f, 0});
    specs.push_back({p + "self_attn.k_proj.weight", {kvd, H}, 0.02f, 0});
    specs.push_back({p + "self_attn.v_proj.weight", {kvd, H}, 0.02f, 0});
    if (s.qkv_bias) {
      specs.push_back({p + "self_attn.q_proj.bias", {qd}, 0.02f, 0});
      specs.push_back({p + "self_attn.k_proj.bias", {kvd}, 0.02f, 0});
      specs.push_back({p + "self_attn.v_proj.bias", {kvd}, 0.02f, 0});
    }
    specs.push_back({p + "self_attn.o_proj.weight", {H, qd}, 0.02f, 0});
    specs.push_back({p + "post_attention_layernorm.weight", {H}, 0, 1});
    specs.push_back({p + "mlp.gate_proj.weight", {s.intermediate, H}, 0.02f, 0});
    specs.push_back({p + "mlp.up_proj.weight", {s.intermediate, H}, 0.02f, 0});
    specs.push_back({p + "mlp.down_proj.weight", {H, s.intermediate}, 0.02f, 0});
  }
  specs.push_back({"model.norm.weight", {H}, 0, 1});
  specs.push_back({"lm_head.weight", {s.vocab, H}, 0.02f, 0});

  const uint64_t shard_limit = 4ull << 30;
  std::vector<std::vector<const Spec*>> shards(1);
  uint64_t cur = 0, total = 0;
  SynthResult r;
  for (const Spec& sp2 : specs) {
    uint64_t n = 1;
    for (int64_t d : sp2.shape) n *= uint64_t(d);
    r.params += int64_t(n);
    if (cur > 0 && cur + 2 * n > shard_limit) shards.emplace_back(), cur = 0;
    shards.back().push_back(&sp2);
    cur += 2 * n;
    total += 2 * n;
  }
  // Written atomically (OutputDir): an interrupted run of a 16-GB shape leaves no shards behind.
  std::vector<std::string> names = {"model.safetensors.index.json", "config.json", "tokenizer.json"};
  for (size_t i = 0; i < shards.size(); ++i) {
    char fname[64];
    std::snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    names.push_back(fname);
    names.push_back(std::string(fname) + ".tmp");  // write_safetensors' file until it is complete
  }
  OutputDir dir(out_dir, names);
  const fs::path tmp = dir.tmp();
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string& fname = names[3 + 2 * i];
    std::vector<TensorData> tensors;
    for (const Spec* sp2 : shards[i]) {
      tensors.push_back(make_tensor(sp2->name, sp2->shape, sp2->std_dev, sp2->constant, seed));
      weight_map[sp2->name] = fname;
    }
    write_safetensors((tmp / fname).string(), tensors);
    if (log) log("wrote " + std::string(fname) + " (" + std::to_string(i + 1) + "/" + std::to_string(shards.size()) + ")");
  }
  write_text_file((tmp / "model.safetensors.index.json").string(),
                  nlohmann::json({{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}).dump(2) + "\n");
  write_text_file((tmp / "config.json").string(), cfg.dump(2) + "\n");
  if (!tokenizer.empty()) {
    std::error_code ec;
    fs::copy_file(tokenizer, tmp / "tokenizer.json", ec);
    if (ec) throw Error((tmp / "tokenizer.json").string() + ": cannot write: " + ec.message());
  }
  dir.commit();
  r.bytes = total;
  return r;
}

}  // namespace llmq
