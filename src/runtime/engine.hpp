// An inference engine: a loaded model plus its KV cache on one device. The generation loop, perplexity and
// the benchmark run through this interface, so they work on the CPU reference and on CUDA alike.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/llama.hpp"

namespace llmq {

class Engine {
 public:
  virtual ~Engine() = default;
  const Model& model() const { return model_; }
  const ModelConfig& config() const { return model_.config(); }

  // (Re)allocates the KV cache for n_seq sequences of up to `capacity` positions each and clears it.
  // Throws llmq::Error (with the sizes) when it does not fit the device's free memory.
  virtual void reset(int64_t n_seq, int64_t capacity) = 0;
  // Model::forward's contract: K/V of every token go into the cache at (seq, pos); logits of the tokens with
  // `logits` set are written in batch order to logits_out ([n_wanted, vocab], host memory).
  virtual void forward(const std::vector<BatchToken>& batch, float* logits_out) = 0;
  // A greedy decoding step: forward's contract, but for each token with `logits` set the id of its largest
  // logit (the first such id; argmax() in sampler.hpp) goes to ids_out ([n_wanted]) instead of the logits.
  // This default runs forward and argmax on the host; the CUDA engine finds the ids on the device and copies
  // back only them (the logits of a 128K vocabulary are half a megabyte a token).
  virtual void forward_argmax(const std::vector<BatchToken>& batch, int32_t* ids_out);

  // What the device is, in words ("cpu (AMD EPYC ..., 2 threads, avx512)", "cuda (NVIDIA H100 80GB HBM3, sm_90)").
  virtual std::string device() const = 0;
  // Bytes of one cached K or V value (the benchmark's KV traffic).
  virtual double kv_bytes_per_value() const = 0;
  // Peaks measured on this device now: read (CPU) or copy (GPU) bandwidth in GB/s, dense FLOP/s in GFLOP/s.
  virtual double measure_peak_gbps() = 0;
  virtual double measure_peak_gflops() = 0;
  // Peak device memory in use since the engine started or since restart_peak_memory() (bytes), 0 where not tracked.
  virtual uint64_t peak_memory_bytes() const { return 0; }
  // Starts a new peak (llmq bench: each run of one process reports its own, from its reset() on).
  virtual void restart_peak_memory() {}

 protected:
  explicit Engine(const Model& m) : model_(m) {}
  const Model& model_;
};

// The CPU reference engine (Model::forward with an FP32 KV cache).
std::unique_ptr<Engine> make_cpu_engine(const Model& model);
// "cpu" or "cuda". Throws llmq::Error for cuda when this build has no CUDA backend or no GPU is usable.
std::unique_ptr<Engine> make_engine(const Model& model, const std::string& device);
// Whether this build of llmq contains the CUDA backend.
bool cuda_built();

}  // namespace llmq
