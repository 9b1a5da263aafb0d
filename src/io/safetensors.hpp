// safetensors reader: single files and sharded checkpoints (model.safetensors.index.json), memory-mapped.
//
// File layout: u64 little-endian N | N bytes of JSON header | data. The header maps tensor names to
// {"dtype", "shape", "data_offsets": [begin, end)} with offsets relative to the first data byte.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "common.hpp"
#include "io/mmap_file.hpp"

namespace llmq {

// A tensor that lives inside a mapped file (no copy). data points at numel() elements of dtype.
struct TensorView {
  std::string name;
  std::string file;  // the file it came from, for error messages
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype); }
  std::string shape_str() const;
};

class SafetensorsFile {
 public:
  // Maps and validates the file: header size, JSON, dtypes, shapes, offsets inside the file and sizes that
  // agree with shape × dtype. Throws llmq::Error naming the file and the problem.
  explicit SafetensorsFile(const std::string& path);
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::string& path() const { return file_.path(); }

 private:
  MappedFile file_;
  std::map<std::string, TensorView> tensors_;
};

// All the tensors of a checkpoint directory: model.safetensors, or the shards named by
// model.safetensors.index.json (every shard is validated; a tensor the index names must be in its shard).
class Checkpoint {
 public:
  explicit Checkpoint(const std::string& dir);
  const TensorView* find(const std::string& name) const;
  // Throws llmq::Error "<dir>: tensor '<name>' is missing" when absent.
  const TensorView& get(const std::string& name) const;
  const std::map<std::string, const TensorView*>& all() const { return index_; }
  const std::string& dir() const { return dir_; }
  uint64_t total_bytes() const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
};

// A tensor to write: name, dtype, shape and its bytes (numel * dtype size).
struct TensorData {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

// Writes a safetensors file: to `path + ".tmp"`, then renamed over `path`, so a reader never sees a partial
// file. Tensors are laid out in the order given; metadata goes into "__metadata__".
void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes one safetensors file tensor by tensor for outputs too large to hold (a quantized 7B+ checkpoint): the
// file `path + ".tmp"` starts with `header_reserve` bytes kept for the header, each add() appends a tensor's
// bytes and keeps only its name, dtype and shape, and finish() writes the header into the reserved space
// (padded with spaces, which the format allows) and renames the file over `path`. A header larger than the
// reserve is written exactly, with the data copied after it into a new file (slower, same tensors). Tensors lie
// in the order added. Until finish() returns nothing exists at `path`; a writer destroyed unfinished removes
// its files.
class SafetensorsWriter {
 public:
  explicit SafetensorsWriter(std::string path, uint64_t header_reserve = 64 * 1024);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;
  void add(const TensorData& t);
  void finish(const std::map<std::string, std::string>& metadata = {});
  uint64_t data_bytes() const { return off_; }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    uint64_t begin, end;
  };
  std::string path_;
  uint64_t reserve_;
  std::FILE* file_ = nullptr;
  std::vector<Entry> entries_;
  std::set<std::string> names_;
  uint64_t off_ = 0;
  bool done_ = false;
};

}  // namespace llmq
