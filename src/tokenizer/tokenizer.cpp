#include "tokenizer/tokenizer.hpp"

#include <pcre2.h>
#include <utf8proc.h>
#include <zlib.h>

#include <algorithm>
#include <functional>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "common.hpp"
#include "io/mmap_file.hpp"

namespace llmq {

using json = nlohmann::json;

namespace {

const std::string kMetaspace = "\xE2\x96\x81";  // U+2581 "▁"

// ---- UTF-8 helpers --------------------------------------------------------------------------------

// Length of the UTF-8 sequence starting with byte c (1 for invalid lead bytes).
size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) return 2;
  if ((c & 0xF0) == 0xE0) return 3;
  if ((c & 0xF8) == 0xF0) return 4;
  return 1;
}

std::string codepoint_to_utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += char(cp);
  } else if (cp < 0x800) {
    s += char(0xC0 | (cp >> 6));
    s += char(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    s += char(0xE0 | (cp >> 12));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  } else {
    s += char(0xF0 | (cp >> 18));
    s += char(0x80 | ((cp >> 12) & 0x3F));
    s += char(0x80 | ((cp >> 6) & 0x3F));
    s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

// GPT-2's reversible byte <-> printable-codepoint map used by byte-level BPE.
struct ByteMap {
  std::string byte_to_str[256];
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  ByteMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      uint32_t cp = printable ? uint32_t(b) : uint32_t(256 + n++);
      byte_to_str[b] = codepoint_to_utf8(cp);
      cp_to_byte[cp] = uint8_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  if (from.empty()) return s;
  std::string out;
  size_t pos = 0, hit;
  while ((hit = s.find(from, pos)) != std::string::npos) {
    out.append(s, pos, hit - pos);
    out += to;
    pos = hit + from.size();
  }
  out.append(s, pos, std::string::npos);
  return out;
}

bool is_ascii_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

std::string read_maybe_gzip(const std::string& path) {
  if (path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0) {
    gzFile f = gzopen(path.c_str(), "rb");
    if (!f) throw Error(path + ": cannot open");
    std::string out;
    char buf[1 << 16];
    int n;
    while ((n = gzread(f, buf, sizeof buf)) > 0) out.append(buf, size_t(n));
    int err = 0;
    const char* msg = gzerror(f, &err);
    gzclose(f);
    if (n < 0 || (err != Z_OK && err != Z_STREAM_END)) throw Error(path + ": corrupt gzip data: " + msg);
    return out;
  }
  return read_text_file(path);
}

// ---- Regex (PCRE2, Unicode classes) -----------------------------------------------------------------

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.c_str()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &err, &off, nullptr);
    if (!code_) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw Error(where + ": cannot compile pre-tokenizer regex: " + reinterpret_cast<char*>(msg));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter if JIT is unavailable
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls f(begin, end, matched) for the matched spans and the gaps between them, in order.
  template <class F>
  void split(std::string_view s, F&& f) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t pos = 0, last = 0;
    while (pos <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos, 0, md, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step one character
        pos = b + (b < s.size() ? utf8_len(static_cast<unsigned char>(s[b])) : 1);
        continue;
      }
      if (b > last) f(last, b, false);
      f(b, e, true);
      last = pos = e;
    }
    if (last < s.size()) f(last, s.size(), false);
    pcre2_match_data_free(md);
  }

 private:
  pcre2_code* code_ = nullptr;
};

const char* kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- Normalizers ----------------------------------------------------------------------------------

struct Normalizer {
  enum Kind { NFC, NFD, NFKC, NFKD, Prepend, Replace, Lowercase } kind;
  std::string a, b;  // Prepend: a; Replace: a -> b

  std::string apply(std::string s) const {
    switch (kind) {
      case Prepend: return s.empty() ? s : a + s;
      case Replace: return replace_all(std::move(s), a, b);
      case Lowercase: {
        std::string out;
        utf8proc_int32_t cp;
        for (size_t i = 0; i < s.size();) {
          utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                                utf8proc_ssize_t(s.size() - i), &cp);
          if (n <= 0) {
            out += s[i++];
            continue;
          }
          out += codepoint_to_utf8(uint32_t(utf8proc_tolower(cp)));
          i += size_t(n);
        }
        return out;
      }
      default: {
        int opts = UTF8PROC_STABLE | (kind == NFC || kind == NFKC ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                   (kind == NFKC || kind == NFKD ? UTF8PROC_COMPAT : 0);
        utf8proc_uint8_t* out = nullptr;
        utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          utf8proc_ssize_t(s.size()), &out, utf8proc_option_t(opts));
        if (n < 0) return s;  // invalid UTF-8: leave the bytes alone; byte-level BPE still encodes them
        std::string r(reinterpret_cast<char*>(out), size_t(n));
        free(out);
        return r;
      }
    }
  }
};

// ---- Pre-tokenizers -------------------------------------------------------------------------------

struct PreTokenizer {
  enum Kind { Split, ByteLevel, Metaspace } kind;
  std::shared_ptr<Regex> regex;    // Split (regex pattern) or ByteLevel with use_regex
  std::string literal;             // Split with a String pattern
  enum Behavior { Isolated, Removed, MergedWithPrevious, MergedWithNext } behavior = Isolated;
  bool invert = false;
  bool add_prefix_space = false;   // ByteLevel
  std::string replacement;         // Metaspace
  enum Prepend { Always, Never, First } prepend = Always;
  bool split = true;               // Metaspace

  // Splits each piece further. first_segment: the piece list comes from the start of the input text.
  void apply(std::vector<std::string>& pieces, bool first_segment) const {
    std::vector<std::string> out;
    for (size_t pi = 0; pi < pieces.size(); ++pi) {
      const std::string& p = pieces[pi];
      switch (kind) {
        case Split: split_piece(p, out); break;
        case ByteLevel: {
          std::vector<std::string> parts;
          std::string src = (add_prefix_space && !p.empty() && p[0] != ' ') ? " " + p : p;
          if (regex) split_with_regex(*regex, Isolated, false, src, parts);
          else parts.push_back(src);
          const ByteMap& bm = byte_map();
          for (auto& part : parts) {
            std::string mapped;
            for (unsigned char c : part) mapped += bm.byte_to_str[c];
            out.push_back(std::move(mapped));
          }
          break;
        }
        case Metaspace: {
          std::string s = replace_all(p, " ", replacement);
          bool pre = prepend == Always || (prepend == First && first_segment && pi == 0);
          if (pre && s.compare(0, replacement.size(), replacement) != 0) s = replacement + s;
          if (!split) {
            out.push_back(std::move(s));
          } else {  // split before every replacement char, which stays with what follows
            size_t start = 0, hit;
            while ((hit = s.find(replacement, start + 1)) != std::string::npos && start < s.size()) {
              out.push_back(s.substr(start, hit - start));
              start = hit;
            }
            if (start < s.size()) out.push_back(s.substr(start));
          }
          break;
        }
      }
    }
    pieces.swap(out);
  }

  void split_piece(const std::string& p, std::vector<std::string>& out) const {
    if (regex) {
      split_with_regex(*regex, behavior, invert, p, out);
      return;
    }
    // literal pattern: mark occurrences as matches
    std::vector<std::pair<std::pair<size_t, size_t>, bool>> spans;
    size_t pos = 0, hit;
    while (!literal.empty() && (hit = p.find(literal, pos)) != std::string::npos) {
      if (hit > pos) spans.push_back({{pos, hit}, false});
      spans.push_back({{hit, hit + literal.size()}, true});
      pos = hit + literal.size();
    }
    if (pos < p.size()) spans.push_back({{pos, p.size()}, false});
    emit(spans, behavior, invert, p, out);
  }

  static void split_with_regex(const Regex& re, Behavior behavior, bool invert, const std::string& p,
                               std::vector<std::string>& out) {
    std::vector<std::pair<std::pair<size_t, size_t>, bool>> spans;
    re.split(p, [&](size_t b, size_t e, bool m) { spans.push_back({{b, e}, m}); });
    emit(spans, behavior, invert, p, out);
  }

  static void emit(const std::vector<std::pair<std::pair<size_t, size_t>, bool>>& spans, Behavior behavior,
                   bool invert, const std::string& p, std::vector<std::string>& out) {
    std::string carry;
    for (size_t i = 0; i < spans.size(); ++i) {
      auto [range, matched] = spans[i];
      if (invert) matched = !matched;
      std::string s = p.substr(range.first, range.second - range.first);
      switch (behavior) {
        case Isolated: out.push_back(std::move(s)); break;
        case Removed:
          if (!matched) out.push_back(std::move(s));
          break;
        case MergedWithPrevious:
          if (matched && !out.empty()) out.back() += s;
          else out.push_back(std::move(s));
          break;
        case MergedWithNext:
          if (matched) carry += s;
          else {
            out.push_back(carry + s);
            carry.clear();
          }
          break;
      }
    }
    if (!carry.empty()) out.push_back(std::move(carry));
  }
};

// ---- Decoders -------------------------------------------------------------------------------------

struct DecodeStep {
  enum Kind { ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace } kind;
  std::string a, b;  // Replace: a -> b; Metaspace: a = replacement
  int strip_start = 0;
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool special, lstrip, rstrip;
};

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  // merge of (left id, right id) -> (rank, merged id)
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;
  bool byte_fallback = false, fuse_unk = false, ignore_merges = false;
  int32_t unk_id = -1;
  int32_t byte_ids[256];
  std::vector<Normalizer> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  std::vector<DecodeStep> decoders;
  std::vector<AddedToken> added;                     // sorted longest content first
  std::vector<bool> special;                          // by id
  std::vector<int32_t> prefix_ids, suffix_ids;      // post-processor template, single sequence
  int32_t bos = -1, eos = -1;
  bool strip_leading_space = false;
  mutable std::mutex cache_mu;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  void bpe_word(const std::string& w, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view seg, bool first_segment, std::vector<int32_t>& out) const;
};

void Tokenizer::Impl::bpe_word(const std::string& w, std::vector<int32_t>& out) const {
  if (w.empty()) return;
  if (ignore_merges) {
    auto it = vocab.find(w);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  {
    std::lock_guard<std::mutex> lk(cache_mu);
    auto it = cache.find(w);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  struct Sym {
    int32_t id;
    int prev, next;
    size_t start, len;
  };
  std::vector<Sym> syms;
  for (size_t i = 0; i < w.size();) {
    size_t n = std::min(utf8_len(static_cast<unsigned char>(w[i])), w.size() - i);
    auto it = vocab.find(w.substr(i, n));
    syms.push_back({it == vocab.end() ? -1 : it->second, int(syms.size()) - 1, int(syms.size()) + 1, i, n});
    i += n;
  }
  syms.back().next = -1;
  // Min-heap on (rank, position): the lowest-ranked merge first, the leftmost among equals (as HF does).
  struct Cand {
    int32_t rank;
    int pos;
    int32_t left_id, right_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push_pair = [&](int i) {
    if (i < 0) return;
    int j = syms[size_t(i)].next;
    if (j < 0 || syms[size_t(i)].id < 0 || syms[size_t(j)].id < 0) return;
    auto it = merges.find(uint64_t(uint32_t(syms[size_t(i)].id)) << 32 | uint32_t(syms[size_t(j)].id));
    if (it != merges.end()) heap.push({it->second.first, i, syms[size_t(i)].id, syms[size_t(j)].id});
  };
  for (int i = 0; i < int(syms.size()); ++i) push_pair(i);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Sym& l = syms[size_t(c.pos)];
    if (l.len == 0 || l.id != c.left_id || l.next < 0) continue;  // stale
    Sym& r = syms[size_t(l.next)];
    if (r.id != c.right_id) continue;
    l.id = merges.at(uint64_t(uint32_t(c.left_id)) << 32 | uint32_t(c.right_id)).second;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[size_t(r.next)].prev = c.pos;
    push_pair(l.prev);
    push_pair(c.pos);
  }
  std::vector<int32_t> ids;
  bool last_unk = false;
  for (int i = 0; i >= 0; i = syms[size_t(i)].next) {
    const Sym& s = syms[size_t(i)];
    if (s.id >= 0) {
      ids.push_back(s.id);
      last_unk = false;
    } else if (byte_fallback) {
      for (size_t k = 0; k < s.len; ++k) ids.push_back(byte_ids[static_cast<unsigned char>(w[s.start + k])]);
      last_unk = false;
    } else if (unk_id >= 0) {
      if (!(fuse_unk && last_unk)) ids.push_back(unk_id);
      last_unk = true;
    } else {
      throw Error(path + ": text contains '" + w.substr(s.start, s.len) +
                  "', which the vocabulary cannot encode (no unk token, no byte fallback)");
    }
  }
  out.insert(out.end(), ids.begin(), ids.end());
  std::lock_guard<std::mutex> lk(cache_mu);
  if (cache.size() > 200000) cache.clear();
  cache.emplace(w, std::move(ids));
}

void Tokenizer::Impl::encode_segment(std::string_view seg, bool first_segment, std::vector<int32_t>& out) const {
  std::string s(seg);
  for (auto& n : normalizers) s = n.apply(std::move(s));
  std::vector<std::string> pieces{std::move(s)};
  for (auto& p : pre_tokenizers) p.apply(pieces, first_segment);
  for (auto& w : pieces) bpe_word(w, out);
}

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

namespace {

void parse_normalizer(const json& j, std::vector<Normalizer>& out, const std::string& where) {
  if (j.is_null()) return;
  std::string t = j.value("type", "");
  if (t == "Sequence") {
    for (auto& n : j["normalizers"]) parse_normalizer(n, out, where);
  } else if (t == "NFC") out.push_back({Normalizer::NFC, "", ""});
  else if (t == "NFD") out.push_back({Normalizer::NFD, "", ""});
  else if (t == "NFKC") out.push_back({Normalizer::NFKC, "", ""});
  else if (t == "NFKD") out.push_back({Normalizer::NFKD, "", ""});
  else if (t == "Lowercase") out.push_back({Normalizer::Lowercase, "", ""});
  else if (t == "Prepend") out.push_back({Normalizer::Prepend, j.at("prepend").get<std::string>(), ""});
  else if (t == "Replace") {
    if (!j["pattern"].contains("String")) throw Error(where + ": Replace normalizer with a regex is not supported");
    out.push_back({Normalizer::Replace, j["pattern"]["String"].get<std::string>(), j.at("content").get<std::string>()});
  } else {
    throw Error(where + ": unsupported normalizer '" + t + "'");
  }
}

void parse_pre_tokenizer(const json& j, std::vector<PreTokenizer>& out, const std::string& where) {
  if (j.is_null()) return;
  std::string t = j.value("type", "");
  if (t == "Sequence") {
    for (auto& p : j["pretokenizers"]) parse_pre_tokenizer(p, out, where);
    return;
  }
  PreTokenizer p{};
  if (t == "Split") {
    p.kind = PreTokenizer::Split;
    if (j["pattern"].contains("Regex")) p.regex = std::make_shared<Regex>(j["pattern"]["Regex"].get<std::string>(), where);
    else p.literal = j["pattern"].at("String").get<std::string>();
    std::string b = j.value("behavior", "Isolated");
    if (b == "Isolated") p.behavior = PreTokenizer::Isolated;
    else if (b == "Removed") p.behavior = PreTokenizer::Removed;
    else if (b == "MergedWithPrevious") p.behavior = PreTokenizer::MergedWithPrevious;
    else if (b == "MergedWithNext") p.behavior = PreTokenizer::MergedWithNext;
    else throw Error(where + ": unsupported Split behavior '" + b + "'");
    p.invert = j.value("invert", false);
  } else if (t == "ByteLevel") {
    p.kind = PreTokenizer::ByteLevel;
    p.add_prefix_space = j.value("add_prefix_space", false);
    if (j.value("use_regex", true)) p.regex = std::make_shared<Regex>(kGpt2Pattern, where);
  } else if (t == "Metaspace") {
    p.kind = PreTokenizer::Metaspace;
    p.replacement = j.value("replacement", kMetaspace);
    std::string scheme = j.value("prepend_scheme", j.value("add_prefix_space", true) ? "always" : "never");
    p.prepend = scheme == "first" ? PreTokenizer::First : scheme == "never" ? PreTokenizer::Never : PreTokenizer::Always;
    p.split = j.value("split", true);
  } else {
    throw Error(where + ": unsupported pre-tokenizer '" + t + "'");
  }
  out.push_back(std::move(p));
}

void parse_decoder(const json& j, std::vector<DecodeStep>& out, const std::string& where) {
  if (j.is_null()) return;
  std::string t = j.value("type", "");
  if (t == "Sequence") {
    for (auto& d : j["decoders"]) parse_decoder(d, out, where);
  } else if (t == "ByteLevel") out.push_back({DecodeStep::ByteLevel, "", "", 0});
  else if (t == "ByteFallback") out.push_back({DecodeStep::ByteFallback, "", "", 0});
  else if (t == "Fuse") out.push_back({DecodeStep::Fuse, "", "", 0});
  else if (t == "Strip") {
    if (j.value("content", " ") != " " || j.value("stop", 0) != 0) throw Error(where + ": unsupported Strip decoder");
    out.push_back({DecodeStep::Strip, "", "", j.value("start", 0)});
  } else if (t == "Replace") {
    if (!j["pattern"].contains("String")) throw Error(where + ": Replace decoder with a regex is not supported");
    out.push_back({DecodeStep::Replace, j["pattern"]["String"].get<std::string>(), j.at("content").get<std::string>(), 0});
  } else if (t == "Metaspace") {
    DecodeStep d{DecodeStep::Metaspace, j.value("replacement", kMetaspace), "", 0};
    std::string scheme = j.value("prepend_scheme", j.value("add_prefix_space", true) ? "always" : "never");
    d.strip_start = scheme == "never" ? 0 : 1;
    out.push_back(d);
  } else {
    throw Error(where + ": unsupported decoder '" + t + "'");
  }
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path) {
  std::string file = path;
  std::string dir;
  if (is_directory(path)) {
    dir = path;
    if (file_exists(path + "/tokenizer.json")) file = path + "/tokenizer.json";
    else if (file_exists(path + "/tokenizer.json.gz")) file = path + "/tokenizer.json.gz";
    else throw Error(path + ": no tokenizer.json");
  } else {
    auto slash = path.find_last_of('/');
    dir = slash == std::string::npos ? "." : path.substr(0, slash);
  }
  json j;
  try {
    j = json::parse(read_maybe_gzip(file));
  } catch (const json::exception& e) {
    throw Error(file + ": invalid JSON: " + e.what());
  }
  Tokenizer tok;
  Impl& t = *tok.impl_;
  t.path = file;
  try {
    const json& m = j.at("model");
    std::string mtype = m.value("type", "BPE");
    if (mtype != "BPE") throw Error(file + ": unsupported tokenizer model '" + mtype + "' (llmq reads BPE)");
    if (m.contains("continuing_subword_prefix") && m["continuing_subword_prefix"].is_string() &&
        !m["continuing_subword_prefix"].get<std::string>().empty())
      throw Error(file + ": continuing_subword_prefix is not supported");
    int32_t max_id = -1;
    for (auto& [tokstr, id] : m.at("vocab").items()) {
      int32_t v = id.get<int32_t>();
      if (v < 0) throw Error(file + ": negative token id");
      t.vocab[tokstr] = v;
      max_id = std::max(max_id, v);
    }
    for (auto& a : j.value("added_tokens", json::array())) max_id = std::max(max_id, a.at("id").get<int32_t>());
    t.id_to_token.assign(size_t(max_id + 1), std::string());
    t.special.assign(size_t(max_id + 1), false);
    for (auto& [s, id] : t.vocab) t.id_to_token[size_t(id)] = s;
    int32_t rank = 0;
    for (auto& mg : m.at("merges")) {
      std::string a, b;
      if (mg.is_array()) {
        a = mg.at(0).get<std::string>();
        b = mg.at(1).get<std::string>();
      } else {
        std::string s = mg.get<std::string>();
        auto sp = s.find(' ', 1);
        if (sp == std::string::npos) throw Error(file + ": malformed merge '" + s + "'");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      }
      auto ia = t.vocab.find(a), ib = t.vocab.find(b), iab = t.vocab.find(a + b);
      if (ia == t.vocab.end() || ib == t.vocab.end() || iab == t.vocab.end()) {
        ++rank;
        continue;  // HF rejects such files; we skip the unusable merge
      }
      t.merges.emplace(uint64_t(uint32_t(ia->second)) << 32 | uint32_t(ib->second), std::make_pair(rank++, iab->second));
    }
    t.byte_fallback = m.value("byte_fallback", false);
    t.fuse_unk = m.value("fuse_unk", false);
    t.ignore_merges = m.value("ignore_merges", false);
    if (m.contains("unk_token") && m["unk_token"].is_string()) {
      auto it = t.vocab.find(m["unk_token"].get<std::string>());
      if (it != t.vocab.end()) t.unk_id = it->second;
    }
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      auto it = t.vocab.find(name);
      t.byte_ids[b] = it == t.vocab.end() ? -1 : it->second;
      if (t.byte_fallback && t.byte_ids[b] < 0) throw Error(file + ": byte_fallback but no token " + name);
    }
    for (auto& a : j.value("added_tokens", json::array())) {
      AddedToken at{a.at("id").get<int32_t>(), a.at("content").get<std::string>(), a.value("special", false),
                    a.value("lstrip", false), a.value("rstrip", false)};
      if (at.content.empty()) continue;
      t.id_to_token[size_t(at.id)] = at.content;
      t.special[size_t(at.id)] = at.special;
      t.vocab.emplace(at.content, at.id);
      t.added.push_back(at);
    }
    std::stable_sort(t.added.begin(), t.added.end(),
                     [](const AddedToken& x, const AddedToken& y) { return x.content.size() > y.content.size(); });
    parse_normalizer(j.value("normalizer", json()), t.normalizers, file);
    parse_pre_tokenizer(j.value("pre_tokenizer", json()), t.pre_tokenizers, file);
    parse_decoder(j.value("decoder", json()), t.decoders, file);
    for (auto& d : t.decoders)
      if ((d.kind == DecodeStep::Strip || d.kind == DecodeStep::Metaspace) && d.strip_start > 0)
        t.strip_leading_space = true;

    // Post-processor: the single-sequence template of TemplateProcessing (directly or inside a Sequence).
    std::function<void(const json&)> parse_post = [&](const json& p) {
      if (p.is_null()) return;
      std::string pt = p.value("type", "");
      if (pt == "Sequence") {
        for (auto& q : p["processors"]) parse_post(q);
      } else if (pt == "TemplateProcessing") {
        bool seen_a = false;
        for (auto& piece : p.at("single")) {
          if (piece.contains("Sequence")) {
            seen_a = true;
          } else if (piece.contains("SpecialToken")) {
            std::string name = piece["SpecialToken"].at("id").get<std::string>();
            const json& st = p.at("special_tokens").at(name);
            for (auto& id : st.at("ids")) (seen_a ? t.suffix_ids : t.prefix_ids).push_back(id.get<int32_t>());
          }
        }
      } else if (pt != "ByteLevel") {
        throw Error(file + ": unsupported post-processor '" + pt + "'");
      }
    };
    parse_post(j.value("post_processor", json()));
  } catch (const json::exception& e) {
    throw Error(file + ": malformed tokenizer: " + e.what());
  }

  // BOS/EOS: tokenizer_config.json beside the file names them; else the post-processor's prefix.
  auto id_of = [&](const json& v) -> int32_t {
    std::string s = v.is_string() ? v.get<std::string>() : v.is_object() ? v.value("content", "") : "";
    auto it = t.vocab.find(s);
    return it == t.vocab.end() ? -1 : it->second;
  };
  std::string cfg = dir + "/tokenizer_config.json";
  if (file_exists(cfg)) {
    try {
      json c = json::parse(read_text_file(cfg));
      if (c.contains("bos_token")) t.bos = id_of(c["bos_token"]);
      if (c.contains("eos_token")) t.eos = id_of(c["eos_token"]);
    } catch (const json::exception& e) {
      throw Error(cfg + ": invalid JSON: " + e.what());
    }
  }
  if (t.bos < 0 && !t.prefix_ids.empty()) t.bos = t.prefix_ids[0];
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special) const {
  const Impl& t = *impl_;
  std::vector<int32_t> out;
  if (add_special) out = t.prefix_ids;
  // Split the text on added tokens (longest match first at each position), honouring lstrip/rstrip.
  size_t seg_start = 0, i = 0;
  bool first = true;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (auto& a : t.added) {
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip)
      while (seg_end > seg_start && is_ascii_space(text[seg_end - 1])) --seg_end;
    if (seg_end > seg_start) t.encode_segment(text.substr(seg_start, seg_end - seg_start), first && seg_start == 0, out);
    first = false;
    out.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < text.size() && is_ascii_space(text[i])) ++i;
    seg_start = i;
  }
  if (seg_start < text.size()) t.encode_segment(text.substr(seg_start), first && seg_start == 0, out);
  if (add_special) out.insert(out.end(), t.suffix_ids.begin(), t.suffix_ids.end());
  return out;
}

std::string Tokenizer::token_str(int32_t id) const {
  if (id < 0 || size_t(id) >= impl_->id_to_token.size()) throw Error("token id " + std::to_string(id) + " out of range");
  return impl_->id_to_token[size_t(id)];
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const Impl& t = *impl_;
  std::string s = token_str(id);
  if (t.special[size_t(id)]) return s;
  for (auto& d : t.decoders) {
    switch (d.kind) {
      case DecodeStep::ByteLevel: {
        std::string out;
        const ByteMap& bm = byte_map();
        for (size_t i = 0; i < s.size();) {
          size_t n = std::min(utf8_len(static_cast<unsigned char>(s[i])), s.size() - i);
          utf8proc_int32_t cp = -1;
          utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i), utf8proc_ssize_t(n), &cp);
          auto it = bm.cp_to_byte.find(uint32_t(cp));
          if (it != bm.cp_to_byte.end()) out += char(it->second);
          else out.append(s, i, n);  // added tokens are stored as plain text
          i += n;
        }
        s = std::move(out);
        break;
      }
      case DecodeStep::Replace: s = replace_all(std::move(s), d.a, d.b); break;
      case DecodeStep::Metaspace: s = replace_all(std::move(s), d.a, " "); break;
      case DecodeStep::ByteFallback:
        if (s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>') {
          unsigned v = 0;
          if (std::sscanf(s.c_str() + 3, "%2X", &v) == 1) s = std::string(1, char(v));
        }
        break;
      case DecodeStep::Fuse:
      case DecodeStep::Strip: break;  // whole-text steps: see decode()
    }
  }
  return s;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (skip_special && is_special(id)) continue;
    out += token_bytes(id);
  }
  if (impl_->strip_leading_space && !out.empty() && out[0] == ' ') out.erase(0, 1);
  return out;
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->special.size() && impl_->special[size_t(id)];
}
bool Tokenizer::strips_leading_space() const { return impl_->strip_leading_space; }
int32_t Tokenizer::bos_id() const { return impl_->bos; }
int32_t Tokenizer::eos_id() const { return impl_->eos; }
size_t Tokenizer::vocab_size() const { return impl_->id_to_token.size(); }

size_t utf8_complete_prefix(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = utf8_len(c);
    if (n == 1) {
      ++i;
      continue;
    }
    if (i + n > s.size()) {
      // Incomplete at the end: hold it back only if what is there is a valid beginning.
      for (size_t k = i + 1; k < s.size(); ++k)
        if ((static_cast<unsigned char>(s[k]) & 0xC0) != 0x80) return s.size();
      return i;
    }
    i += n;
  }
  return i;
}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_.token_bytes(id);
  if (first_ && !pending_.empty()) {
    if (tok_.strips_leading_space() && pending_[0] == ' ') pending_.erase(0, 1);
    first_ = pending_.empty();
  }
  size_t n = utf8_complete_prefix(pending_);
  std::string out = pending_.substr(0, n);
  pending_.erase(0, n);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace llmq
