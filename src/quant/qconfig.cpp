#include "quant/qconfig.hpp"

#include <nlohmann/json.hpp>

#include "common.hpp"

namespace llmq {

using json = nlohmann::json;

const char* kv_format_name(KvFormat k) { return k == KvFormat::Fp8 ? "fp8_e4m3" : k == KvFormat::Int8 ? "int8" : "none"; }

QuantConfig parse_quant_config(const std::string& text, const std::string& where) {
  QuantConfig q;
  json j = json::parse(text);
  const std::string qm = j.value("quant_method", "");
  if (qm != "llmq")
    throw Error(where + ": quantization_config with quant_method '" + qm +
                "' is not supported (llmq loads checkpoints written by `llmq quantize`)");
  q.method = j.value("method", "");
  const json& w = j.at("weights");
  const std::string wf = w.value("format", "");
  if (wf == "int8") q.weights = WeightFormat::Int8Channel;
  else if (wf == "fp8_e4m3") q.weights = WeightFormat::Fp8Channel;
  else if (wf == "int4") {
    q.weights = WeightFormat::Int4Group;
    q.group_size = w.value("group_size", int64_t(0));
    q.symmetric = w.value("symmetric", false);
    if (q.group_size <= 0) throw Error(where + ": int4 weights need a positive group_size");
  } else {
    throw Error(where + ": unknown weight format '" + wf + "'");
  }
  if (j.contains("activations") && !j["activations"].is_null()) {
    const json& a = j["activations"];
    const std::string af = a.value("format", ""), st = a.value("strategy", "");
    if (af == "int8" && st == "token") q.acts = ActQuant::Int8Token;
    else if (af == "int8" && st == "tensor") q.acts = ActQuant::Int8Tensor;
    else if (af == "fp8_e4m3" && st == "tensor") q.acts = ActQuant::Fp8Tensor;
    else throw Error(where + ": unknown activation quantization '" + af + "/" + st + "'");
  }
  if (j.contains("kv_cache") && !j["kv_cache"].is_null()) {
    const std::string kf = j["kv_cache"].value("format", "");
    if (kf == "fp8_e4m3") q.kv = KvFormat::Fp8;
    else if (kf == "int8") q.kv = KvFormat::Int8;
    else throw Error(where + ": unknown kv_cache format '" + kf + "'");
  }
  if (j.contains("lm_head") && !j["lm_head"].is_null()) {
    const json& h = j["lm_head"];
    if (h.value("format", "") != "int8" || h.value("strategy", "") != "channel")
      throw Error(where + ": unknown lm_head quantization '" + h.value("format", "") + "/" + h.value("strategy", "") +
                  "' (llmq writes int8/channel or none)");
    q.lm_head = WeightFormat::Int8Channel;
  }
  return q;
}

std::string quant_config_json(const QuantConfig& q) {
  json j;
  j["quant_method"] = "llmq";
  j["format_version"] = 1;
  j["method"] = q.method;
  switch (q.weights) {
    case WeightFormat::Int8Channel: j["weights"] = {{"format", "int8"}, {"strategy", "channel"}, {"symmetric", true}}; break;
    case WeightFormat::Fp8Channel: j["weights"] = {{"format", "fp8_e4m3"}, {"strategy", "channel"}}; break;
    case WeightFormat::Int4Group:
      j["weights"] = {{"format", "int4"}, {"strategy", "group"}, {"group_size", q.group_size}, {"symmetric", q.symmetric}};
      break;
    case WeightFormat::Dense: j["weights"] = nullptr; break;
  }
  switch (q.acts) {
    case ActQuant::None: j["activations"] = nullptr; break;
    case ActQuant::Int8Token: j["activations"] = {{"format", "int8"}, {"strategy", "token"}, {"dynamic", true}}; break;
    case ActQuant::Int8Tensor: j["activations"] = {{"format", "int8"}, {"strategy", "tensor"}, {"dynamic", false}}; break;
    case ActQuant::Fp8Tensor: j["activations"] = {{"format", "fp8_e4m3"}, {"strategy", "tensor"}, {"dynamic", false}}; break;
  }
  j["kv_cache"] = q.kv == KvFormat::None ? json(nullptr) : json{{"format", kv_format_name(q.kv)}, {"strategy", "head"}};
  if (q.lm_head == WeightFormat::Int8Channel) {
    j["lm_head"] = {{"format", "int8"}, {"strategy", "channel"}, {"symmetric", true}};
    j["ignore"] = {"model.embed_tokens"};
  } else {
    j["lm_head"] = nullptr;
    j["ignore"] = {"model.embed_tokens", "lm_head"};
  }
  return j.dump();
}

}  // namespace llmq
