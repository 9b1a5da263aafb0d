// llmq command line: argument parsing and printing only; the work is in the library.
//
// Exit status: 0 success, 2 usage error, 1 any other error (one line `llmq: error: <what>` on stderr).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include "backend/cpu/kernels.hpp"
#include "bench/bench.hpp"
#include "eval/perplexity.hpp"
#include "io/mmap_file.hpp"
#include "model/llama.hpp"
#include "runtime/generate.hpp"
#include "tokenizer/tokenizer.hpp"

using json = nlohmann::json;
using namespace llmq;

namespace {

void print_json(const json& j) {
  std::cout << j.dump(2, ' ', false, json::error_handler_t::replace) << std::endl;
}

void check_device(const std::string& device) {
  if (device == "cuda")
    throw Error("--device cuda: this build of llmq has no CUDA backend yet; use --device cpu");
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
  gen->add_option("-n,--n-predict", gen_n, "Number of tokens to generate (default 64)")->check(CLI::NonNegativeNumber);
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
  ppl->add_option("--ctx", ppl_ctx, "Window length in tokens (default 512)")->check(CLI::PositiveNumber);
  ppl->add_option("--max-windows", ppl_max, "Evaluate only the first N windows (default all)");
  ppl->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  ppl->add_flag("--json", as_json, "Print one JSON object");

  // bench
  auto* bch = app.add_subcommand("bench", "Measure prefill and decode speed against the machine's roofline");
  std::string bench_model;
  BenchParams bp;
  bch->add_option("MODEL", bench_model, "Hugging Face model directory")->required();
  bch->add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  bch->add_option("--batch", bp.batch, "Sequences decoded together (default 1)")->check(CLI::PositiveNumber);
  bch->add_option("--prompt-len", bp.prompt_len, "Prompt tokens per sequence (default 128)")->check(CLI::PositiveNumber);
  bch->add_option("--gen-len", bp.gen_len, "Generated tokens per sequence (default 128)")->check(CLI::PositiveNumber);
  bch->add_option("--repeats", bp.repeats, "Timed runs after one warm-up; the median is reported (default 3)")
      ->check(CLI::PositiveNumber);
  bch->add_flag("--json", as_json, "Print one JSON object");

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
      check_device(device);
      Model m(gen_model);
      Tokenizer tok = Tokenizer::load(gen_model);
      std::vector<int32_t> prompt = tok.encode(gen_prompt, true);
      if (!as_json) {
        std::cout << gen_prompt << std::flush;
      }
      GenerateResult r = generate(m, tok, prompt, gen_n, sp, stop_ids_for(m, tok), [&](const std::string& s) {
        if (!as_json) std::cout << s << std::flush;
      });
      const double dec_tps = r.decode_seconds > 0 && r.decode_steps > 0 ? double(r.decode_steps) / r.decode_seconds : 0;
      if (as_json) {
        print_json({{"text", r.text}, {"ids", r.ids}, {"prompt_tokens", r.prompt_tokens},
                    {"decode_tokens_per_s", dec_tps}, {"prefill_tokens_per_s", double(r.prompt_tokens) / r.prefill_seconds},
                    {"stopped_at_eos", r.stopped_at_eos}});
      } else {
        std::cout << std::endl;
        std::fprintf(stderr, "llmq: %lld prompt tokens (%.1f tok/s), %zu generated (%.1f tok/s decode)%s\n",
                     (long long)r.prompt_tokens, double(r.prompt_tokens) / r.prefill_seconds, r.ids.size(), dec_tps,
                     r.stopped_at_eos ? ", stopped at EOS" : "");
      }
    } else if (*ppl) {
      check_device(device);
      Model m(ppl_model);
      Tokenizer tok = Tokenizer::load(ppl_model);
      std::string text = read_text_file(ppl_text);
      std::vector<int32_t> ids = tok.encode(text, false);
      const bool tty = isatty(2);
      PerplexityResult r = perplexity(m, ids, ppl_ctx, ppl_max, [&](int64_t done, int64_t total, double p) {
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
    } else if (*bch) {
      check_device(device);
      Model m(bench_model);
      BenchResult r = bench(m, bp);
      json j = {{"prefill_tokens_per_s", r.prefill_tokens_per_s}, {"decode_tokens_per_s", r.decode_tokens_per_s},
                {"ttft_ms", r.ttft_ms}, {"tpot_ms", r.tpot_ms}, {"weight_bytes", r.weight_bytes},
                {"achieved_gbps", r.achieved_gbps}, {"peak_gbps", r.peak_gbps}, {"roofline_pct", r.roofline_pct},
                {"prefill_gflops", r.prefill_gflops}, {"decode_gflops", r.decode_gflops}, {"peak_gflops", r.peak_gflops},
                {"prefill_pct_of_peak_flops", r.prefill_pct_of_peak}, {"device", r.device}, {"isa", r.isa},
                {"threads", r.threads}, {"batch", bp.batch}, {"prompt_len", bp.prompt_len}, {"gen_len", bp.gen_len},
                {"dtype", dtype_name(m.config().dtype)}};
      if (as_json) {
        print_json(j);
      } else {
        std::printf("device   %s\n", r.device.c_str());
        std::printf("prefill  %9.1f tok/s  %7.1f GFLOP/s  (%.0f%% of %.0f GFLOP/s FMA peak)  ttft %.1f ms\n",
                    r.prefill_tokens_per_s, r.prefill_gflops, r.prefill_pct_of_peak, r.peak_gflops, r.ttft_ms);
        std::printf("decode   %9.1f tok/s  %7.1f GB/s     (%.0f%% of %.1f GB/s read peak)  tpot %.2f ms\n",
                    r.decode_tokens_per_s, r.achieved_gbps, r.roofline_pct, r.peak_gbps, r.tpot_ms);
      }
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
