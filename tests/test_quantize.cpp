// The quantization pipeline end to end on the bundled demo model: every method loads and stays within a
// budget of the baseline; output is deterministic and atomic; bad input is a clear error; quantized linears
// compute what their formats define; SmoothQuant recovers a model stressed with activation outliers.
#include <filesystem>
#include <fstream>
#include <random>

#include "eval/compare.hpp"
#include "io/mmap_file.hpp"
#include "model/llama.hpp"
#include "quant/formats/formats.hpp"
#include "quant/quantize.hpp"
#include "test_util.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace llmq;
using namespace llmq::quant;
namespace fs = std::filesystem;
using nlohmann::json;
using test::expect_error;

namespace {

std::string demo() { return std::string(LLMQ_SOURCE_DIR) + "/models/llama-7m-demo"; }
std::string c4() { return test::shared_dir() + "/data/c4/c4_validation_2k.jsonl"; }

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/llmq-q-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TempDir() { fs::remove_all(path); }
};

QuantizeOptions opts(const std::string& method) {
  QuantizeOptions o;
  o.method = method;
  o.calib = c4();
  o.calib_samples = 16;
  o.calib_seq_len = 256;
  o.group_size = 64;
  return o;
}

const std::vector<int32_t>& eval_tokens() {
  static const std::vector<int32_t> ids =
      Tokenizer::load(demo()).encode(read_text_file(test::shared_dir() + "/data/eval/docs-en.txt").substr(0, 200000), false);
  return ids;
}

CompareResult eval_dir(const std::string& dir, const std::string& base = demo()) {
  Model m(dir), b(base);
  return compare(m, b, eval_tokens(), 256, 8, false, nullptr);
}

}  // namespace

// Budgets on the demo model (small calibration, 8 windows of 256): regression gates, looser than the
// llama-27m targets measured by scripts/quant-eval.sh.
TEST(Quantize, EveryMethodLoadsAndStaysWithinBudget) {
  TempDir d;
  const std::pair<const char*, double> budgets[] = {{"w8a16", 0.5}, {"fp8", 2.5}, {"int8-sq", 3.0},
                                                    {"w4a16-rtn", 10.0}, {"w4a16-awq", 10.0}, {"w4a16-gptq", 10.0}};
  std::map<std::string, double> kld;
  for (auto [method, budget] : budgets) {
    const std::string out = d.path + "/" + method;
    QuantizeReport r = quantize_model(demo(), out, opts(method), [](const std::string&) {});
    EXPECT_GT(r.bytes_out, 0u);
    EXPECT_LT(r.bytes_out, r.bytes_in);
    CompareResult c = eval_dir(out);
    std::printf("%-11s delta-ppl %+.3f%%  KLD %.5f  top-1 %.2f%%  %.2f bits  %.1f s\n", method, c.delta_ppl_pct, c.mean_kld,
                100 * c.top1_agreement, r.bits_per_weight, r.seconds);
    EXPECT_LE(std::abs(c.delta_ppl_pct), budget) << method;
    EXPECT_GT(c.top1_agreement, 0.8) << method;
    kld[method] = c.mean_kld;
    Model m(out);
    EXPECT_EQ(m.quant().method, method);
  }
  EXPECT_LT(kld["w8a16"], kld["w4a16-rtn"]);
  EXPECT_LT(kld["w4a16-gptq"], kld["w4a16-rtn"]);
  EXPECT_LT(kld["w4a16-awq"], kld["w4a16-rtn"]);
}

TEST(Quantize, KvCacheFp8AndInt8) {
  TempDir d;
  // FP8 KV with FP8 weights; INT8 KV with AWQ (so the sanitizer run, which skips the sweep, covers AWQ too).
  for (auto [kv, method, budget] : {std::tuple{KvFormat::Fp8, "fp8", 4.0}, std::tuple{KvFormat::Int8, "w4a16-awq", 10.0}}) {
    QuantizeOptions o = opts(method);
    o.kv = kv;
    const std::string out = d.path + "/" + kv_format_name(kv);
    quantize_model(demo(), out, o, [](const std::string&) {});
    Model m(out);
    ASSERT_EQ(m.quant().kv, kv);
    ASSERT_EQ(m.layers()[0].k_scale.size(), size_t(m.config().kv_heads));
    CompareResult c = eval_dir(out);
    EXPECT_LE(std::abs(c.delta_ppl_pct), budget) << kv_format_name(kv);
  }
}

// --fp8-headroom: FP8 activation and KV scales cover headroom x the calibration absmax (default 2); INT8 KV
// scales stay at absmax / 127.
TEST(Quantize, Fp8HeadroomScalesTheStaticScales) {
  TempDir d;
  auto run = [&](const char* name, float headroom, KvFormat kv) {
    QuantizeOptions o = opts("fp8");
    o.kv = kv;
    o.fp8_headroom = headroom;
    quantize_model(demo(), d.path + "/" + name, o, [](const std::string&) {});
    return std::make_unique<Model>(d.path + "/" + name);
  };
  EXPECT_EQ(QuantizeOptions{}.fp8_headroom, 2.0f);
  auto one = run("h1", 1.f, KvFormat::Fp8), two = run("h2", 2.f, KvFormat::Fp8);
  for (size_t li = 0; li < one->layers().size(); ++li) {
    const LayerWeights &a = one->layers()[li], &b = two->layers()[li];
    for (auto [la, lb] : {std::pair{&a.q, &b.q}, {&a.o, &b.o}, {&a.gate, &b.gate}, {&a.down, &b.down}})
      EXPECT_FLOAT_EQ(lb->act_scale, 2.f * la->act_scale) << "layer " << li;
    for (size_t h = 0; h < a.k_scale.size(); ++h) {
      EXPECT_FLOAT_EQ(b.k_scale[h], 2.f * a.k_scale[h]);
      EXPECT_FLOAT_EQ(b.v_scale[h], 2.f * a.v_scale[h]);
    }
  }
  QuantizeOptions bad = opts("fp8");
  bad.fp8_headroom = 0.5f;
  expect_error([&] { quantize_model(demo(), d.path + "/bad", bad, [](const std::string&) {}); }, {"--fp8-headroom"});
}

TEST(Quantize, DeterministicAndAtomic) {
  TempDir d;
  QuantizeOptions o = opts("w4a16-gptq");
  quantize_model(demo(), d.path + "/a", o, [](const std::string&) {});
  quantize_model(demo(), d.path + "/b", o, [](const std::string&) {});
  EXPECT_EQ(read_text_file(d.path + "/a/model.safetensors"), read_text_file(d.path + "/b/model.safetensors"));
  EXPECT_EQ(read_text_file(d.path + "/a/config.json"), read_text_file(d.path + "/b/config.json"));
  EXPECT_TRUE(fs::exists(d.path + "/a/tokenizer.json"));
  // an existing output is refused; a failed run leaves nothing behind
  expect_error([&] { quantize_model(demo(), d.path + "/a", o, [](const std::string&) {}); }, {"already exists"});
  QuantizeOptions bad = o;
  bad.calib = d.path + "/missing.txt";
  expect_error([&] { quantize_model(demo(), d.path + "/c", bad, [](const std::string&) {}); }, {"missing.txt"});
  EXPECT_FALSE(fs::exists(d.path + "/c"));
  for (auto& e : fs::directory_iterator(d.path)) EXPECT_EQ(e.path().string().find(".tmp-"), std::string::npos);
}

TEST(Quantize, BadInputIsAClearError) {
  TempDir d;
  QuantizeOptions o = opts("fp8");
  o.calib = "";
  expect_error([&] { quantize_model(demo(), d.path + "/x", o, [](const std::string&) {}); }, {"--calib"});
  std::ofstream(d.path + "/empty.txt") << "";
  o.calib = d.path + "/empty.txt";
  expect_error([&] { quantize_model(demo(), d.path + "/x", o, [](const std::string&) {}); }, {"0 tokens", "256"});
  std::ofstream(d.path + "/short.txt") << "only a few words of text here";
  o.calib = d.path + "/short.txt";
  expect_error([&] { quantize_model(demo(), d.path + "/x", o, [](const std::string&) {}); }, {"tokens", "256", "4096"});
  o = opts("w4a16-rtn");
  o.group_size = 100;
  expect_error([&] { quantize_model(demo(), d.path + "/x", o, [](const std::string&) {}); }, {"100", "does not divide"});
  o = opts("nf4");
  expect_error([&] { quantize_model(demo(), d.path + "/x", o, [](const std::string&) {}); }, {"nf4"});
  // an already quantized model
  quantize_model(demo(), d.path + "/q", opts("w8a16"), [](const std::string&) {});
  expect_error([&] { quantize_model(d.path + "/q", d.path + "/x", opts("w8a16"), [](const std::string&) {}); },
               {"already quantized"});
  // NaN in the weights
  fs::create_directories(d.path + "/nan");
  for (auto f : {"config.json", "tokenizer.json", "tokenizer_config.json"}) fs::copy_file(demo() + "/" + f, d.path + "/nan/" + f);
  SafetensorsFile src(demo() + "/model.safetensors");
  std::vector<TensorData> ts;
  for (auto& [name, t] : src.tensors()) {
    TensorData td{name, t.dtype, t.shape, {static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.nbytes()}};
    if (name == "model.layers.2.mlp.up_proj.weight") {
      td.bytes[20] = 0xc0;  // BF16 0x7fc0: NaN
      td.bytes[21] = 0x7f;
    }
    ts.push_back(std::move(td));
  }
  write_safetensors(d.path + "/nan/model.safetensors", ts);
  expect_error([&] { quantize_model(d.path + "/nan", d.path + "/x", opts("w8a16"), [](const std::string&) {}); },
               {"model.layers.2.mlp.up_proj.weight", "NaN"});
  EXPECT_FALSE(fs::exists(d.path + "/x"));
}

// Each quantized linear's forward equals a scalar evaluation of its format's definition.
TEST(Quantize, QuantizedLinearsComputeTheirFormats) {
  TempDir d;
  for (const char* method : {"fp8", "int8-sq", "w8a16", "w4a16-rtn"}) {
    quantize_model(demo(), d.path + "/" + method, opts(method), [](const std::string&) {});
    Model m(d.path + "/" + method);
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (const Linear* l : {&m.layers()[1].q, &m.layers()[3].down}) {
      const int64_t M = 3;
      std::vector<float> x(static_cast<size_t>(M * l->in)), y(static_cast<size_t>(M * l->out), NAN);
      for (auto& v : x) v = nd(rng);
      l->forward(x.data(), M, y.data());
      std::vector<float> w(static_cast<size_t>(l->out * l->in));
      l->dequantize_rows(0, l->out, w.data());
      for (int64_t r = 0; r < M; ++r) {
        // activations as the format sees them
        std::vector<double> xa(x.begin() + r * l->in, x.begin() + (r + 1) * l->in);
        if (l->act == ActQuant::Fp8Tensor)
          for (auto& v : xa) v = fp8_to_f32(f32_to_fp8(float(v) / l->act_scale)) * double(l->act_scale);
        if (l->act == ActQuant::Int8Token) {
          double amax = 0;
          for (double v : xa) amax = std::max(amax, std::abs(v));
          const float s = float(amax / 127.0);
          for (auto& v : xa) v = double(quant_int8(float(v), 1.0f / s)) * s;
        }
        for (int64_t n = 0; n < l->out; ++n) {
          double want = l->bias.empty() ? 0.0 : l->bias[size_t(n)], mag = 0;
          for (int64_t k = 0; k < l->in; ++k) {
            want += xa[size_t(k)] * w[size_t(n * l->in + k)];
            mag += std::abs(xa[size_t(k)] * w[size_t(n * l->in + k)]);
          }
          ASSERT_NEAR(y[size_t(r * l->out + n)], want, 1e-5 * mag + 1e-6) << method << " row " << r << " out " << n;
        }
      }
    }
  }
}

// --lm-head int8: the output projection stored as INT8 rows with per-row scales (row absmax / 127), read with
// unquantized activations, whatever the method; tied embeddings (the demo) get a separate lm_head and keep the
// embedding dense; an untied model (llama-27m) too. Its cost on the demo stays small next to the method's own.
TEST(Quantize, Int8LmHead) {
  TempDir d;
  for (const std::string& base : {demo(), test::shared_dir() + "/models/llama-27m"}) {
    const std::string plain = d.path + "/plain", head8 = d.path + "/head8";
    fs::remove_all(plain);
    fs::remove_all(head8);
    QuantizeOptions o = opts("w8a16");
    quantize_model(base, plain, o, [](const std::string&) {});
    o.lm_head = WeightFormat::Int8Channel;
    quantize_model(base, head8, o, [](const std::string&) {});
    Model orig(base), mp(plain), mh(head8);
    const Linear &h = mh.lm_head(), &ho = orig.lm_head();
    EXPECT_EQ(mp.lm_head().fmt, WeightFormat::Dense) << base;
    ASSERT_EQ(h.fmt, WeightFormat::Int8Channel) << base;
    EXPECT_EQ(h.act, ActQuant::None);
    EXPECT_EQ(h.w->dtype, DType::I8);
    EXPECT_EQ(mh.quant().lm_head, WeightFormat::Int8Channel);
    EXPECT_EQ(mh.embed().dtype, orig.embed().dtype);  // the embedding stays as it was, tied or not
    const json qc = json::parse(read_text_file(head8 + "/config.json"))["quantization_config"];
    EXPECT_EQ(qc["lm_head"]["format"], "int8");
    EXPECT_EQ(qc["ignore"], json::array({"model.embed_tokens"}));
    // every row: scale = absmax / 127 of the original row, each weight within half a step of it
    std::vector<float> wq(size_t(h.in)), wo(size_t(h.in));
    for (int64_t r = 0; r < h.out; r += 7) {
      h.dequantize_rows(r, r + 1, wq.data());
      ho.dequantize_rows(r, r + 1, wo.data());
      float amax = 0;
      for (float v : wo) amax = std::max(amax, std::fabs(v));
      ASSERT_FLOAT_EQ(h.w_scale[size_t(r)], amax > 0 ? amax / 127.f : 1.f) << "row " << r;
      for (int64_t k = 0; k < h.in; ++k)
        ASSERT_LE(std::fabs(wq[size_t(k)] - wo[size_t(k)]), 0.5001f * h.w_scale[size_t(r)]) << "row " << r << " col " << k;
    }
    // half the BF16 matrix's bytes a token reads (plus one scale a row)
    EXPECT_EQ(mp.bytes_per_token() - mh.bytes_per_token(), uint64_t(h.out * h.in) * 2 - uint64_t(h.out * h.in + h.out * 4));
    if (base == demo()) {
      const CompareResult cp = eval_dir(plain), ch = eval_dir(head8);
      std::printf("w8a16 KLD %.6f, with an INT8 lm_head %.6f\n", cp.mean_kld, ch.mean_kld);
      EXPECT_NE(cp.mean_kld, ch.mean_kld);  // the quantized head is what runs
      EXPECT_LT(ch.mean_kld - cp.mean_kld, 2e-3);
      // eval --per-layer lists the quantized head with its own relative output error (INT8 rows: well under 1%)
      auto head_error = [&](const std::string& dir) {
        Model m(dir), b(base);
        for (const LayerError& l : compare(m, b, eval_tokens(), 128, 1, true, nullptr).layers)
          if (l.name == "lm_head") return l.rel_error;
        return -1.0;
      };
      EXPECT_EQ(head_error(plain), -1.0) << "an unquantized head is not listed";
      const double e = head_error(head8);
      EXPECT_GT(e, 0.0);
      EXPECT_LT(e, 0.01);
      std::printf("INT8 lm_head relative output error %.5f\n", e);
    }
  }
  // a checkpoint whose lm_head entry llmq does not know is refused by name
  expect_error([] { parse_quant_config(R"({"quant_method": "llmq", "method": "w8a16", "weights": {"format": "int8"},
                                          "lm_head": {"format": "int4", "strategy": "group"}})", "cfg"); },
               {"cfg", "lm_head", "int4/group"});
}

// An outlier-stressed copy of the demo model: a few channels of every RMSNorm weight scaled up 20-80x and
// the matching input columns of the next linears scaled down. Same function in FP32; per-tensor INT8
// activations without smoothing collapse; SmoothQuant recovers.
TEST(Quantize, SmoothQuantRecoversAnOutlierStressedModel) {
  TempDir d;
  const std::string st = d.path + "/stressed";
  fs::create_directories(st);
  for (auto f : {"config.json", "tokenizer.json", "tokenizer_config.json"}) fs::copy_file(demo() + "/" + f, st + "/" + f);
  SafetensorsFile src(demo() + "/model.safetensors");
  const int64_t H = 256;
  const std::vector<std::pair<int64_t, float>> outliers = {{7, 20.f}, {100, 45.f}, {201, 80.f}};
  std::vector<TensorData> ts;
  auto f32 = [](const TensorView& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < v.size(); ++i) v[i] = load_as_f32(t.data, t.dtype, i);
    return v;
  };
  for (auto& [name, t] : src.tensors()) {
    std::vector<float> v = f32(t);
    const bool norm = name.find("layernorm") != std::string::npos;
    const bool reads_norm = name.find("q_proj") != std::string::npos || name.find("k_proj") != std::string::npos ||
                            name.find("v_proj") != std::string::npos || name.find("gate_proj") != std::string::npos ||
                            name.find("up_proj") != std::string::npos;
    for (auto [c, f] : outliers) {
      if (norm) v[size_t(c)] *= f;
      if (reads_norm)
        for (int64_t r = 0; r < t.shape[0]; ++r) v[size_t(r * H + c)] /= f;
    }
    TensorData td{name, DType::F32, t.shape, std::vector<uint8_t>(v.size() * 4)};
    std::memcpy(td.bytes.data(), v.data(), td.bytes.size());
    ts.push_back(std::move(td));
  }
  write_safetensors(st + "/model.safetensors", ts);
  {
    CompareResult same = eval_dir(st);
    EXPECT_LT(same.mean_kld, 1e-6) << "the stressed model must compute the same function";
    // The same function up to FP32 rounding (columns divided by 20-80, norm weights multiplied), which the SIMD
    // kernels sum in another order than the scalar ones: a token whose two top logits are that close may swap.
    // Measured 0 of 2048 with LLMQ_ISA=scalar, 1 with avx2 (AVX2-only AMD EPYC, 2026-12-04); at most 0.1% here.
    EXPECT_GE(same.top1_agreement, 0.999) << same.predicted << " tokens predicted";
  }
  QuantizeOptions plain = opts("int8-sq");
  plain.sq_alpha = 0.f;  // no smoothing
  plain.act_static = true;
  quantize_model(st, d.path + "/plain", plain, [](const std::string&) {});
  QuantizeOptions smooth = plain;
  smooth.sq_alpha = 0.5f;
  quantize_model(st, d.path + "/smooth", smooth, [](const std::string&) {});
  CompareResult p = eval_dir(d.path + "/plain", st), s = eval_dir(d.path + "/smooth", st);
  std::printf("per-tensor INT8, no smoothing: delta-ppl %+.2f%% KLD %.4f; int8-sq: %+.2f%% KLD %.4f\n", p.delta_ppl_pct,
              p.mean_kld, s.delta_ppl_pct, s.mean_kld);
  EXPECT_GT(p.mean_kld, 5 * s.mean_kld);
  EXPECT_GT(p.delta_ppl_pct, 10.0);
  EXPECT_LT(s.delta_ppl_pct, 3.0);
}
