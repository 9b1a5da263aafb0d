// Tokenizer conformance: every vector whose tokenizer is in shared/models must match with zero mismatches,
// and decoding must give back the text.
#include <fstream>
#include <map>
#include <sstream>
#include <unistd.h>

#include "test_util.hpp"
#include "tokenizer/tokenizer.hpp"

using namespace llmq;
using nlohmann::json;

namespace {

std::string models() { return test::shared_dir() + "/models/"; }
std::string vectors() { return test::shared_dir() + "/data/tokenizer-vectors/"; }

// llama.cpp's test-tokenizer-0 format: inputs separated by "\n__ggml_vocab_test__\n"; outputs one line each.
std::vector<std::pair<std::string, std::vector<int32_t>>> load_ggml_vectors(const std::string& name) {
  std::string inp = read_text_file(vectors() + "ggml-vocab-" + name + ".gguf.inp");
  std::string out = read_text_file(vectors() + "ggml-vocab-" + name + ".gguf.out");
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  size_t pos = 0, hit;
  while ((hit = inp.find(sep, pos)) != std::string::npos) {
    texts.push_back(inp.substr(pos, hit - pos));
    pos = hit + sep.size();
  }
  std::vector<std::pair<std::string, std::vector<int32_t>>> v;
  std::istringstream lines(out);
  std::string line;
  for (auto& t : texts) {
    std::getline(lines, line);
    std::istringstream ids(line);
    std::vector<int32_t> want;
    int32_t id;
    while (ids >> id) want.push_back(id);
    v.push_back({t, want});
  }
  return v;
}

// Returns the number of mismatching cases and reports the first few.
int check_all(const Tokenizer& tok, const std::vector<std::pair<std::string, std::vector<int32_t>>>& cases,
              bool add_special, bool check_decode = true) {
  int bad = 0;
  for (auto& [text, want] : cases) {
    auto got = tok.encode(text, add_special);
    if (got != want) {
      if (++bad <= 5) {
        std::string g, w;
        for (auto i : got) g += " " + std::to_string(i);
        for (auto i : want) w += " " + std::to_string(i);
        ADD_FAILURE() << "text " << json(text).dump() << "\n got:" << g << "\nwant:" << w;
      }
    } else if (check_decode && tok.decode(tok.encode(text, false)) != text) {
      // Decoding may legitimately differ only by the leading space a SentencePiece decoder strips.
      std::string d = tok.decode(tok.encode(text, false));
      if (!(tok.strips_leading_space() && !text.empty() && text[0] == ' ' && " " + d == text)) {
        ++bad;
        ADD_FAILURE() << "decode " << json(text).dump() << " -> " << json(d).dump(-1, ' ', false, json::error_handler_t::replace);
      }
    }
  }
  return bad;
}

// swift-transformers multilingual conformance: the shared inputs with one model's expected ids.
std::vector<std::pair<std::string, std::vector<int32_t>>> load_multilingual(const std::string& baseline, json* entries) {
  json inputs = test::load_json(vectors() + "swift-transformers/multilingual/inputs.json");
  json base = test::load_json(vectors() + "swift-transformers/multilingual/" + baseline);
  std::map<std::string, std::string> text_of;
  for (auto& i : inputs) text_of[i["id"]] = i["text"];
  std::vector<std::pair<std::string, std::vector<int32_t>>> cases;
  for (auto& e : base["entries"]) cases.push_back({text_of.at(e["id"]), e["input_ids"].get<std::vector<int32_t>>()});
  if (entries) *entries = base["entries"];
  return cases;
}

}  // namespace

TEST(Tokenizer, LlamaCppVectorsLlamaSpm) {
  Tokenizer tok = Tokenizer::load(models() + "llama2-tokenizer");
  auto v = load_ggml_vectors("llama-spm");
  ASSERT_EQ(v.size(), 46u);
  EXPECT_EQ(check_all(tok, v, false), 0);
}

TEST(Tokenizer, LlamaCppVectorsPhi3) {
  Tokenizer tok = Tokenizer::load(models() + "phi-3-mini-tokenizer");
  EXPECT_EQ(check_all(tok, load_ggml_vectors("phi-3"), false), 0);
}

TEST(Tokenizer, LlamaCppVectorsQwen2) {
  Tokenizer tok = Tokenizer::load(models() + "qwen3-tokenizer");
  auto v = load_ggml_vectors("qwen2");
  ASSERT_EQ(v.size(), 46u);
  EXPECT_EQ(check_all(tok, v, false), 0);
  EXPECT_EQ(check_all(tok, load_ggml_vectors("deepseek-r1-qwen"), false), 0);
}

TEST(Tokenizer, SwiftMultilingualQwen25) {
  Tokenizer tok = Tokenizer::load(models() + "qwen3-tokenizer");
  auto cases = load_multilingual("qwen2_5_multilingual.json", nullptr);
  ASSERT_EQ(cases.size(), 83u);
  EXPECT_EQ(check_all(tok, cases, true), 0);
}

TEST(Tokenizer, SwiftMultilingualTinyLlama) {
  Tokenizer tok = Tokenizer::load(models() + "llama2-tokenizer");
  json entries;
  auto cases = load_multilingual("tinyllama_multilingual.json", &entries);
  ASSERT_EQ(cases.size(), 83u);
  EXPECT_EQ(check_all(tok, cases, true), 0);
  // The token strings agree too.
  int bad = 0;
  for (auto& e : entries) {
    auto ids = e["input_ids"].get<std::vector<int32_t>>();
    auto toks = e["tokens"].get<std::vector<std::string>>();
    for (size_t i = 0; i < ids.size(); ++i) bad += tok.token_str(ids[i]) != toks[i];
  }
  EXPECT_EQ(bad, 0);
}

TEST(Tokenizer, SwiftLlama2LongText) {
  Tokenizer tok = Tokenizer::load(models() + "llama2-tokenizer");
  json j = test::load_json(vectors() + "swift-transformers/llama_encoded.json");
  std::vector<std::pair<std::string, std::vector<int32_t>>> cases = {
      {j["text"].get<std::string>(), j["token_ids"].get<std::vector<int32_t>>()}};
  EXPECT_EQ(check_all(tok, cases, true, false), 0);
}

TEST(Tokenizer, ReferenceJsonVectorsOfEveryModel) {
  for (const std::string& dir : test::reference_models()) {
    json ref = test::load_json(dir + "/reference.json");
    if (!ref.contains("tokenizer_vectors")) continue;
    Tokenizer tok = Tokenizer::load(dir);
    std::vector<std::pair<std::string, std::vector<int32_t>>> plain, with_bos;
    for (auto& v : ref["tokenizer_vectors"]) {
      plain.push_back({v["text"], v["ids"].get<std::vector<int32_t>>()});
      with_bos.push_back({v["text"], v["ids_with_bos"].get<std::vector<int32_t>>()});
    }
    SCOPED_TRACE(dir);
    EXPECT_GT(plain.size(), 5u);
    EXPECT_EQ(check_all(tok, plain, false), 0);
    EXPECT_EQ(check_all(tok, with_bos, true), 0);
  }
}

TEST(Tokenizer, SpecialTokensInTextAndBosEos) {
  Tokenizer tok = Tokenizer::load(models() + "llama-27m");
  EXPECT_EQ(tok.bos_id(), 0);
  EXPECT_EQ(tok.eos_id(), 1);
  auto ids = tok.encode("a<|end_of_text|>b", false);
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[1], 1);
  EXPECT_TRUE(tok.is_special(1));
  EXPECT_EQ(tok.decode(ids, true), "ab");
  EXPECT_EQ(tok.decode(ids, false), "a<|end_of_text|>b");
  Tokenizer l2 = Tokenizer::load(models() + "llama2-tokenizer");
  EXPECT_EQ(l2.bos_id(), 1);
  EXPECT_EQ(l2.eos_id(), 2);
  EXPECT_EQ(l2.encode("Hello", true).front(), 1);
}

// Streaming decode never emits a partial UTF-8 character and concatenates to the full decode.
TEST(Tokenizer, StreamingNeverSplitsUtf8) {
  for (const std::string name : {"llama2-tokenizer", "qwen3-tokenizer", "llama-27m"}) {
    Tokenizer tok = Tokenizer::load(models() + name);
    const std::string text = "Grüße, 世界! 🎉 naïve — ПРИВЕТ 👩‍👩‍👧 ok";
    auto ids = tok.encode(text, false);
    StreamDecoder sd(tok);
    std::string joined;
    for (int32_t id : ids) {
      std::string piece = sd.push(id);
      EXPECT_EQ(utf8_complete_prefix(piece), piece.size()) << name;
      // every emitted piece is itself complete UTF-8: no lead byte without its continuation bytes
      size_t i = 0;
      while (i < piece.size()) {
        unsigned char c = static_cast<unsigned char>(piece[i]);
        size_t n = c < 0x80 ? 1 : (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : 4;
        ASSERT_LE(i + n, piece.size()) << name << ": split character";
        i += n;
      }
      joined += piece;
    }
    joined += sd.finish();
    EXPECT_EQ(joined, tok.decode(ids)) << name;
    EXPECT_EQ(joined, text) << name;
  }
}

TEST(Tokenizer, Utf8CompletePrefix) {
  EXPECT_EQ(utf8_complete_prefix("abc"), 3u);
  EXPECT_EQ(utf8_complete_prefix("ab\xE4\xB8"), 2u);      // first two bytes of 世
  EXPECT_EQ(utf8_complete_prefix("ab\xE4\xB8\x96"), 5u);  // whole
  EXPECT_EQ(utf8_complete_prefix("\xF0\x9F"), 0u);
  EXPECT_EQ(utf8_complete_prefix("\xE4" "a"), 2u);         // invalid: passes through
}

TEST(Tokenizer, BadFilesGiveClearErrors) {
  EXPECT_THROW(Tokenizer::load("/nonexistent/tokenizer.json"), Error);
  char tmpl[] = "/tmp/llmq-tok-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string d = tmpl;
  auto write = [&](const std::string& s) { std::ofstream(d + "/tokenizer.json") << s; };
  write("{not json");
  try {
    Tokenizer::load(d);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json"), std::string::npos) << e.what();
  }
  write(R"({"model": {"type": "Unigram", "vocab": []}})");
  try {
    Tokenizer::load(d);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Unigram"), std::string::npos) << e.what();
  }
  std::remove((d + "/tokenizer.json").c_str());
  rmdir(tmpl);
}
