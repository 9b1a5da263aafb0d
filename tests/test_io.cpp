// Checkpoint loading: valid files read back exactly; every malformed input is an llmq::Error whose message
// names the file and the problem.
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>

#include "io/config.hpp"
#include "io/safetensors.hpp"
#include "model/llama.hpp"
#include "test_util.hpp"

using namespace llmq;
using nlohmann::json;
using test::expect_error;

namespace {

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/llmq-test-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path + "'").c_str()); }
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// A safetensors file from a header string and a data section.
std::string st_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

// Expects f() to throw llmq::Error whose message contains every needle.
TensorData f32_tensor(const std::string& name, std::vector<int64_t> shape, float start) {
  TensorData t{name, DType::F32, shape, {}};
  int64_t n = 1;
  for (auto d : shape) n *= d;
  t.bytes.resize(size_t(n) * 4);
  for (int64_t i = 0; i < n; ++i) {
    float v = start + float(i);
    std::memcpy(&t.bytes[size_t(i) * 4], &v, 4);
  }
  return t;
}

}  // namespace

TEST(Safetensors, WriteThenReadBack) {
  TempDir d;
  TensorData b{"b", DType::BF16, {3}, {}};
  for (float v : {1.0f, -2.5f, 3.25f}) {
    uint16_t h = f32_to_bf16(v);
    b.bytes.push_back(uint8_t(h & 0xff));
    b.bytes.push_back(uint8_t(h >> 8));
  }
  write_safetensors(d.path + "/x.safetensors", {f32_tensor("a", {2, 3}, 0.5f), b}, {{"format", "pt"}});
  EXPECT_FALSE(file_exists(d.path + "/x.safetensors.tmp"));
  SafetensorsFile f(d.path + "/x.safetensors");
  ASSERT_EQ(f.tensors().size(), 2u);
  const TensorView& a = f.tensors().at("a");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(load_as_f32(a.data, a.dtype, 5), 5.5f);
  const TensorView& bv = f.tensors().at("b");
  EXPECT_EQ(bv.dtype, DType::BF16);
  EXPECT_EQ(load_as_f32(bv.data, bv.dtype, 1), -2.5f);
  EXPECT_EQ(load_as_f32(bv.data, bv.dtype, 2), 3.25f);
}

// The streaming writer: with its header written into the reserved space, and with a reserve too small (the
// header written exactly, the data copied after it: then the same bytes as write_safetensors, in pieces larger
// than its copy buffer too). Nothing at the path before finish(); its scratch files gone after.
TEST(Safetensors, StreamingWriterMatchesWholeWriter) {
  TempDir d;
  std::vector<TensorData> ts = {f32_tensor("z", {3}, 1.f), f32_tensor("a", {5, 700, 1000}, -2.f),
                                TensorData{"e", DType::U8, {0}, {}}, f32_tensor("m", {1}, 7.f)};
  write_safetensors(d.path + "/whole.safetensors", ts, {{"format", "pt"}});
  auto read = [](const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(f)), {});
  };
  const std::string whole = read(d.path + "/whole.safetensors");
  const uint64_t data = uint64_t(4 * (3 + 5 * 700 * 1000 + 1));
  for (uint64_t reserve : {uint64_t(4096), uint64_t(16)}) {
    const std::string p = d.path + "/stream" + std::to_string(reserve) + ".safetensors";
    {
      SafetensorsWriter w(p, reserve);
      for (const TensorData& t : ts) w.add(t);
      EXPECT_FALSE(file_exists(p));
      expect_error([&] { w.add(ts[0]); }, {"'z'", "twice"});
      expect_error([&] { w.add(TensorData{"bad", DType::F32, {2}, {1, 2, 3}}); }, {"'bad'", "bytes for its shape"});
      w.finish({{"format", "pt"}});
      EXPECT_EQ(w.data_bytes(), data);
    }
    EXPECT_FALSE(file_exists(p + ".tmp"));
    EXPECT_FALSE(file_exists(p + ".tmp2"));
    const std::string got = read(p);
    if (reserve == 16) {
      EXPECT_TRUE(got == whole) << "sizes " << got.size() << " and " << whole.size();
    } else {
      EXPECT_EQ(got.size(), 8 + reserve + data);
      EXPECT_TRUE(got.compare(8 + reserve, data, whole, whole.size() - data, data) == 0) << "the data differs";
    }
    SafetensorsFile f(p);
    ASSERT_EQ(f.tensors().size(), 4u);
    EXPECT_EQ(load_as_f32(f.tensors().at("a").data, DType::F32, 3'499'999), -2.f + 3'499'999.f);
    EXPECT_EQ(load_as_f32(f.tensors().at("m").data, DType::F32, 0), 7.f);
  }
}

// A writer dropped before finish() (an error in the middle of a quantization) leaves nothing behind.
TEST(Safetensors, UnfinishedWriterLeavesNothing) {
  TempDir d;
  const std::string p = d.path + "/x.safetensors";
  {
    SafetensorsWriter w(p);
    w.add(f32_tensor("a", {4}, 0.f));
  }
  EXPECT_FALSE(file_exists(p));
  EXPECT_FALSE(file_exists(p + ".tmp"));
}

TEST(Safetensors, MalformedFilesAreRejectedWithTheirName) {
  TempDir d;
  const std::string p = d.path + "/m.safetensors";
  expect_error([&] { SafetensorsFile f(d.path + "/absent.safetensors"); }, {"absent.safetensors", "cannot open"});
  write_bytes(p, "abc");
  expect_error([&] { SafetensorsFile f(p); }, {p, "truncated"});
  write_bytes(p, st_bytes("{}", "").substr(0, 8) + "{");  // header length says 2, only 1 byte follows
  expect_error([&] { SafetensorsFile f(p); }, {p, "header"});
  write_bytes(p, st_bytes("{\"a\": [1, 2", ""));
  expect_error([&] { SafetensorsFile f(p); }, {p, "corrupt"});
  write_bytes(p, st_bytes(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile f(p); }, {p, "'w'", "outside"});
  write_bytes(p, st_bytes(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}})", std::string(16, '\0')));
  expect_error([&] { SafetensorsFile f(p); }, {p, "'w'", "[3]"});
  write_bytes(p, st_bytes(R"({"w": {"dtype": "F8_E5M2", "shape": [4], "data_offsets": [0, 4]}})", std::string(4, '\0')));
  expect_error([&] { SafetensorsFile f(p); }, {p, "'w'", "F8_E5M2"});
  write_bytes(p, st_bytes(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", std::string(4, '\0')));
  expect_error([&] { SafetensorsFile f(p); }, {p, "'w'", "shape"});
  write_bytes(p, st_bytes(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile f(p); }, {p, "'w'"});
}

TEST(Checkpoint, ShardedIndexErrors) {
  TempDir d;
  write_safetensors(d.path + "/s1.safetensors", {f32_tensor("a", {2}, 0)});
  write_bytes(d.path + "/model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { Checkpoint c(d.path); }, {"s2.safetensors", "missing"});
  write_bytes(d.path + "/model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}})");
  expect_error([&] { Checkpoint c(d.path); }, {"s1.safetensors", "'b'"});
  write_bytes(d.path + "/model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors"}})");
  Checkpoint c(d.path);
  EXPECT_NE(c.find("a"), nullptr);
  expect_error([&] { c.get("zzz"); }, {"'zzz'", "missing"});
  TempDir empty;
  expect_error([&] { Checkpoint e(empty.path); }, {empty.path, "model.safetensors"});
}

TEST(Config, BothRopeFormsAndErrors) {
  const std::string classic = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
    "rope_theta": 500000.0, "torch_dtype": "float16",
    "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64}})";
  ModelConfig c = parse_config(classic, "c.json");
  EXPECT_EQ(c.rope_type, RopeType::Llama3);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_factor, 8.0);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.dtype, DType::F16);
  const std::string v5 = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "head_dim": 48, "dtype": "bfloat16",
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}})";
  c = parse_config(v5, "c.json");
  EXPECT_EQ(c.rope_type, RopeType::Linear);
  EXPECT_EQ(c.rope_factor, 4.0);
  EXPECT_EQ(c.head_dim, 48);
  EXPECT_EQ(c.kv_heads, 4);
  json j = json::parse(v5);
  j["architectures"] = {"GPT2LMHeadModel"};
  expect_error([&] { parse_config(j.dump(), "c.json"); }, {"c.json", "GPT2LMHeadModel"});
  j = json::parse(v5);
  j["rope_parameters"]["rope_type"] = "yarn";
  expect_error([&] { parse_config(j.dump(), "c.json"); }, {"c.json", "yarn"});
  j = json::parse(v5);
  j.erase("hidden_size");
  expect_error([&] { parse_config(j.dump(), "c.json"); }, {"c.json", "hidden_size"});
  j = json::parse(v5);
  j["dtype"] = "int4";
  expect_error([&] { parse_config(j.dump(), "c.json"); }, {"c.json", "int4"});
  expect_error([&] { parse_config("{", "c.json"); }, {"c.json", "JSON"});
  expect_error([&] { load_config("/nonexistent-dir"); }, {"/nonexistent-dir"});
}

// A checkpoint that disagrees with its config: the tensor, its file and both shapes are named.
TEST(Model, ShapeMismatchAndMissingTensor) {
  const std::string src = test::shared_dir() + "/models/tiny/tiny-qwen2-bias";
  TempDir d;
  json cfg = test::load_json(src + "/config.json");
  ASSERT_EQ(symlink((src + "/model.safetensors").c_str(), (d.path + "/model.safetensors").c_str()), 0);
  cfg["intermediate_size"] = 200;
  write_bytes(d.path + "/config.json", cfg.dump());
  expect_error([&] { Model m(d.path); }, {"model.safetensors", "mlp", "[192, 96]", "[200, 96]"});

  // Drop one tensor: rewrite the checkpoint without it.
  cfg["intermediate_size"] = 192;
  write_bytes(d.path + "/config.json", cfg.dump());
  SafetensorsFile full(src + "/model.safetensors");
  std::vector<TensorData> kept;
  for (auto& [name, t] : full.tensors()) {
    if (name == "model.layers.1.self_attn.k_proj.bias") continue;
    TensorData td{name, t.dtype, t.shape, {}};
    td.bytes.assign(static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.nbytes());
    kept.push_back(std::move(td));
  }
  std::remove((d.path + "/model.safetensors").c_str());
  write_safetensors(d.path + "/model.safetensors", kept);
  expect_error([&] { Model m(d.path); }, {"model.layers.1.self_attn.k_proj.bias", "missing"});
}
