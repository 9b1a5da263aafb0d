#include "runtime/engine.hpp"

#include <algorithm>
#include <fstream>

#include "backend/cpu/kernels.hpp"
#include "runtime/sampler.hpp"
#ifdef LLMQ_HAVE_CUDA
#include "backend/cuda/engine.hpp"
#endif

namespace llmq {

void Engine::forward_argmax(const std::vector<BatchToken>& batch, int32_t* ids_out) {
  int64_t n = 0;
  for (const BatchToken& b : batch) n += b.logits;
  std::vector<float> logits(static_cast<size_t>(n * config().vocab));
  forward(batch, logits.data());
  for (int64_t r = 0; r < n; ++r) {
    const float* row = &logits[static_cast<size_t>(r * config().vocab)];
    check_logits(row, config().vocab);
    ids_out[r] = argmax(row, config().vocab);
  }
}

namespace {

std::string cpu_model_name() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "cpu";
}

// MemAvailable of /proc/meminfo (what can be allocated without swapping), bytes; 0 where unknown.
uint64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib << 10;
  return 0;
}

class CpuEngine final : public Engine {
 public:
  explicit CpuEngine(const Model& m) : Engine(m) {}
  void reset(int64_t n_seq, int64_t capacity) override {
    cache_.reset();
    if (n_seq < 1 || capacity < 1) throw Error("engine: the KV cache needs at least one sequence and one position");
    // The FP32 cache and one decode step's logits (a row a sequence), counted before allocating: a batch too large
    // for the machine is an error with the numbers, not the out-of-memory killer's verdict half an hour later.
    const ModelConfig& c = config();
    const double kv = 2.0 * double(c.layers) * double(n_seq) * double(capacity) * double(c.kv_heads * c.head_dim) * 4.0;
    const double need = kv + double(n_seq) * double(c.vocab) * 4.0;
    const uint64_t avail = available_memory_bytes();
    if (avail > 0 && need + double(256u << 20) > double(avail))
      throw Error("--device cpu: the KV cache for " + std::to_string(n_seq) + " sequence(s) of " +
                  std::to_string(capacity) + " positions and a step's logits need " + mib(uint64_t(std::min(need, 1e19))) +
                  " but this machine has " + mib(avail) + " of memory available; use fewer or shorter sequences");
    cache_ = std::make_unique<KVCache>(config(), n_seq, capacity);
  }
  void forward(const std::vector<BatchToken>& batch, float* logits_out) override {
    if (!cache_) throw Error("engine: forward before reset");
    // A pass's activations (Model::forward_layer's FP32 rows: about 3 H + 2 q + 2 kv + 2 I a token), checked when
    // they are large (a prefill of many long prompts at once); /proc/meminfo is not read for a decode step.
    const ModelConfig& c = config();
    const double act = double(batch.size()) * 4.0 *
                       double(3 * c.hidden + 2 * c.heads * c.head_dim + 2 * c.kv_heads * c.head_dim + 2 * c.intermediate);
    if (act > double(256u << 20)) {
      const uint64_t avail = available_memory_bytes();
      if (avail > 0 && act + double(256u << 20) > double(avail))
        throw Error("--device cpu: a forward pass of " + std::to_string(batch.size()) + " tokens needs about " + mib(uint64_t(std::min(act, 1e19))) +
                    " of activations but this machine has " + mib(avail) +
                    " of memory available; use fewer or shorter prompts");
    }
    model_.forward(batch, *cache_, logits_out);
  }
  std::string device() const override {
    return "cpu (" + cpu_model_name() + ", " + std::to_string(num_threads()) + " threads, " +
           cpu::isa_name(cpu::active_isa()) + ")";
  }
  double kv_bytes_per_value() const override { return 4.0; }
  double measure_peak_gbps() override { return cpu::measure_peak_read_gbps(); }
  double measure_peak_gflops() override { return cpu::measure_peak_gflops(); }

 private:
  std::unique_ptr<KVCache> cache_;
};

}  // namespace

std::unique_ptr<Engine> make_cpu_engine(const Model& model) { return std::make_unique<CpuEngine>(model); }

bool cuda_built() {
#ifdef LLMQ_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

std::unique_ptr<Engine> make_engine(const Model& model, const std::string& device) {
  if (device == "cpu") return make_cpu_engine(model);
  if (device == "cuda") {
#ifdef LLMQ_HAVE_CUDA
    return cuda::make_cuda_engine(model);
#else
    throw Error("--device cuda: this build of llmq has no CUDA backend (nvcc was not found when it was configured); "
                "use --device cpu, or rebuild with the CUDA toolkit installed");
#endif
  }
  throw Error("unknown device '" + device + "' (expected cpu or cuda)");
}

}  // namespace llmq
