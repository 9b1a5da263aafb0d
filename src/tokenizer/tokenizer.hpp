// Hugging Face tokenizer.json: BPE models (byte-level as GPT-2/Llama 3/Qwen2 use, and SentencePiece-style
// with "▁" and byte fallback as Llama 2/Mistral use), normalizers, pre-tokenizers, added tokens,
// the post-processor's BOS/EOS template and decoders.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace llmq {

class Tokenizer {
 public:
  // path: a model directory (tokenizer.json or tokenizer.json.gz inside) or a tokenizer.json(.gz) file.
  // Throws llmq::Error naming the file and the unsupported or malformed part.
  static Tokenizer load(const std::string& path);
  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  // Text -> ids. add_special applies the post-processor template (BOS for Llama). Added tokens
  // (special or not) written in the text are matched as such.
  std::vector<int32_t> encode(std::string_view text, bool add_special) const;
  // The token strings as the vocabulary spells them (byte-level: "Ġthe"; SentencePiece: "▁the").
  std::string token_str(int32_t id) const;
  // The raw bytes a token contributes to the decoded text, ignoring context-dependent decoder steps
  // (the leading-space strip of SentencePiece decoders). Special tokens give their content.
  std::string token_bytes(int32_t id) const;
  // Ids -> text, as the tokenizer's decoder does it. skip_special drops special tokens.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  bool is_special(int32_t id) const;
  // Whether the decoder strips one leading space from the decoded text (SentencePiece "Strip" decoder).
  bool strips_leading_space() const;
  int32_t bos_id() const;  // -1 when unknown
  int32_t eos_id() const;  // -1 when unknown
  size_t vocab_size() const;  // max id + 1

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of ids into text without ever splitting a UTF-8 character: push() returns the bytes
// that are complete so far; finish() returns what is left (invalid bytes pass through as they are).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok) : tok_(tok) {}
  std::string push(int32_t id);
  std::string finish();

 private:
  const Tokenizer& tok_;
  std::string pending_;
  bool first_ = true;
};

// Length of the longest prefix of s made of complete UTF-8 sequences (invalid bytes count as complete).
size_t utf8_complete_prefix(std::string_view s);

}  // namespace llmq
