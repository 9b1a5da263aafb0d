// llmq command line: argument parsing and printing only; the work is in the library.
//
// Exit status: 0 success, 2 usage error, 1 any other error (one line `llmq: error: <what>` on stderr).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "backend/cpu/kernels.hpp"
#include "bench/bench.hpp"
#include "eval/compare.hpp"
#include "eval/perplexity.hpp"
#include "quant/calib/calib.hpp"
#include "quant/quantize.hpp"
#include "io/mmap_file.hpp"
#include "model/llama.hpp"
#include "model/synth.hpp"
#include "runtime/generate.hpp"
#include "tokenizer/tokenizer.hpp"

using json = nlohmann::json;
using namespace llmq;

namespace {

void print_json(const json& j) {
  std::cout << j.dump(2, ' ', false, json::error_handler_t::replace) << std::endl;
}

// Commands that do not run on the GPU yet say so instead of ignoring the flag.
void cpu_only(const std::string& device, const char* command) {
  if (device == "cuda")
    throw Error(std::string("--device cuda: `llmq ") + command + "` runs on the CPU in this version; use --device cpu");
}

const char* rope_name(RopeType t) {
  return t == RopeType::Linear ? "linear" : t == RopeType::Llama3 ? "llama3" : "default";
}

std::vector<int32_t> stop_ids_for(const Model& m, const Tokenizer& tok) {
  std::vector<int32_t> ids;
  for (int64_t e : m.config().eos_ids) ids.push_back(int32_t(e));
  if (tok.eos_id() >= 0) ids.push_back(tok.eos_id());
  return ids;
}

// CLI11's PositiveNumber and NonNegativeNumber reject a value with the range 0 .. DBL_MAX written out in full (over
// 300 digits); these say the same in words. The option's own type still rejects what is not a number.
CLI::Validator sign_check(bool zero_ok) {
  return CLI::Validator(
      [zero_ok](std::string& v) -> std::string {
        char* end = nullptr;
        const double x = std::strtod(v.c_str(), &end);
        if (end == v.c_str()) return {};  // not a number: the conversion to the option's type reports it
        if (zero_ok ? x >= 0 : x > 0) return {};
        return "Value " + v + (zero_ok ? " is negative" : " is not positive");
      },
      zero_ok ? "NONNEGATIVE" : "POSITIVE");
}
const CLI::Validator kPositive = sign_check(false);
const CLI::Validator kNonNegative = sign_check(true);

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"llmq: load, quantize, verify and run LLM checkpoints (Llama, Mistral, Qwen2) natively"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "llmq 0.1.0");
  bool as_json = false;

  // info
  auto* info = app.add_subcommand("info", "Print a model's architecture, sizes and storage");
  std::string info_model;
  info->add_option("MODEL", info_model, "Hugging Face model directory")->required();
  info->add_flag("--json", as_json, "Print one JSON object");

  // tokenize
  auto* tokc = app.add_subcommand("tokenize", "Tokenize text with a model's tokenizer.json");
  std::string tok_path, tok_text;
  bool tok_special = false;
  tokc->add_option("PATH", tok_path, "Model directory or tokenizer.json(.gz)")->required();
  tokc->add_option("--text", tok_text, "Text to tokenize")->required();
  tokc->add_flag("--add-special", tok_special, "Add the special tokens the post-processor defines (BOS for Llama)");
  tokc->add_flag("--json", as_json, "Print one JSON object");

  // generate
  auto* gen = app.add_subcommand("generate", "Generate text from a prompt, streaming it to stdout");
  std::string gen_model, gen_prompt, device = "cpu";
  int64_t gen_n = 64;
  SamplerParams sp;
  gen->add_option("MODEL", gen_model, "Hugging Face model directory")->required();
  gen->add_option("-p,--prompt", gen_prompt, "Prompt text")->required();
  gen->add_option("-n,--n-predict", gen_n, "Number of tokens to generate (default 64)")->check(kNonNegative);
  gen->add_option("--temp", sp.temperature, "Sampling temperature; 0 = greedy (default 0)");
  gen->add_option("--top-k", sp.top_k, "Keep the k most likely tokens; 0 = all (default 0)");
  gen->add_option("--top-p", sp.top_p, "Nucleus sampling mass in (0, 1] (default 1)");
  gen->add_option("--seed", sp.seed, "Random seed (default 0)");
  gen->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  gen->add_flag("--json", as_json, "Print one JSON object instead of streaming");

  // perplexity
  auto* ppl = app.add_subcommand("perplexity", "Perplexity of a text file (non-overlapping windows, no BOS)");
  std::string ppl_model, ppl_text;
  int64_t ppl_ctx = 512, ppl_max = 0;
  ppl->add_option("MODEL", ppl_model, "Hugging Face model directory")->required();
  ppl->add_option("--text", ppl_text, "Text file")->required();
  ppl->add_option("--ctx", ppl_ctx, "Window length in tokens (default 512)")->check(kPositive);
  ppl->add_option("--max-windows", ppl_max, "Evaluate only the first N windows (default all)");
  ppl->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  ppl->add_flag("--json", as_json, "Print one JSON object");

  // bench
  auto* bch = app.add_subcommand("bench", "Measure prefill and decode speed against the machine's roofline");
  std::string bench_model;
  BenchParams bp;
  bch->add_option("MODEL", bench_model, "Hugging Face model directory")->required();
  bch->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  std::string bench_batches;
  auto* bch_batch = bch->add_option("--batch", bp.batch, "Sequences decoded together (default 1)")->check(kPositive);
  bch->add_option("--batches", bench_batches,
                  "Several batch sizes, comma-separated (e.g. 1,16,64), measured one after another on the model "
                  "loaded once; with --json one object {\"runs\": [the keys above, per batch]}")
      ->excludes(bch_batch);
  bch->add_option("--prompt-len", bp.prompt_len, "Prompt tokens per sequence (default 128)")->check(kPositive);
  int64_t bench_prefill = 0;
  bch->add_option("--prefill-len", bench_prefill,
                  "Also one prefill of this many tokens (batch 1, 1 generated token) after the decode runs, on the model "
                  "loaded once; with --json the runs come as {\"runs\": [...]}, this one last")
      ->check(kPositive);
  bch->add_option("--gen-len", bp.gen_len, "Generated tokens per sequence (default 128)")->check(kPositive);
  bch->add_option("--repeats", bp.repeats, "Timed runs after one warm-up; the median is reported (default 3)")
      ->check(kPositive);
  bch->add_flag("--json", as_json, "Print one JSON object");

  // quantize
  auto* qz = app.add_subcommand("quantize", "Quantize a checkpoint (calibrating on your own text) into a new directory");
  std::string qz_model, qz_out, qz_kv = "none", qz_act = "dynamic", qz_head = "none";
  quant::QuantizeOptions qo;
  qz->add_option("MODEL", qz_model, "Hugging Face model directory (BF16/F16/F32)")->required();
  qz->add_option("-o,--output", qz_out, "Output directory (must not exist)")->required();
  qz->add_option("--method", qo.method,
                 "fp8: FP8 E4M3 weights and activations (FP8 tensor cores: Ada, Hopper and newer)\n"
                 "int8-sq: INT8 weights and activations after SmoothQuant (INT8 tensor cores: Ampere and newer)\n"
                 "w8a16: INT8 weights, 16-bit activations (near lossless, half of BF16's bytes)\n"
                 "w4a16-rtn | w4a16-awq | w4a16-gptq: INT4 weight groups, round-to-nearest / activation-aware\n"
                 "  scaling / GPTQ error feedback (a quarter of the bytes; GPTQ loses least)\n"
                 "All but w8a16 and w4a16-rtn calibrate on --calib; `llmq inspect MODEL --calib FILE` says which\n"
                 "method fits your GPU")
      ->required()
      ->check(CLI::IsMember(quant::kMethods));
  qz->add_option("--calib", qo.calib, "Calibration text: plain text or JSONL with a \"text\" field (use your own domain)");
  qz->add_option("--calib-samples", qo.calib_samples, "Calibration sequences (default 128)")->check(kPositive);
  qz->add_option("--calib-seq-len", qo.calib_seq_len, "Tokens per calibration sequence (default 512)")->check(CLI::Range(2, 1 << 20));
  qz->add_option("--group-size", qo.group_size, "INT4 group size (default 128)")->check(kPositive);
  qz->add_flag("--symmetric", qo.symmetric, "INT4: symmetric [-8, 7] instead of zero points");
  qz->add_option("--kv-cache", qz_kv, "KV-cache quantization: none | fp8 | int8 (default none)")
      ->check(CLI::IsMember({"none", "fp8", "int8"}));
  qz->add_option("--lm-head", qz_head,
                 "Output projection: none (kept as stored, default) | int8 (INT8 rows, per-row scales: half the bytes "
                 "a decoded token reads there; measure its cost with eval)")
      ->check(CLI::IsMember({"none", "int8"}));
  qz->add_option("--sq-alpha", qo.sq_alpha, "SmoothQuant migration strength in [0, 1]; 0 = no smoothing (default 0.5)");
  qz->add_option("--act-scale", qz_act, "int8-sq activations: dynamic (per token, default) | static (per tensor)")
      ->check(CLI::IsMember({"dynamic", "static"}));
  qz->add_flag("--act-order", qo.act_order, "GPTQ: quantize columns by descending Hessian diagonal");
  qz->add_option("--damp", qo.damp, "GPTQ: dampening added to the Hessian diagonal, relative to its mean (default 0.01)")
      ->check(CLI::Range(1e-6, 10.0));
  qz->add_option("--fp8-headroom", qo.fp8_headroom,
                 "fp8 activations and FP8 KV cache: static scales cover this many times the calibration absmax "
                 "(default 2: text unlike the calibration set does not saturate; 1 = plain absmax)");
  qz->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  qz->add_flag("--json", as_json, "Print one JSON object");

  // eval
  auto* ev = app.add_subcommand("eval", "Compare a (quantized) model with its baseline: perplexity, KLD, top-1");
  std::string ev_model, ev_base, ev_text;
  int64_t ev_ctx = 512, ev_max = 0;
  bool ev_per_layer = false;
  ev->add_option("MODEL", ev_model, "Model directory to evaluate")->required();
  ev->add_option("--baseline", ev_base, "The unquantized model directory")->required();
  ev->add_option("--text", ev_text, "Text file")->required();
  ev->add_option("--ctx", ev_ctx, "Window length in tokens (default 512)")->check(kPositive);
  ev->add_option("--max-windows", ev_max, "Evaluate only the first N windows (default all)");
  ev->add_flag("--per-layer", ev_per_layer, "Also each linear layer's own relative output error, worst first");
  ev->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  ev->add_flag("--json", as_json, "Print one JSON object");

  // inspect
  auto* ins = app.add_subcommand("inspect", "Activation statistics per linear layer, and which method fits which GPU");
  std::string ins_model, ins_calib;
  int64_t ins_samples = 16, ins_len = 512;
  ins->add_option("MODEL", ins_model, "Hugging Face model directory")->required();
  ins->add_option("--calib", ins_calib, "Text to run (plain or JSONL); your own domain")->required();
  ins->add_option("--calib-samples", ins_samples, "Sequences (default 16)")->check(kPositive);
  ins->add_option("--calib-seq-len", ins_len, "Tokens per sequence (default 512)")->check(CLI::Range(2, 1 << 20));
  ins->add_flag("--json", as_json, "Print one JSON object");

  // synth
  auto* syn = app.add_subcommand("synth", "Write a random-initialized BF16 checkpoint of a published model shape (benchmarks)");
  std::string syn_shape, syn_out, syn_tok;
  uint64_t syn_seed = 0;
  int64_t syn_layers = 0;
  std::vector<std::string> shape_names;
  for (auto& sh : synth_shapes()) shape_names.push_back(sh.name);
  syn->add_option("--shape", syn_shape, "llama-2-7b | llama-3-8b | mistral-7b | qwen2-7b | tiny")
      ->required()
      ->check(CLI::IsMember(shape_names));
  syn->add_option("-o,--output", syn_out, "Output directory (must not exist)")->required();
  syn->add_option("--seed", syn_seed, "Random seed (default 0)");
  syn->add_option("--layers", syn_layers, "Keep only this many decoder layers, every matrix at full size "
                                          "(quick per-kernel benchmarks; default: the shape's own count)");
  syn->add_option("--tokenizer", syn_tok, "A tokenizer.json to copy in, so that `quantize --calib` and `generate` "
                                          "work (its ids must fit the vocabulary; random weights give random text)");
  syn->add_flag("--json", as_json, "Print one JSON object");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }

  try {
    if (*info) {
      Model m(info_model);
      const ModelConfig& c = m.config();
      json j = {{"architecture", c.architecture}, {"model_type", c.model_type}, {"params", m.param_count()},
                {"layers", c.layers}, {"hidden", c.hidden}, {"intermediate", c.intermediate}, {"heads", c.heads},
                {"kv_heads", c.kv_heads}, {"head_dim", c.head_dim}, {"vocab", c.vocab},
                {"max_positions", c.max_positions}, {"dtype", dtype_name(c.dtype)}, {"weight_bytes", m.weight_bytes()},
                {"tied_embeddings", c.tie_embeddings}, {"rope_theta", c.rope_theta}, {"rope_type", rope_name(c.rope_type)},
                {"quantization", c.quantization.empty() ? json("none") : json::parse(c.quantization)}};
      if (as_json) {
        print_json(j);
      } else {
        for (auto& [k, v] : j.items()) std::printf("%-16s %s\n", k.c_str(), v.is_string() ? v.get<std::string>().c_str() : v.dump().c_str());
      }
    } else if (*tokc) {
      Tokenizer tok = Tokenizer::load(tok_path);
      std::vector<int32_t> ids = tok.encode(tok_text, tok_special);
      std::vector<std::string> toks;
      for (int32_t id : ids) toks.push_back(tok.token_str(id));
      if (as_json) {
        print_json({{"ids", ids}, {"tokens", toks}});
      } else {
        for (size_t i = 0; i < ids.size(); ++i) std::printf("%6d  %s\n", ids[i], json(toks[i]).dump(-1, ' ', false, json::error_handler_t::replace).c_str());
      }
    } else if (*gen) {
      Model m(gen_model);
      Tokenizer tok = Tokenizer::load(gen_model);
      auto engine = make_engine(m, device);
      std::vector<int32_t> prompt = tok.encode(gen_prompt, true);
      check_prompt(m.config(), prompt);  // before the prompt is echoed: an error prints nothing on stdout
      if (!as_json) {
        std::cout << gen_prompt << std::flush;
      }
      GenerateResult r = generate(*engine, tok, prompt, gen_n, sp, stop_ids_for(m, tok), [&](const std::string& s) {
        if (!as_json) std::cout << s << std::flush;
      });
      const double dec_tps = r.decode_seconds > 0 && r.decode_steps > 0 ? double(r.decode_steps) / r.decode_seconds : 0;
      if (as_json) {
        print_json({{"text", r.text}, {"ids", r.ids}, {"prompt_tokens", r.prompt_tokens},
                    {"decode_tokens_per_s", dec_tps}, {"prefill_tokens_per_s", double(r.prompt_tokens) / r.prefill_seconds},
                    {"stopped_at_eos", r.stopped_at_eos}, {"stopped_at_context", r.stopped_at_context}});
      } else {
        std::cout << std::endl;
        const std::string why = r.stopped_at_eos       ? ", stopped at EOS"
                                : r.stopped_at_context ? ", stopped at the model's context of " +
                                                             std::to_string(m.config().max_positions) + " tokens"
                                                       : "";
        std::fprintf(stderr, "llmq: %lld prompt tokens (%.1f tok/s), %zu generated (%.1f tok/s decode)%s\n",
                     (long long)r.prompt_tokens, double(r.prompt_tokens) / r.prefill_seconds, r.ids.size(), dec_tps,
                     why.c_str());
      }
    } else if (*ppl) {
      Model m(ppl_model);
      Tokenizer tok = Tokenizer::load(ppl_model);
      auto engine = make_engine(m, device);
      std::string text = read_text_file(ppl_text);
      std::vector<int32_t> ids = tok.encode(text, false);
      const bool tty = isatty(2);
      PerplexityResult r = perplexity(*engine, ids, ppl_ctx, ppl_max, [&](int64_t done, int64_t total, double p) {
        if (tty || done == total || done % 50 == 0)
          std::fprintf(stderr, "%sperplexity: window %lld/%lld, ppl %.4f%s", tty ? "\r" : "", (long long)done,
                       (long long)total, p, tty && done < total ? "" : "\n");
      });
      json j = {{"ppl", r.ppl}, {"mean_nll", r.mean_nll}, {"tokens", r.tokens}, {"windows", r.windows},
                {"predicted", r.predicted}, {"seconds", r.seconds}, {"ctx", ppl_ctx}};
      if (as_json) print_json(j);
      else
        std::printf("ppl %.4f  mean_nll %.6f  tokens %lld  windows %lld  predicted %lld  (%.1f s)\n", r.ppl, r.mean_nll,
                    (long long)r.tokens, (long long)r.windows, (long long)r.predicted, r.seconds);
    } else if (*qz) {
      cpu_only(device, "quantize");
      qo.kv = qz_kv == "fp8" ? KvFormat::Fp8 : qz_kv == "int8" ? KvFormat::Int8 : KvFormat::None;
      qo.act_static = qz_act == "static";
      qo.lm_head = qz_head == "int8" ? WeightFormat::Int8Channel : WeightFormat::Dense;
      quant::QuantizeReport r = quant::quantize_model(qz_model, qz_out, qo, [](const std::string& line) {
        std::fprintf(stderr, "quantize: %s\n", line.c_str());
      });
      for (auto& n : r.notes) std::fprintf(stderr, "quantize: note: %s\n", n.c_str());
      json j = {{"method", r.method}, {"seconds", r.seconds}, {"calib_seconds", r.calib_seconds},
                {"bytes_in", r.bytes_in}, {"bytes_out", r.bytes_out}, {"bits_per_weight", r.bits_per_weight},
                {"calib_samples", r.calib_samples}, {"calib_tokens", r.calib_tokens}, {"notes", r.notes},
                {"output", qz_out}, {"kv_cache", qz_kv}, {"lm_head", qz_head}};
      if (as_json) print_json(j);
      else
        std::printf("%s: %s -> %s  %.1f MB -> %.1f MB, %.2f bits per quantized weight, %.1f s\n", r.method.c_str(),
                    qz_model.c_str(), qz_out.c_str(), double(r.bytes_in) / 1e6, double(r.bytes_out) / 1e6,
                    r.bits_per_weight, r.seconds);
    } else if (*ev) {
      Model m(ev_model);
      Model base(ev_base);
      Tokenizer tok = Tokenizer::load(ev_base);
      std::vector<int32_t> ids = tok.encode(read_text_file(ev_text), false);
      const bool tty = isatty(2);
      CompareResult r = compare(m, base, ids, ev_ctx, ev_max, ev_per_layer, [&](int64_t done, int64_t total) {
        if (tty || done == total || done % 16 == 0)
          std::fprintf(stderr, "%seval: window %lld/%lld%s", tty ? "\r" : "", (long long)done, (long long)total,
                       tty && done < total ? "" : "\n");
      }, device);
      json layers = json::array();
      for (auto& l : r.layers) layers.push_back({{"name", l.name}, {"rel_error", l.rel_error}});
      json j = {{"ppl", r.ppl}, {"baseline_ppl", r.baseline_ppl}, {"delta_ppl_pct", r.delta_ppl_pct},
                {"mean_kld", r.mean_kld}, {"kld_p99", r.kld_p99}, {"top1_agreement", r.top1_agreement},
                {"rms_delta_p", r.rms_delta_p}, {"windows", r.windows}, {"predicted", r.predicted},
                {"seconds", r.seconds}};
      if (ev_per_layer) j["layers"] = layers;
      if (as_json) {
        print_json(j);
      } else {
        std::printf("ppl %.4f (baseline %.4f, %+.3f%%)  mean KLD %.5f  KLD p99 %.5f  top-1 %.2f%%  RMS delta-p %.4f  (%lld windows)\n",
                    r.ppl, r.baseline_ppl, r.delta_ppl_pct, r.mean_kld, r.kld_p99, 100 * r.top1_agreement, r.rms_delta_p,
                    (long long)r.windows);
        for (auto& l : r.layers) std::printf("  %-40s %.5f\n", l.name.c_str(), l.rel_error);
      }
    } else if (*ins) {
      Model m(ins_model);
      Tokenizer tok = Tokenizer::load(ins_model);
      int64_t found = 0;
      auto samples = quant::load_calibration(ins_calib, tok, ins_samples, ins_len, &found);
      quant::CalibStats st = quant::calibrate(m, samples, false, nullptr);
      json layers = json::array();
      double worst = 0;
      for (int64_t l = 0; l < m.config().layers; ++l)
        for (int s = 0; s < kNumSites; ++s) {
          const quant::SiteStats& ss = st.sites[size_t(l)][size_t(s)];
          std::vector<float> sorted = ss.absmax;
          std::nth_element(sorted.begin(), sorted.begin() + int64_t(sorted.size() / 2), sorted.end());
          const float med = sorted[sorted.size() / 2], mx = ss.tensor_absmax();
          const double ratio = med > 0 ? mx / med : 0;
          worst = std::max(worst, ratio);
          std::vector<int64_t> outliers;
          for (size_t j = 0; j < ss.absmax.size(); ++j)
            if (ss.absmax[j] > 8 * med) outliers.push_back(int64_t(j));
          for (const std::string& n : site_linear_names(Site(s)))
            layers.push_back({{"name", "model.layers." + std::to_string(l) + "." + n}, {"act_absmax_max", mx},
                              {"act_absmax_median", med}, {"outlier_ratio", ratio}, {"outlier_channels", outliers}});
        }
      const bool strong = worst > 20;
      const std::string outlier_note = strong ? "strong activation outliers (max/median " + std::to_string(int(worst)) +
                                                    "x): per-tensor INT8 activations need SmoothQuant (int8-sq)"
                                              : "moderate activation outliers (max/median " + std::to_string(int(worst)) + "x)";
      // The INT4 pick is GPTQ: on llama-27m it lost least of the INT4 methods both on text like its calibration
      // (C4: +0.51% ppl against AWQ's +1.22% and RTN's +2.59%) and on other text (docs-en: +1.34-1.51% against
      // +1.76% and +1.87%); bench/results/2026-12-01-awq-variants-llama-27m.txt. FP8 and INT8 W8A8 run at the same
      // tensor-core rate on Hopper; int8-sq measured closer to BF16 there (+0.14% against fp8's +0.37%) but needs
      // its smoothing and per-token scales, where FP8's range takes the outliers as they are.
      json rec = json::array({
          {{"gpu", "Hopper (H100, H200, GH200)"}, {"sm", "90"}, {"method", "fp8"}, {"alternative", "w4a16-gptq"},
           {"why", "FP8 tensor cores: W8A8 at twice the BF16 GEMM rate, activation outliers within FP8's range "
                   "without smoothing (int8-sq runs at the same rate); INT4 weight-only reads a quarter of the bytes, "
                   "the fastest for small-batch decode, which is bandwidth-bound"}},
          {{"gpu", "Blackwell (B200, GB200; RTX 50xx)"}, {"sm", "100/120"}, {"method", "fp8"}, {"alternative", "w4a16-gptq"},
           {"why", "FP8 tensor cores (FP4 is not produced by llmq yet)"}},
          {{"gpu", "Ada datacenter (L4, L40S)"}, {"sm", "89"}, {"method", "fp8"}, {"alternative", "w4a16-gptq"},
           {"why", "FP8 tensor cores; L4's low bandwidth favours INT4 weights for decode"}},
          {{"gpu", "Ada consumer (RTX 40xx)"}, {"sm", "89"}, {"method", "w4a16-gptq"}, {"alternative", "fp8"},
           {"why", "memory is the limit: INT4 weights fit bigger models; FP8 runs too"}},
          {{"gpu", "Ampere datacenter (A100, A10, A30)"}, {"sm", "80/86"}, {"method", "int8-sq"},
           {"alternative", "w4a16-gptq"}, {"why", "no FP8 tensor cores: INT8 W8A8 (IMMA) with SmoothQuant for throughput; "
                                                  + outlier_note}},
          {{"gpu", "Ampere/Turing consumer (RTX 30xx, 20xx)"}, {"sm", "75/86"}, {"method", "w4a16-gptq"},
           {"alternative", "w8a16"}, {"why", "no FP8; INT4 weight-only keeps decode fast and the model small"}}});
      json j = {{"layers", layers}, {"recommendations", rec}, {"max_outlier_ratio", worst}, {"samples", samples.size()},
                {"tokens", st.tokens}};
      if (as_json) {
        print_json(j);
      } else {
        std::printf("%-40s %10s %10s %8s  outlier channels\n", "linear", "absmax", "median", "ratio");
        for (auto& l : layers) {
          std::string oc;
          for (auto& o : l["outlier_channels"]) oc += (oc.empty() ? "" : ",") + o.dump();
          if (oc.size() > 40) oc = oc.substr(0, 37) + "...";
          std::printf("%-40s %10.3f %10.3f %8.1f  %s\n", l["name"].get<std::string>().c_str(), l["act_absmax_max"].get<double>(),
                      l["act_absmax_median"].get<double>(), l["outlier_ratio"].get<double>(), oc.c_str());
        }
        std::printf("\n%s\n", outlier_note.c_str());
        for (auto& r : rec)
          std::printf("%-36s -> %-10s (or %s): %s\n", r["gpu"].get<std::string>().c_str(), r["method"].get<std::string>().c_str(),
                      r["alternative"].get<std::string>().c_str(), r["why"].get<std::string>().c_str());
      }
    } else if (*syn) {
      SynthResult r = synth_model(syn_shape, syn_out, syn_seed, syn_tok, [](const std::string& line) {
        std::fprintf(stderr, "synth: %s\n", line.c_str());
      }, syn_layers);
      if (as_json) print_json({{"params", r.params}, {"bytes", r.bytes}, {"shape", syn_shape}, {"output", syn_out}});
      else std::printf("%s: %s, %lld parameters, %.3f GB\n", syn_shape.c_str(), syn_out.c_str(), (long long)r.params,
                       double(r.bytes) / 1e9);
    } else if (*bch) {
      std::vector<int64_t> batches = {bp.batch};
      std::string bad;
      if (!bench_batches.empty() && !parse_positive_list(bench_batches, batches, &bad)) {
        std::fprintf(stderr, "llmq bench: --batches: '%s' is not a positive batch size\n", bad.c_str());
        return 2;
      }
      // Each run: batch, prompt, generated tokens.
      std::vector<BenchParams> plan;
      for (int64_t b : batches) {
        BenchParams q = bp;
        q.batch = b;
        plan.push_back(q);
      }
      if (bench_prefill > 0) {
        BenchParams q = bp;
        q.batch = 1, q.prompt_len = bench_prefill, q.gen_len = 1;
        plan.push_back(q);
      }
      const bool listed = !bench_batches.empty() || bench_prefill > 0;  // several runs: "runs" and a heading each
      Model m(bench_model);
      auto engine = make_engine(m, device);
      json runs = json::array();
      for (const BenchParams& q : plan) {
        BenchResult r = bench(*engine, q);
        json j = {{"prefill_tokens_per_s", r.prefill_tokens_per_s}, {"decode_tokens_per_s", r.decode_tokens_per_s},
                  {"ttft_ms", r.ttft_ms}, {"tpot_ms", r.tpot_ms}, {"weight_bytes", r.weight_bytes},
                  {"achieved_gbps", r.achieved_gbps}, {"peak_gbps", r.peak_gbps}, {"roofline_pct", r.roofline_pct},
                  {"prefill_gflops", r.prefill_gflops}, {"decode_gflops", r.decode_gflops}, {"peak_gflops", r.peak_gflops},
                  {"prefill_pct_of_peak_flops", r.prefill_pct_of_peak}, {"device", r.device}, {"isa", r.isa},
                  {"threads", r.threads}, {"batch", q.batch}, {"prompt_len", q.prompt_len}, {"gen_len", q.gen_len},
                  {"dtype", dtype_name(m.config().dtype)},
                  {"peak_memory_bytes", r.peak_memory_bytes}, {"bytes_per_token", m.bytes_per_token()},
                  {"method", m.quant().method.empty() ? std::string(dtype_name(m.config().dtype)) : m.quant().method}};
        if (as_json) {
          if (!listed) print_json(j);
          else runs.push_back(j);
        } else {
          if (listed)
            std::printf("batch    %lld, prompt %lld, generated %lld\n", (long long)q.batch, (long long)q.prompt_len,
                        (long long)q.gen_len);
          std::printf("device   %s\n", r.device.c_str());
          std::printf("prefill  %9.1f tok/s  %7.1f GFLOP/s  (%.0f%% of %.0f GFLOP/s FMA peak)  ttft %.1f ms\n",
                      r.prefill_tokens_per_s, r.prefill_gflops, r.prefill_pct_of_peak, r.peak_gflops, r.ttft_ms);
          std::printf("decode   %9.1f tok/s  %7.1f GB/s     (%.0f%% of %.1f GB/s read peak)  tpot %.2f ms\n",
                      r.decode_tokens_per_s, r.achieved_gbps, r.roofline_pct, r.peak_gbps, r.tpot_ms);
        }
      }
      if (as_json && listed) print_json({{"runs", runs}});
    }
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::string msg = e.what();
    for (char& ch : msg)
      if (ch == '\n') ch = ' ';
    std::fprintf(stderr, "llmq: error: %s\n", msg.c_str());
    return 1;
  }
  return 0;
}
