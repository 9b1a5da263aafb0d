// The command-line contract (DESIGN.md): exit 0 on success, 2 on a usage error, 1 with exactly one line
// `llmq: error: <what>` on stderr for anything else; --json prints one JSON object with the documented keys.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>

#include <fstream>

#include "quant/quantize.hpp"
#include "test_util.hpp"
#ifdef LLMQ_HAVE_CUDA
#include "backend/cuda/engine.hpp"
#endif

using namespace llmq;
using nlohmann::json;

namespace {

struct CmdResult {
  int code;
  std::string out, err;
};

CmdResult run(const std::string& args) {
  char tmpl[] = "/tmp/llmq-cli-XXXXXX";
  const std::string d = mkdtemp(tmpl);
  const std::string cmd = std::string(LLMQ_BINARY) + " " + args + " >" + d + "/out 2>" + d + "/err";
  const int st = std::system(cmd.c_str());
  CmdResult r{WIFEXITED(st) ? WEXITSTATUS(st) : -1, read_text_file(d + "/out"), read_text_file(d + "/err")};
  [[maybe_unused]] int rc = std::system(("rm -rf " + d).c_str());
  return r;
}

std::string demo() { return std::string(LLMQ_SOURCE_DIR) + "/models/llama-7m-demo"; }

void expect_one_line_error(const CmdResult& r, const std::string& needle) {
  EXPECT_EQ(r.code, 1) << r.err;
  EXPECT_EQ(r.err.rfind("llmq: error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(needle), std::string::npos) << r.err;
}

struct TempModel {
  std::string dir;
  explicit TempModel(const std::string& src) {
    char tmpl[] = "/tmp/llmq-model-XXXXXX";
    dir = mkdtemp(tmpl);
    [[maybe_unused]] int rc = std::system(("cp " + src + "/*.json " + src + "/*.safetensors " + dir).c_str());
  }
  ~TempModel() { [[maybe_unused]] int rc = std::system(("rm -rf " + dir).c_str()); }
};

}  // namespace

TEST(Cli, InfoJsonKeys) {
  CmdResult r = run("info " + demo() + " --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  for (auto k : {"architecture", "params", "layers", "hidden", "heads", "kv_heads", "vocab", "weight_bytes", "quantization"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["params"], 6819072);
  EXPECT_EQ(j["layers"], 6);
  EXPECT_EQ(j["quantization"], "none");
}

TEST(Cli, TokenizeJson) {
  CmdResult r = run("tokenize " + demo() + " --text 'Hello world' --add-special --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["ids"], json({0, 7355, 313, 5392}));
  EXPECT_EQ(j["tokens"][3], "Ġworld");
}

TEST(Cli, GenerateGreedyMatchesReference) {
  json ref = test::load_json(demo() + "/reference.json");
  const auto& p = ref["prompts"][0];
  std::string text = p["text"];
  CmdResult r = run("generate " + demo() + " -p " + json(text).dump() + " -n 32 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  EXPECT_EQ(j["ids"], p["greedy_ids"]);
  EXPECT_EQ(j["text"], p["greedy_text"]);
  EXPECT_EQ(j["prompt_tokens"], p["ids"].size());
  EXPECT_TRUE(j.contains("decode_tokens_per_s"));
  // streamed (non-JSON) output: the prompt, then the same continuation
  CmdResult s = run("generate " + demo() + " -p " + json(text).dump() + " -n 32");
  ASSERT_EQ(s.code, 0);
  EXPECT_EQ(s.out, text + p["greedy_text"].get<std::string>() + "\n");
  // seeded sampling repeats
  CmdResult a = run("generate " + demo() + " -p Hi -n 16 --temp 0.8 --top-k 40 --top-p 0.9 --seed 7 --json");
  CmdResult b = run("generate " + demo() + " -p Hi -n 16 --temp 0.8 --top-k 40 --top-p 0.9 --seed 7 --json");
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(json::parse(a.out)["ids"], json::parse(b.out)["ids"]);
}

TEST(Cli, PerplexityJson) {
  CmdResult r = run("perplexity " + demo() + " --text " + test::shared_dir() + "/data/eval/docs-en.txt --max-windows 2 --ctx 128 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  for (auto k : {"ppl", "mean_nll", "tokens", "windows", "predicted", "seconds"}) EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["windows"], 2);
  EXPECT_EQ(j["predicted"], 2 * 127);
  EXPECT_GT(j["ppl"].get<double>(), 1.0);
  EXPECT_NE(r.err.find("window 2/2"), std::string::npos) << "progress on stderr";
}

// bench: one run's keys; --batches runs several batch sizes on the model loaded once, one object per batch in
// order under "runs", each with the keys of a single run.
TEST(Cli, BenchJson) {
  const std::string small = " --prompt-len 8 --gen-len 4 --repeats 1 --json";
  CmdResult one = run("bench " + demo() + small);
  ASSERT_EQ(one.code, 0) << one.err;
  const json j = json::parse(one.out);
  for (auto k : {"prefill_tokens_per_s", "decode_tokens_per_s", "ttft_ms", "tpot_ms", "weight_bytes", "achieved_gbps",
                 "peak_gbps", "roofline_pct", "device"})
    EXPECT_TRUE(j.contains(k)) << k;
  EXPECT_EQ(j["batch"], 1);
  CmdResult many = run("bench " + demo() + " --batches 2,1,3" + small);
  ASSERT_EQ(many.code, 0) << many.err;
  const json m = json::parse(many.out);
  ASSERT_TRUE(m.contains("runs"));
  ASSERT_EQ(m["runs"].size(), 3u);
  const int want[3] = {2, 1, 3};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(m["runs"][size_t(i)]["batch"], want[i]);
    EXPECT_GT(m["runs"][size_t(i)]["decode_tokens_per_s"].get<double>(), 0.0);
    for (auto& [k, v] : j.items()) EXPECT_TRUE(m["runs"][size_t(i)].contains(k)) << k;
  }
  // --prefill-len: one more run last, batch 1 with that prompt and one generated token, also without --batches.
  for (const std::string& b : {std::string(" --batches 2"), std::string()}) {
    CmdResult pf = run("bench " + demo() + b + " --prefill-len 12" + small);
    ASSERT_EQ(pf.code, 0) << pf.err;
    const json p = json::parse(pf.out);
    ASSERT_TRUE(p.contains("runs"));
    ASSERT_EQ(p["runs"].size(), 2u);
    EXPECT_EQ(p["runs"][0]["batch"], b.empty() ? 1 : 2);
    EXPECT_EQ(p["runs"][0]["prompt_len"], 8);
    EXPECT_EQ(p["runs"][0]["gen_len"], 4);
    EXPECT_EQ(p["runs"][1]["batch"], 1);
    EXPECT_EQ(p["runs"][1]["prompt_len"], 12);
    EXPECT_EQ(p["runs"][1]["gen_len"], 1);
    EXPECT_GT(p["runs"][1]["prefill_tokens_per_s"].get<double>(), 0.0);
  }
  EXPECT_EQ(run("bench " + demo() + " --prefill-len 0" + small).code, 2);
  EXPECT_EQ(run("bench " + demo() + " --batches 1,x" + small).code, 2);
  EXPECT_EQ(run("bench " + demo() + " --batches 1,,2" + small).code, 2);
  EXPECT_EQ(run("bench " + demo() + " --batches 0" + small).code, 2);
  EXPECT_EQ(run("bench " + demo() + " --batch 2 --batches 1" + small).code, 2);
}

TEST(Cli, UsageErrorsExitTwo) {
  EXPECT_EQ(run("").code, 2);
  EXPECT_EQ(run("frobnicate").code, 2);
  EXPECT_EQ(run("generate " + demo()).code, 2);  // -p missing
  EXPECT_EQ(run("bench " + demo() + " --device tpu").code, 2);
  EXPECT_EQ(run("perplexity " + demo() + " --text x --ctx 0").code, 2);
  // A value out of range is named in a short line (CLI11's own check writes out 0 .. DBL_MAX, over 300 digits).
  const std::pair<std::string, std::string> out_of_range[] = {{"generate " + demo() + " -p hi -n -3", "-3 is negative"},
                                                               {"bench " + demo() + " --batch 0", "0 is not positive"}};
  for (const auto& [bad, said] : out_of_range) {
    CmdResult r = run(bad);
    EXPECT_EQ(r.code, 2) << bad;
    EXPECT_LT(r.err.size(), 120u) << r.err;
    EXPECT_NE(r.err.find(said), std::string::npos) << r.err;
  }
  EXPECT_EQ(run("--help").code, 0);
}

TEST(Cli, BadInputIsOneLineErrorExitOne) {
  expect_one_line_error(run("info /nonexistent/model"), "/nonexistent/model");
  expect_one_line_error(run("tokenize /nonexistent --text hi"), "/nonexistent");
  expect_one_line_error(run("perplexity " + demo() + " --text /nonexistent.txt"), "/nonexistent.txt");
  // --device cuda: runs where a GPU is; elsewhere one clear line (also for eval, which runs both models there).
  for (const std::string& cmd : {"generate " + demo() + " -p hi -n 2 --device cuda",
                                 "eval " + demo() + " --baseline " + demo() + " --max-windows 1 --device cuda --text " +
                                     test::shared_dir() + "/data/eval/docs-en.txt"}) {
    CmdResult r = run(cmd);
#ifdef LLMQ_HAVE_CUDA
    const bool gpu = !cuda::device_summary().empty();
#else
    const bool gpu = false;
#endif
    if (gpu) {
      EXPECT_EQ(r.code, 0) << r.err;
    } else {
      expect_one_line_error(r, "cuda");
    }
  }
  expect_one_line_error(run("generate " + demo() + " -p hi --top-p 0"), "top-p");

  TempModel m(demo());
  // a prompt longer than the context
  json cfg = test::load_json(m.dir + "/config.json");
  cfg["max_position_embeddings"] = 8;
  std::ofstream(m.dir + "/config.json") << cfg.dump();
  CmdResult long_prompt = run("generate " + m.dir + " -p 'one two three four five six seven eight nine ten'");
  expect_one_line_error(long_prompt, "context");
  EXPECT_EQ(long_prompt.out, "");  // refused before the prompt is echoed
  // a continuation longer than the context left: as many tokens as fit, and the reason said
  CmdResult fill = run("generate " + m.dir + " -p 'one two' -n 50 --json");
  ASSERT_EQ(fill.code, 0) << fill.err;
  json fj = json::parse(fill.out);
  EXPECT_EQ(fj["ids"].size() + fj["prompt_tokens"].get<size_t>(), 8u);
  EXPECT_TRUE(fj["stopped_at_context"]);
  EXPECT_FALSE(fj["stopped_at_eos"]);
  CmdResult fill_text = run("generate " + m.dir + " -p 'one two' -n 50");
  EXPECT_NE(fill_text.err.find("stopped at the model's context of 8 tokens"), std::string::npos) << fill_text.err;
  CmdResult fits = run("generate " + m.dir + " -p 'one two' -n 2 --json");
  ASSERT_EQ(fits.code, 0) << fits.err;
  EXPECT_EQ(json::parse(fits.out)["ids"].size(), 2u);
  EXPECT_FALSE(json::parse(fits.out)["stopped_at_context"]);
  // unknown architecture
  cfg["architectures"] = {"BertModel"};
  cfg["model_type"] = "bert";
  std::ofstream(m.dir + "/config.json") << cfg.dump();
  expect_one_line_error(run("info " + m.dir), "BertModel");
  // truncated weights
  cfg = test::load_json(demo() + "/config.json");
  std::ofstream(m.dir + "/config.json") << cfg.dump();
  ASSERT_EQ(truncate((m.dir + "/model.safetensors").c_str(), 1000000), 0);
  expect_one_line_error(run("info " + m.dir), "model.safetensors");
  ASSERT_EQ(truncate((m.dir + "/model.safetensors").c_str(), 4), 0);
  expect_one_line_error(run("generate " + m.dir + " -p hi"), "truncated");
  // a batch whose KV cache cannot fit the machine's memory: refused before anything is allocated
  expect_one_line_error(run("bench " + demo() + " --batch 1000000000 --prompt-len 4 --gen-len 2"), "memory available");
  // text shorter than one window
  std::ofstream(m.dir + "/short.txt") << "just a few words";
  expect_one_line_error(run("perplexity " + demo() + " --text " + m.dir + "/short.txt"), "fewer than one window");
}

TEST(Cli, QuantizeEvalInspectJson) {
  char tmpl[] = "/tmp/llmq-cliq-XXXXXX";
  const std::string d = mkdtemp(tmpl);
  const std::string c4 = test::shared_dir() + "/data/c4/c4_validation_2k.jsonl";
  CmdResult q = run("quantize " + demo() + " -o " + d + "/q --method int8-sq --calib " + c4 +
                    " --calib-samples 4 --calib-seq-len 128 --kv-cache int8 --lm-head int8 --json");
  ASSERT_EQ(q.code, 0) << q.err;
  json jq = json::parse(q.out);
  for (auto k : {"method", "seconds", "bytes_in", "bytes_out", "bits_per_weight"}) EXPECT_TRUE(jq.contains(k)) << k;
  EXPECT_EQ(jq["method"], "int8-sq");
  EXPECT_NE(q.err.find("calibrat"), std::string::npos) << "progress on stderr";
  CmdResult info = run("info " + d + "/q --json");
  ASSERT_EQ(info.code, 0) << info.err;
  EXPECT_EQ(json::parse(info.out)["quantization"]["method"], "int8-sq");
  EXPECT_EQ(json::parse(info.out)["quantization"]["lm_head"]["format"], "int8");
  EXPECT_EQ(json::parse(info.out)["params"], 6819072) << "a quantized model has as many parameters as its original";
  CmdResult e = run("eval " + d + "/q --baseline " + demo() + " --text " + test::shared_dir() +
                    "/data/eval/docs-en.txt --max-windows 2 --ctx 128 --per-layer --json");
  ASSERT_EQ(e.code, 0) << e.err;
  json je = json::parse(e.out);
  for (auto k : {"ppl", "baseline_ppl", "delta_ppl_pct", "mean_kld", "kld_p99", "top1_agreement", "rms_delta_p", "windows"})
    EXPECT_TRUE(je.contains(k)) << k;
  ASSERT_EQ(je["layers"].size(), 6u * 7u + 1u) << "every linear of the 6 layers, and the INT8 lm_head";
  EXPECT_GE(je["layers"][0]["rel_error"].get<double>(), je["layers"][42]["rel_error"].get<double>());
  EXPECT_EQ(std::count_if(je["layers"].begin(), je["layers"].end(), [](const json& l) { return l["name"] == "lm_head"; }), 1);
  CmdResult g = run("generate " + d + "/q -p 'def main():' -n 8 --json");
  ASSERT_EQ(g.code, 0) << g.err;
  CmdResult i = run("inspect " + demo() + " --calib " + c4 + " --calib-samples 2 --calib-seq-len 128 --json");
  ASSERT_EQ(i.code, 0) << i.err;
  json ji = json::parse(i.out);
  ASSERT_EQ(ji["layers"].size(), 6u * 7u);
  for (auto k : {"name", "act_absmax_max", "act_absmax_median", "outlier_ratio"}) EXPECT_TRUE(ji["layers"][0].contains(k)) << k;
  EXPECT_GE(ji["recommendations"].size(), 4u);
  for (const json& r : ji["recommendations"])  // each names a method quantize takes
    for (auto k : {"method", "alternative"})
      EXPECT_NE(std::find(quant::kMethods.begin(), quant::kMethods.end(), r[k].get<std::string>()), quant::kMethods.end())
          << r.dump();
  expect_one_line_error(run("quantize " + demo() + " -o " + d + "/q --method w8a16"), "already exists");
  EXPECT_EQ(run("quantize " + demo() + " -o " + d + "/z --method int3").code, 2);
  EXPECT_EQ(run("quantize " + demo() + " -o " + d + "/z --method w8a16 --lm-head int4").code, 2);
  [[maybe_unused]] int rc = std::system(("rm -rf " + d).c_str());
}

// Runs llmq with `args`, sends SIGINT once `file` exists in `out.tmp-<pid>` (the run is then writing its output),
// and checks that the run died of it leaving neither `out` nor its temporary directory `out.tmp-<pid>`.
void interrupt_and_check(const std::vector<std::string>& args, const std::string& out, const std::string& file) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int devnull = ::open("/dev/null", O_WRONLY);
    ::dup2(devnull, 1);
    ::dup2(devnull, 2);
    std::vector<char*> argv = {const_cast<char*>(LLMQ_BINARY)};
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(LLMQ_BINARY, argv.data());
    ::_exit(127);
  }
  const std::string tmp = out + ".tmp-" + std::to_string(pid);
  bool seen = false;
  for (int i = 0; i < 6000 && !seen; ++i) {  // up to 60 s for the calibration text to load or the weights to be made
    seen = file_exists(tmp + "/" + file);
    if (!seen) ::usleep(10000);
  }
  ::kill(pid, SIGINT);
  int st = 0;
  ASSERT_EQ(::waitpid(pid, &st, 0), pid);
  EXPECT_TRUE(seen) << "the temporary file " << file << " never appeared";
  EXPECT_TRUE(WIFSIGNALED(st) && WTERMSIG(st) == SIGINT) << "status " << st;
  EXPECT_FALSE(std::filesystem::exists(out));
  EXPECT_FALSE(std::filesystem::exists(tmp)) << "the temporary directory is left";
}

// Ctrl-C in the middle of a quantization: the process dies of SIGINT and leaves neither the target nor its
// temporary directory (whose safetensors is being written layer by layer at that point).
TEST(Cli, InterruptedQuantizeLeavesNothing) {
  char tmpl[] = "/tmp/llmq-cliint-XXXXXX";
  const std::string d = mkdtemp(tmpl);
  const std::string out = d + "/q", c4 = test::shared_dir() + "/data/c4/c4_validation_2k.jsonl";
  interrupt_and_check({"quantize", demo(), "-o", out, "--method", "w4a16-gptq", "--calib", c4}, out,
                      "model.safetensors.tmp");
  [[maybe_unused]] int rc = std::system(("rm -rf " + d).c_str());
}

// synth writes shards of up to 4 GiB: one layer of llama-2-7b is one shard of ~0.9 GB, interrupted while written.
TEST(Cli, InterruptedSynthLeavesNothing) {
  char tmpl[] = "/tmp/llmq-cliint-XXXXXX";
  const std::string d = mkdtemp(tmpl);
  const std::string out = d + "/s";
  interrupt_and_check({"synth", "--shape", "llama-2-7b", "--layers", "1", "-o", out}, out,
                      "model-00001-of-00001.safetensors.tmp");
  [[maybe_unused]] int rc = std::system(("rm -rf " + d).c_str());
}

TEST(Cli, SynthWritesALoadableDeterministicCheckpoint) {
  char tmpl[] = "/tmp/llmq-synth-XXXXXX";
  const std::string d = mkdtemp(tmpl);
  CmdResult r = run("synth --shape tiny -o " + d + "/a --seed 3 --tokenizer " + demo() + "/tokenizer.json --json");
  ASSERT_EQ(r.code, 0) << r.err;
  json j = json::parse(r.out);
  // tiny: vocab 8192, hidden 128, 2 layers, 4 heads of 32, 2 KV heads, intermediate 384, untied
  const int64_t per_layer = 2 * 128 + 128 * 128 * 2 + 2 * (64 * 128) + 3 * 128 * 384;
  EXPECT_EQ(j["params"].get<int64_t>(), 2 * 8192 * 128 + 128 + 2 * per_layer);
  EXPECT_EQ(j["bytes"].get<uint64_t>(), 2 * j["params"].get<uint64_t>());
  CmdResult info = run("info " + d + "/a --json");
  ASSERT_EQ(info.code, 0) << info.err;
  EXPECT_EQ(json::parse(info.out)["params"], j["params"]);
  // It runs, and quantizes (calibration needs the copied tokenizer).
  EXPECT_EQ(run("generate " + d + "/a -p hello -n 4").code, 0);
  EXPECT_EQ(run("quantize " + d + "/a -o " + d + "/q --method w4a16-rtn").code, 0);
  // Same seed, same bytes; another seed, other weights.
  ASSERT_EQ(run("synth --shape tiny -o " + d + "/b --seed 3").code, 0);
  ASSERT_EQ(run("synth --shape tiny -o " + d + "/c --seed 4").code, 0);
  const std::string f = "/model-00001-of-00001.safetensors";
  EXPECT_EQ(read_text_file(d + "/a" + f), read_text_file(d + "/b" + f));
  EXPECT_NE(read_text_file(d + "/a" + f), read_text_file(d + "/c" + f));
  // --layers keeps that many layers at full size: one layer of tiny is the embeddings and lm_head plus one.
  CmdResult one = run("synth --shape tiny -o " + d + "/l1 --layers 1 --json");
  ASSERT_EQ(one.code, 0) << one.err;
  EXPECT_EQ(json::parse(one.out)["params"].get<int64_t>(), 2 * 8192 * 128 + 128 + per_layer);
  EXPECT_EQ(json::parse(run("info " + d + "/l1 --json").out)["layers"], 1);
  // An existing directory is refused, an unknown shape is a usage error.
  expect_one_line_error(run("synth --shape tiny -o " + d + "/a"), "already exists");
  EXPECT_EQ(run("synth --shape gpt-5 -o " + d + "/x").code, 2);
  [[maybe_unused]] int rc = std::system(("rm -rf " + d).c_str());
}
