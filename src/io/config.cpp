#include "io/config.hpp"

#include <nlohmann/json.hpp>

#include "io/mmap_file.hpp"

namespace llmq {

using json = nlohmann::json;

namespace {

int64_t get_int(const json& j, const char* key, const std::string& where, bool required, int64_t def = 0) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) throw Error(where + ": missing \"" + key + "\"");
    return def;
  }
  if (!j[key].is_number_integer()) throw Error(where + ": \"" + key + "\" must be an integer");
  int64_t v = j[key].get<int64_t>();
  if (v < 0) throw Error(where + ": \"" + key + "\" must not be negative");
  return v;
}

double get_num(const json& j, const char* key, double def, const std::string& where) {
  if (!j.contains(key) || j[key].is_null()) return def;
  if (!j[key].is_number()) throw Error(where + ": \"" + key + "\" must be a number");
  return j[key].get<double>();
}

}  // namespace

ModelConfig parse_config(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error(where + ": invalid JSON: " + e.what());
  }
  if (!j.is_object()) throw Error(where + ": not a JSON object");
  ModelConfig c;
  if (j.contains("architectures") && j["architectures"].is_array() && !j["architectures"].empty() &&
      j["architectures"][0].is_string())
    c.architecture = j["architectures"][0].get<std::string>();
  c.model_type = j.value("model_type", std::string());
  static const std::pair<const char*, const char*> known[] = {
      {"LlamaForCausalLM", "llama"}, {"MistralForCausalLM", "mistral"}, {"Qwen2ForCausalLM", "qwen2"}};
  bool ok = false;
  for (auto& [arch, type] : known) {
    if (c.architecture == arch || (c.architecture.empty() && c.model_type == type)) {
      c.architecture = arch;
      c.model_type = type;
      ok = true;
    }
  }
  if (!ok)
    throw Error(where + ": unknown architecture '" + (c.architecture.empty() ? c.model_type : c.architecture) +
                "' (llmq supports LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM)");

  c.hidden = get_int(j, "hidden_size", where, true);
  c.intermediate = get_int(j, "intermediate_size", where, true);
  c.layers = get_int(j, "num_hidden_layers", where, true);
  c.heads = get_int(j, "num_attention_heads", where, true);
  c.kv_heads = get_int(j, "num_key_value_heads", where, false, c.heads);
  c.vocab = get_int(j, "vocab_size", where, true);
  c.max_positions = get_int(j, "max_position_embeddings", where, false, 2048);
  if (c.hidden == 0 || c.intermediate == 0 || c.layers == 0 || c.heads == 0 || c.kv_heads == 0 || c.vocab == 0)
    throw Error(where + ": sizes must be positive");
  c.head_dim = get_int(j, "head_dim", where, false, 0);
  if (c.head_dim == 0) {
    if (c.hidden % c.heads) throw Error(where + ": hidden_size is not a multiple of num_attention_heads");
    c.head_dim = c.hidden / c.heads;
  }
  if (c.head_dim % 2) throw Error(where + ": head_dim must be even for RoPE");
  if (c.heads % c.kv_heads) throw Error(where + ": num_attention_heads is not a multiple of num_key_value_heads");
  c.rms_eps = float(get_num(j, "rms_norm_eps", 1e-6, where));
  c.tie_embeddings = j.value("tie_word_embeddings", false);
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;
  } else if (c.model_type == "llama") {
    c.qkv_bias = c.o_bias = j.value("attention_bias", false);
    c.mlp_bias = j.value("mlp_bias", false);
  }
  if (c.model_type == "mistral" || c.model_type == "qwen2") {
    bool use_sw = c.model_type == "mistral" || j.value("use_sliding_window", false);
    if (use_sw && j.contains("sliding_window") && j["sliding_window"].is_number_integer())
      c.sliding_window = j["sliding_window"].get<int64_t>();
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu")
    throw Error(where + ": unsupported hidden_act " + j["hidden_act"].dump() + " (llmq supports silu)");

  // RoPE: transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; older configs write rope_theta
  // at the top level and rope_scaling {type|rope_type, factor, ...}.
  c.rope_theta = get_num(j, "rope_theta", 10000.0, where);
  json rp;
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) rp = j["rope_parameters"];
  if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) {
    for (auto& [k, v] : j["rope_scaling"].items())
      if (!rp.contains(k)) rp[k] = v;
  }
  if (rp.is_object()) {
    c.rope_theta = get_num(rp, "rope_theta", c.rope_theta, where);
    std::string type = rp.value("rope_type", rp.value("type", std::string("default")));
    if (type == "default") {
      c.rope_type = RopeType::Default;
    } else if (type == "linear") {
      c.rope_type = RopeType::Linear;
      c.rope_factor = get_num(rp, "factor", 1.0, where);
    } else if (type == "llama3") {
      c.rope_type = RopeType::Llama3;
      c.rope_factor = get_num(rp, "factor", 8.0, where);
      c.rope_low_freq_factor = get_num(rp, "low_freq_factor", 1.0, where);
      c.rope_high_freq_factor = get_num(rp, "high_freq_factor", 4.0, where);
      c.rope_original_max_positions = get_num(rp, "original_max_position_embeddings", 8192, where);
      if (c.rope_high_freq_factor <= c.rope_low_freq_factor)
        throw Error(where + ": llama3 rope scaling needs high_freq_factor > low_freq_factor");
    } else {
      throw Error(where + ": unsupported rope type '" + type + "' (llmq supports default, linear and llama3)");
    }
    if (c.rope_factor <= 0) throw Error(where + ": rope scaling factor must be positive");
  }
  if (c.rope_theta <= 0) throw Error(where + ": rope_theta must be positive");

  std::string dt = j.contains("dtype") && j["dtype"].is_string() ? j["dtype"].get<std::string>()
                   : j.contains("torch_dtype") && j["torch_dtype"].is_string() ? j["torch_dtype"].get<std::string>()
                                                                               : "bfloat16";
  if (dt == "bfloat16") c.dtype = DType::BF16;
  else if (dt == "float16") c.dtype = DType::F16;
  else if (dt == "float32") c.dtype = DType::F32;
  else throw Error(where + ": unsupported dtype '" + dt + "'");

  if (j.contains("bos_token_id") && j["bos_token_id"].is_number_integer()) c.bos_id = j["bos_token_id"];
  if (j.contains("eos_token_id")) {
    if (j["eos_token_id"].is_number_integer()) c.eos_ids.push_back(j["eos_token_id"]);
    else if (j["eos_token_id"].is_array())
      for (auto& e : j["eos_token_id"])
        if (e.is_number_integer()) c.eos_ids.push_back(e);
  }
  if (j.contains("quantization_config") && !j["quantization_config"].is_null())
    c.quantization = j["quantization_config"].dump();
  return c;
}

ModelConfig load_config(const std::string& dir) {
  const std::string path = dir + "/config.json";
  if (!is_directory(dir)) throw Error(dir + ": not a model directory");
  if (!file_exists(path)) throw Error(path + ": missing (not a Hugging Face model directory?)");
  return parse_config(read_text_file(path), path);
}

}  // namespace llmq
