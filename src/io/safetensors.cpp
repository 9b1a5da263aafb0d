#include "io/safetensors.hpp"

#include <nlohmann/json.hpp>
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

namespace llmq {

using json = nlohmann::json;

std::string TensorView::shape_str() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

static DType parse_dtype(const std::string& s, const std::string& where) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  if (s == "I8") return DType::I8;
  if (s == "U8") return DType::U8;
  if (s == "F8_E4M3") return DType::F8E4M3;
  throw Error(where + ": unsupported dtype '" + s + "' (llmq reads F32, F16, BF16, I8, U8 and F8_E4M3)");
}

SafetensorsFile::SafetensorsFile(const std::string& path) : file_(path) {
  const size_t size = file_.size();
  if (size < 8) throw Error(path + ": truncated safetensors file (" + std::to_string(size) + " bytes, no header)");
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | file_.data()[i];
  if (hlen > size - 8)
    throw Error(path + ": corrupt or truncated safetensors header (header length " + std::to_string(hlen) +
                " but the file has " + std::to_string(size) + " bytes)");
  if (hlen > (uint64_t(100) << 20)) throw Error(path + ": safetensors header larger than 100 MB");
  json header;
  try {
    header = json::parse(file_.data() + 8, file_.data() + 8 + hlen);
  } catch (const json::exception& e) {
    throw Error(path + ": corrupt safetensors header: " + e.what());
  }
  if (!header.is_object()) throw Error(path + ": corrupt safetensors header: not a JSON object");
  const uint64_t data_start = 8 + hlen;
  const uint64_t data_size = size - data_start;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets") ||
        !info["dtype"].is_string() || !info["shape"].is_array() || !info["data_offsets"].is_array() ||
        info["data_offsets"].size() != 2)
      throw Error(where + ": malformed header entry");
    TensorView t;
    t.name = name;
    t.file = path;
    t.dtype = parse_dtype(info["dtype"].get<std::string>(), where);
    uint64_t numel = 1;
    for (auto& d : info["shape"]) {
      if (!d.is_number_unsigned()) throw Error(where + ": malformed shape");
      uint64_t v = d.get<uint64_t>();
      if (v > (uint64_t(1) << 40) || (v && numel > (uint64_t(1) << 62) / v)) throw Error(where + ": shape too large");
      numel *= v;
      t.shape.push_back(int64_t(v));
    }
    const auto& off = info["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) throw Error(where + ": malformed data_offsets");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      throw Error(where + ": data offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                  ") lie outside the file's " + std::to_string(data_size) + " data bytes (truncated file?)");
    if (e - b != numel * dtype_size(t.dtype))
      throw Error(where + ": " + std::to_string(e - b) + " bytes stored but shape " + t.shape_str() + " of " +
                  dtype_name(t.dtype) + " needs " + std::to_string(numel * dtype_size(t.dtype)));
    if (b % dtype_size(t.dtype) != 0) throw Error(where + ": misaligned data offset");
    t.data = file_.data() + data_start + b;
    tensors_.emplace(name, std::move(t));
  }
}

Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single = dir + "/model.safetensors";
  if (file_exists(index_path)) {
    json index;
    try {
      index = json::parse(read_text_file(index_path));
    } catch (const json::exception& e) {
      throw Error(index_path + ": invalid JSON: " + e.what());
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object())
      throw Error(index_path + ": no \"weight_map\" object");
    std::map<std::string, SafetensorsFile*> by_name;
    for (auto& [tname, fname] : index["weight_map"].items()) {
      if (!fname.is_string()) throw Error(index_path + ": weight_map entry '" + tname + "' is not a file name");
      std::string f = fname.get<std::string>();
      if (f.find('/') != std::string::npos || f.find("..") != std::string::npos)
        throw Error(index_path + ": shard name '" + f + "' must be a file in the model directory");
      if (!by_name.count(f)) {
        if (!file_exists(dir + "/" + f)) throw Error(index_path + ": shard '" + f + "' is missing");
        files_.push_back(std::make_unique<SafetensorsFile>(dir + "/" + f));
        by_name[f] = files_.back().get();
      }
      auto it = by_name[f]->tensors().find(tname);
      if (it == by_name[f]->tensors().end())
        throw Error(dir + "/" + f + ": tensor '" + tname + "' named by the index is not in this shard");
      index_[tname] = &it->second;
    }
  } else if (file_exists(single)) {
    files_.push_back(std::make_unique<SafetensorsFile>(single));
    for (auto& [n, t] : files_.back()->tensors()) index_[n] = &t;
  } else {
    throw Error(dir + ": no model.safetensors or model.safetensors.index.json");
  }
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) throw Error(dir_ + ": tensor '" + name + "' is missing from the checkpoint");
  return *t;
}

uint64_t Checkpoint::total_bytes() const {
  uint64_t n = 0;
  for (auto& [_, t] : index_) n += t->nbytes();
  return n;
}

namespace {

void check_size(const std::string& path, const TensorData& t) {
  uint64_t numel = 1;
  for (int64_t d : t.shape) numel *= uint64_t(d);
  if (numel * dtype_size(t.dtype) != t.bytes.size())
    throw Error(path + ": tensor '" + t.name + "' has " + std::to_string(t.bytes.size()) + " bytes for its shape");
}

// The 8-byte length and the JSON header, padded with spaces to `size` bytes when it fits (else to the next
// multiple of 8 past 8 + its length), so that the data starts 8-byte aligned, as the format recommends.
std::string header_bytes(const json& header, uint64_t size = 0) {
  std::string h = header.dump();
  if (h.size() + 8 <= size) h.resize(size_t(size - 8), ' ');
  while ((h.size() + 8) % 8) h += ' ';
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[size_t(i)] = char(uint8_t(uint64_t(h.size()) >> (8 * i)));
  return out + h;
}

void add_entry(json& header, const std::string& name, DType dtype, const std::vector<int64_t>& shape, uint64_t begin,
               uint64_t end) {
  header[name] = {{"dtype", dtype_name(dtype)}, {"shape", shape}, {"data_offsets", {begin, end}}};
}

json header_json(const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  return header;
}

}  // namespace

void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = header_json(metadata);
  uint64_t off = 0;
  for (const TensorData& t : tensors) {
    check_size(path, t);
    add_entry(header, t.name, t.dtype, t.shape, off, off + t.bytes.size());
    off += t.bytes.size();
  }
  const std::string h = header_bytes(header);
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(tmp + ": cannot create: " + std::strerror(errno));
  bool ok = std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (const TensorData& t : tensors)  // (an empty tensor has no bytes, and maybe no buffer to pass)
    ok = ok && (t.bytes.empty() || std::fwrite(t.bytes.data(), 1, t.bytes.size(), f) == t.bytes.size());
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": write failed: " + std::strerror(errno));
  }
}

SafetensorsWriter::SafetensorsWriter(std::string path, uint64_t header_reserve)
    : path_(std::move(path)), reserve_((std::max<uint64_t>(header_reserve, 8) + 7) / 8 * 8) {
  const std::string tmp = path_ + ".tmp";
  file_ = std::fopen(tmp.c_str(), "w+b");
  if (!file_) throw Error(tmp + ": cannot create: " + std::strerror(errno));
  const std::string blank(size_t(8 + reserve_), ' ');
  if (std::fwrite(blank.data(), 1, blank.size(), file_) != blank.size())
    throw Error(tmp + ": write failed: " + std::strerror(errno));
}

SafetensorsWriter::~SafetensorsWriter() {
  if (file_) std::fclose(file_);
  if (!done_) {
    std::remove((path_ + ".tmp").c_str());
    std::remove((path_ + ".tmp2").c_str());
  }
}

void SafetensorsWriter::add(const TensorData& t) {
  if (done_) throw Error(path_ + ": tensor '" + t.name + "' added after the file was finished");
  check_size(path_, t);
  if (!names_.insert(t.name).second) throw Error(path_ + ": tensor '" + t.name + "' written twice");
  if (!t.bytes.empty() && std::fwrite(t.bytes.data(), 1, t.bytes.size(), file_) != t.bytes.size())
    throw Error(path_ + ".tmp: write failed: " + std::strerror(errno));
  entries_.push_back({t.name, t.dtype, t.shape, off_, off_ + t.bytes.size()});
  off_ += t.bytes.size();
}

void SafetensorsWriter::finish(const std::map<std::string, std::string>& metadata) {
  if (done_) throw Error(path_ + ": finished twice");
  json header = header_json(metadata);
  for (const Entry& e : entries_) add_entry(header, e.name, e.dtype, e.shape, e.begin, e.end);
  const std::string hb = header_bytes(header, 8 + reserve_);
  const std::string tmp = path_ + ".tmp";
  std::string done_file = tmp;
  bool ok = std::fflush(file_) == 0;
  if (hb.size() == 8 + reserve_) {  // in place: the header padded to the reserve
    ok = ok && std::fseek(file_, 0, SEEK_SET) == 0 && std::fwrite(hb.data(), 1, hb.size(), file_) == hb.size();
  } else {  // the header past the reserve, then the data copied after it
    done_file = path_ + ".tmp2";
    FILE* f = std::fopen(done_file.c_str(), "wb");
    if (!f) throw Error(done_file + ": cannot create: " + std::strerror(errno));
    ok = ok && std::fseek(file_, long(8 + reserve_), SEEK_SET) == 0 && std::fwrite(hb.data(), 1, hb.size(), f) == hb.size();
    std::vector<char> buf(size_t(8) << 20);
    uint64_t copied = 0;
    while (ok && copied < off_) {
      const size_t n = std::fread(buf.data(), 1, size_t(std::min<uint64_t>(buf.size(), off_ - copied)), file_);
      ok = n > 0 && std::fwrite(buf.data(), 1, n, f) == n;
      copied += n;
    }
    ok = (std::fclose(f) == 0) && ok;
  }
  ok = (std::fclose(file_) == 0) && ok;
  file_ = nullptr;
  if (!ok || std::rename(done_file.c_str(), path_.c_str()) != 0)
    throw Error(path_ + ": write failed: " + std::strerror(errno));  // the destructor removes the scratch files
  done_ = true;
  std::remove(tmp.c_str());  // the unused one when the header did not fit (else already renamed)
}

}  // namespace llmq
