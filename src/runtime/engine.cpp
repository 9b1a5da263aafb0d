#include "runtime/engine.hpp"

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

class CpuEngine final : public Engine {
 public:
  explicit CpuEngine(const Model& m) : Engine(m) {}
  void reset(int64_t n_seq, int64_t capacity) override {
    cache_.reset();
    cache_ = std::make_unique<KVCache>(config(), n_seq, capacity);
  }
  void forward(const std::vector<BatchToken>& batch, float* logits_out) override {
    if (!cache_) throw Error("engine: forward before reset");
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
