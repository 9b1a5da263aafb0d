#include "backend/cuda/engine.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <tuple>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/check.hpp"
#include "backend/cuda/elementwise.cuh"
#include "backend/cuda/gemm_lt.hpp"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/trace.hpp"
#include "backend/cuda/wgemm.cuh"
#include "quant/pack/int4_mma.hpp"

namespace llmq::cuda {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v && *v && std::strcmp(v, "0") != 0;
}

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") == 0;
}

namespace {

// Decode attention runs on the tensor cores (attention_decode_tc_kernel) in steps of at least kTcMinTokens tokens
// where a block gets at least kTcMinPositions positions (CudaEngine::tc_attention_). H100, 4-layer llama-3-8b bf16,
// TPOT with / without (two rounds each): 64 sequences at ~1,040 positions 1.776 1.754 / 1.869 1.843 ms (5% faster),
// at ~145 0.9% slower; 16 sequences at ~1,040 (3 splits of 352) 1.3-1.8% slower, at ~145 0.6% faster. The kernel
// alone (llmq-kbench, 64 sequences): 5% slower at 160 positions, 1.5% faster at 400, 11% at 1,000. Between 17 and
// 63 tokens (session 37, ~1,040 positions): 32 sequences 1.489 1.499 / 1.516 1.545 ms (2-3% faster), 48 sequences
// 1.727 1.734 / 1.699 1.704 (1.7% slower, unexplained: 384 blocks of one split against 512 of two at 32).
constexpr int64_t kTcMinPositions = 512;
constexpr int64_t kTcMinTokens = 32;

std::string summary(const cudaDeviceProp& p) {
  return std::string(p.name) + ", sm_" + std::to_string(p.major) + std::to_string(p.minor) + ", " +
         std::to_string(p.multiProcessorCount) + " SMs, " + std::to_string(p.totalGlobalMem >> 20) + " MiB";
}

}  // namespace

bool sync_each_launch() {
  static const bool on = env_flag("LLMQ_CUDA_SYNC");
  return on;
}

bool device_sm90() {
  static const bool on = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return major >= 9;
  }();
  return on;
}

bool pdl_enabled() {
  static const bool on = !env_flag("LLMQ_NO_PDL") && device_sm90();
  return on;
}

void check_launch(const char* kernel, cudaStream_t stream) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw Error(std::string("CUDA kernel ") + kernel + " failed to launch: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  if (!sync_each_launch()) return;
  cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &cap) == cudaSuccess && cap != cudaStreamCaptureStatusNone) return;
  e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess)
    throw Error(std::string("CUDA kernel ") + kernel + " failed: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

std::string device_summary() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();
    return "";
  }
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "";
  return summary(p);
}

namespace {

// A device allocation owned by the engine.
struct DevMem {
  void* p = nullptr;
  size_t n = 0;
  DevMem() = default;
  explicit DevMem(size_t bytes) : n(bytes) {
    if (bytes) LLMQ_CUDA_CHECK(cudaMalloc(&p, bytes));
  }
  DevMem(DevMem&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr, o.n = 0; }
  DevMem& operator=(DevMem&& o) noexcept {
    std::swap(p, o.p);
    std::swap(n, o.n);
    return *this;
  }
  DevMem(const DevMem&) = delete;
  ~DevMem() {
    if (p) cudaFree(p);
  }
  template <typename T>
  T* as() const { return static_cast<T*>(p); }
};

struct PinnedMem {
  void* p = nullptr;
  PinnedMem() = default;
  explicit PinnedMem(size_t bytes) {
    if (bytes) LLMQ_CUDA_CHECK(cudaMallocHost(&p, bytes));
  }
  PinnedMem(PinnedMem&& o) noexcept : p(o.p) { o.p = nullptr; }
  PinnedMem& operator=(PinnedMem&& o) noexcept {
    std::swap(p, o.p);
    return *this;
  }
  ~PinnedMem() {
    if (p) cudaFreeHost(p);
  }
};

// One matmul on the device: a weight in its format plus the activation format its input must have.
struct DevLinear {
  WFmt wf = WFmt::BF16;
  ActKind act = ActKind::None;
  float act_scale = 1.f;
  void* w = nullptr;
  float* scale = nullptr;
  float* alpha = nullptr;  // LLMQ_LT_ALPHA, FP8 weights with a static FP8 input scale: scale[n] * act_scale
  uint8_t* zero = nullptr;
  void* sz = nullptr;  // tiles: scale and zero as pack::int4_sz_pack records (the one-token kernel's copy)
  int64_t group = 0, N = 0, K = 0;
  float* bias = nullptr;
  int64_t col = 0;     // first output column in the site's output
  bool tiles = false;  // I4 repacked into the int4_mma layout (wgemm's), not row-major
  bool paired = false; // gate/up fused with their rows alternating: output 2j is gate j, 2j + 1 up j
};

// What a GEMV/wgemm epilogue does besides storing y: the SwiGLU of paired gate/up rows (into swiglu_out,
// instead of y), or the RMSNorm of the residual stream y into the next matmul's input (norm_w, norm_out).
struct Epilogue {
  void* swiglu_out = nullptr;
  // The SwiGLU activations' format (GemvArgs::swiglu_kind): the down_proj input's, with its own row scales
  // (row_scale2_: gate_up's blocks still read row_scale_ as their x_scale while others write).
  ActKind swiglu_kind = ActKind::None;
  float swiglu_scale = 1.f;
  float* swiglu_row_scale = nullptr;
  const float* x_scale = nullptr;  // if set: the input's row scales (instead of row_scale_)
  // W8A8 through cuBLASLt / cuBLAS: leave the raw accumulators in gemm_out_ (no gemm_epilogue pass); the next
  // row kernel applies the scales (gate_up_raw: SwiGLU; residual_raw: the residual add and RMSNorm).
  bool raw_acc = false;
  const float* norm_w = nullptr;
  PrepOut norm_out;
  // The distributed RMSNorm (GemvArgs::rms_*): the producer writes x * rms_w to nrm_ (BF16, or FP32 with
  // rms_f32 for a consumer that quantizes its input itself: GemvArgs::x_prep) and adds the sums of squares to
  // rms_sumsq; the consumer reads nrm_ and x_sumsq.
  const float* rms_w = nullptr;
  double* rms_sumsq = nullptr;
  bool rms_f32 = false;
  const double* x_sumsq = nullptr;
};

// Whether a matmul's epilogue hands the next one its RMSNorm in halves (CudaEngine::rms_split): not, as BF16
// x o w for a BF16-input consumer, or as FP32 x o w for a W8A8 GEMV that quantizes it itself.
enum class Split { None, Bf16, Prep };

// How one matmul runs for a batch of T tokens: wgemm, the GEMV, cuBLAS on BF16 (dequantized weights, or W8A8
// codes as exact BF16 values), or cuBLASLt on the 8-bit codes (W8A8 prefill and large batches).
enum class Path { Wgemm, Gemv, Cublas, Lt };

// The linears reading one input (q/k/v; gate/up), fused into one matrix when their formats agree.
struct DevSite {
  std::vector<DevLinear> parts;
  int64_t N = 0;  // total output columns
};

struct DevLayer {
  float* attn_norm = nullptr;
  float* mlp_norm = nullptr;
  DevSite qkv, o, gate_up, down;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  DevMem k_cache, v_cache;
};

WFmt wfmt_of(WeightFormat f) {
  switch (f) {
    case WeightFormat::Dense: return WFmt::BF16;
    case WeightFormat::Int8Channel: return WFmt::I8;
    case WeightFormat::Fp8Channel: return WFmt::FP8;
    case WeightFormat::Int4Group: return WFmt::I4;
  }
  return WFmt::BF16;
}

ActKind act_of(ActQuant a) {
  switch (a) {
    case ActQuant::None: return ActKind::None;
    case ActQuant::Int8Token: return ActKind::I8Token;
    case ActQuant::Int8Tensor: return ActKind::I8Tensor;
    case ActQuant::Fp8Tensor: return ActKind::Fp8Tensor;
  }
  return ActKind::None;
}

XFmt xfmt_of(ActKind a) {
  return a == ActKind::None ? XFmt::BF16 : a == ActKind::Fp8Tensor ? XFmt::FP8 : XFmt::I8;
}

class CudaEngine final : public Engine {
 public:
  explicit CudaEngine(const Model& m);
  ~CudaEngine() override;
  void reset(int64_t n_seq, int64_t capacity) override;
  void forward(const std::vector<BatchToken>& batch, float* logits_out) override { step(batch, logits_out, nullptr); }
  void forward_argmax(const std::vector<BatchToken>& batch, int32_t* ids_out) override { step(batch, nullptr, ids_out); }
  std::string device() const override { return "cuda (" + summary(prop_) + ")"; }
  double kv_bytes_per_value() const override { return kv_type_ == KvType::BF16 ? 2.0 : 1.0; }
  double measure_peak_gbps() override;
  double measure_peak_gflops() override;
  uint64_t peak_memory_bytes() const override { return peak_used_; }
  void restart_peak_memory() override { peak_used_ = 0; }  // the next reset() or buffer growth records the new peak

 private:
  void* alloc(size_t bytes);
  template <typename T>
  T* upload(const std::vector<T>& v) {
    T* p = static_cast<T*>(alloc(v.size() * sizeof(T)));
    LLMQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
    return p;
  }
  // pair_rows: two linears of equal shape whose rows alternate in the fused matrix (gate/up, for the SwiGLU
  // epilogue of the GEMV and wgemm kernels).
  DevSite upload_site(const std::vector<const Linear*>& ls, bool pair_rows = false);
  void ensure_workspace(int64_t T, int64_t n_out);
  void note_memory();
  // Throws "--device cuda: <what> need(s) <need> but only <free> of GPU memory are free ...; <advice>" unless
  // need + margin bytes fit the free memory now.
  void require_free(uint64_t need, uint64_t margin, const std::string& what, const char* advice) const;
  // One forward step: the logits (logits_out) or their argmax ids (ids_out) of the wanted tokens to the host.
  void step(const std::vector<BatchToken>& batch, float* logits_out, int32_t* ids_out);
  // The step's kernels (captured into a graph or run eagerly); with_ids: the argmax of the logits too.
  void run(int64_t T, int64_t n_out, bool small, bool with_ids);
  int64_t decode_splits(int64_t T, const KvCacheView& kv_shape) const;  // decode attention's splits for T tokens
  KvCacheView cache_shape() const {  // the cache's type and shape (no pages), for the attention launcher's questions
    KvCacheView v;
    v.type = kv_type_, v.kv_heads = config().kv_heads, v.head_dim = config().head_dim;
    return v;
  }
  // Runs the site on the input that `produce` writes (called once per distinct activation format).
  // x: the input when not act_ (which produce writes); ep: what the matmul's epilogue fuses.
  template <typename P>
  void site(const char* name, const DevSite& s, int64_t T, P produce, float* y, int64_t ldy, bool accumulate,
            const void* x = nullptr, const Epilogue& ep = {});
  GemvArgs gemv_args(const DevLinear& l, int64_t T, float* y, int64_t ldy, bool accumulate) const;
  // gemv_args with placeholder pointers, for asking the kernels' supports(): shapes, formats and the
  // workspace's alignment decide.
  GemvArgs probe_args(const DevLinear& l, int64_t T) const;
  Path path(const DevLinear& l, int64_t T) const;
  void matmul(const DevLinear& l, Path p, int64_t T, float* y, int64_t ldy, bool accumulate, const void* x = nullptr,
              const Epilogue& ep = {});
  // Whether the RMSNorm of the residual stream after `producer` (o_proj, down_proj) runs in its epilogue at T
  // tokens, writing the input `consumer` (gate_up, the next qkv) reads; then `o` is that input's format.
  // Off unless LLMQ_FUSE_NORM=1 (measured slower; see the definition).
  bool norm_fused(const DevSite& producer, const DevSite& consumer, int64_t T, PrepOut& o) const;
  // Whether the RMSNorm between `producer` and `consumer` is distributed over their epilogues at T tokens
  // (Epilogue::rms_w, x_sumsq), and how: every part of the consumer reads BF16 through the GEMV or wgemm
  // (Split::Bf16), or every part is a W8A8 GEMV that quantizes FP32 x o w itself (Split::Prep, GemvArgs::x_prep);
  // the producer (one part) runs the GEMV or wgemm. LLMQ_NO_RMS_SPLIT=1 turns it off, LLMQ_NO_PREP_SPLIT=1 the
  // W8A8 kind alone, for comparisons.
  Split rms_split(const DevSite& producer, const DevSite& consumer, int64_t T) const;
  // Whether this layer's SwiGLU runs in the gate_up matmul's epilogue at T tokens (paired rows, a BF16 down_proj
  // input, GEMV or wgemm for both matmuls; LLMQ_NO_FUSE=1 turns it off for comparisons).
  bool swiglu_fused(const DevLayer& L, int64_t T) const;
  bool raw_capable(const DevSite& s, int64_t T) const;
  bool gate_up_raw(const DevLayer& L, int64_t T) const;
  bool residual_raw(const DevSite& s, int64_t T) const;
  RawAcc raw_acc(const DevLinear& l, int64_t T, const float* x_scale) const;
  void clear_graphs();
  // LLMQ_CUDA_PROFILE=1: every op runs eagerly between two events; the totals per op name are printed to
  // stderr when the engine ends (where the time of a decode step goes).
  template <typename F>
  void op(const char* name, const char* suffix, F f);
  template <typename F>
  void op(const char* name, F f) { op(name, "", f); }
  void collect_profile();

  cudaStream_t stream_ = nullptr;
  const bool profile_ = env_flag("LLMQ_CUDA_PROFILE");
  const bool lt_alpha_ = env_flag("LLMQ_LT_ALPHA");  // FP8 linears get an alpha vector (DevLinear::alpha)
  const bool no_raw_acc_ = env_flag("LLMQ_NO_RAW_ACC");  // raw_capable (read per engine, like the next)
  // LLMQ_QKV_RAW=0: the gemm_epilogue pass before rope_kv (comparisons, tests)
  const bool qkv_raw_ = !env_off("LLMQ_QKV_RAW");
  // LLMQ_GEMV_PREFER_T=N (0..kGemvMaxM): the GEMV serves up to N tokens in every format (path(); -1: the rule).
  // Read per engine, so that a test can make an engine with and one without.
  const int64_t forced_prefer_t_ = [] {
    const char* e = std::getenv("LLMQ_GEMV_PREFER_T");
    return e && *e ? std::clamp<int64_t>(std::atoll(e), 0, kGemvMaxM) : int64_t(-1);
  }();
  std::vector<std::pair<std::string, std::pair<cudaEvent_t, cudaEvent_t>>> pending_;
  std::map<std::string, std::pair<double, int64_t>> prof_;  // name -> (total ms, calls)
  bool small_ = false;  // the batch being run is a decode step or small batch (profile names)
  cublasHandle_t cublas_ = nullptr;
  std::unique_ptr<LtGemm> lt_;
  cudaDeviceProp prop_{};
  int sm_ = 0;  // compute capability, e.g. 90
  std::vector<DevMem> weights_;
  void* embed_ = nullptr;  // bf16 [vocab, H]
  DevLinear lm_head_;
  bool head_blocks_ = false;  // a quantized lm_head, run in blocks of kWgemmMaxT tokens (constructor)
  float* final_norm_ = nullptr;
  std::vector<DevLayer> layers_;
  KvType kv_type_ = KvType::BF16;
  int64_t max_wscratch_ = 0;  // elements of the largest quantized weight (BF16 expansion for cuBLAS)
  int64_t max_gemm_n_ = 0;    // widest site output

  // KV cache geometry
  int64_t n_seq_ = 0, capacity_ = 0, pages_per_seq_ = 0;
  static constexpr int64_t kPage = 16;
  DevMem block_table_, cos_, sin_;
  DevMem counters_;       // split attention's counters (zero between launches)
  DevMem norm_counters_;  // the fused RMSNorm's counter (zero between launches)
  int64_t splits_ = 1;           // decode attention's splits of the cache at one token (fewer for more tokens)
  int64_t attention_blocks_ = 1;  // its blocks per token and split (KV heads x query-head groups)
  int64_t max_splits_ = kMaxAttentionSplits;  // LLMQ_ATTN_MAX_SPLITS
  int64_t n_tiles_ = 0;  // prefill attention tiles of the batch being run

  // Workspace, sized for t_cap_ tokens and out_cap_ logit rows.
  int64_t t_cap_ = 0, out_cap_ = 0;
  DevMem x_, qkv_, att_, gu_, act_, act2_, row_scale_, row_scale2_, gemm_out_, wscratch_, logits_, partial_, ints_;
  DevMem nrm_;    // bf16 or fp32 [min(t_cap, 64), H]: x o w of the distributed RMSNorm (the next matmul's input)
  DevMem sumsq_;  // double [2 * layers, min(t_cap, 64)]: its sums of squares per token, zeroed every step
  PinnedMem h_ints_, h_logits_;
  DevMem cublas_ws_;  // cuBLAS's workspace, set explicitly so that its GEMMs can be captured into graphs
  DevMem tiled_counters_;  // the tiled kernel's split-K counters (zero between launches)
  DevMem ids_, argmax_v_, argmax_i_, argmax_counters_;  // the device argmax: [out_cap] ids and its scratch
  PinnedMem h_ids_;
  // (T, n_out, with_ids, one_per_seq, tc_attention)
  std::map<std::tuple<int64_t, int64_t, bool, bool, bool>, cudaGraphExec_t> graphs_;
  bool one_per_seq_ = false;  // the step being run has one token per sequence (decode)
  // The step's decode attention runs on the tensor cores (AttentionArgs::tensor_cores): a decode step of at least
  // tc_min_tokens_ tokens whose longest sequence gives a block at least tc_min_positions_ positions
  // (kTcMinTokens, kTcMinPositions; LLMQ_ATTN_TC_MIN_TOKENS, LLMQ_ATTN_TC_MIN, 0: never).
  bool tc_attention_ = false;
  int64_t tc_min_positions_ = 0, tc_min_tokens_ = 1;
  bool fuse_rope_ = false;    // attention_rope_supports() for this model, unless LLMQ_NO_FUSE_ROPE=1
  uint64_t peak_used_ = 0;
};

void* CudaEngine::alloc(size_t bytes) {
  weights_.emplace_back(bytes);
  return weights_.back().p;
}

void CudaEngine::require_free(uint64_t need, uint64_t margin, const std::string& what, const char* advice) const {
  size_t free_b = 0, total_b = 0;
  LLMQ_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if (need + margin > free_b)
    throw Error("--device cuda: " + what + " " + mib(need) + " but " + std::string(prop_.name) + " has " + mib(free_b) +
                " of GPU memory free (of " + mib(total_b) + "); " + advice);
}

void CudaEngine::note_memory() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) peak_used_ = std::max<uint64_t>(peak_used_, total_b - free_b);
}

// Rows of a and b alternating: out row 2r = a row r, 2r + 1 = b row r (per_row values a row).
template <typename V>
std::vector<V> alternate_rows(const V* a, const V* b, int64_t rows, size_t per_row) {
  std::vector<V> out(size_t(2 * rows) * per_row);
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(a + size_t(r) * per_row, a + size_t(r + 1) * per_row, out.begin() + ptrdiff_t(size_t(2 * r) * per_row));
    std::copy(b + size_t(r) * per_row, b + size_t(r + 1) * per_row, out.begin() + ptrdiff_t(size_t(2 * r + 1) * per_row));
  }
  return out;
}

// A dense F32/F16 weight as BF16 values, row-major (what the device stores for dense linears).
std::vector<uint16_t> as_bf16(const Linear& l) {
  std::vector<uint16_t> conv(size_t(l.out * l.in));
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < int64_t(conv.size()); ++i) conv[size_t(i)] = f32_to_bf16(load_as_f32(l.w->data, l.w->dtype, size_t(i)));
  return conv;
}

DevSite CudaEngine::upload_site(const std::vector<const Linear*>& ls, bool pair_rows) {
  DevSite site;
  const Linear& f = *ls[0];
  bool fuse = true;
  for (const Linear* l : ls)
    fuse = fuse && l->fmt == f.fmt && l->act == f.act && l->group == f.group && l->in == f.in &&
           (l->act == ActQuant::None || l->act == ActQuant::Int8Token || l->act_scale == f.act_scale);
  std::vector<std::vector<const Linear*>> groups;
  if (fuse) groups.push_back(ls);
  else
    for (const Linear* l : ls) groups.push_back({l});
  int64_t col = 0;
  for (auto& g : groups) {
    DevLinear d;
    d.wf = wfmt_of(g[0]->fmt);
    d.act = act_of(g[0]->act);
    d.act_scale = g[0]->act_scale;
    d.group = g[0]->group;
    d.K = g[0]->in;
    d.col = col;
    bool any_bias = false;
    for (const Linear* l : g) d.N += l->out, any_bias = any_bias || !l->bias.empty();
    const int64_t K = d.K;
    const size_t row_bytes = d.wf == WFmt::BF16 ? size_t(K) * 2 : d.wf == WFmt::I4 ? size_t(K / 2) : size_t(K);
    // INT4 goes to the tensor-core layout when wgemm takes its shape (offline repack, once, on the host).
    d.tiles = d.wf == WFmt::I4 && wgemm_int4_shape(K, d.group);
    d.paired = pair_rows && fuse && g.size() == 2 && g[0]->out == g[1]->out;
    std::vector<uint8_t> codes;  // tiles: the fused matrix's codes, row-major, packed at the end
    char* w = d.tiles ? nullptr : static_cast<char*>(alloc(row_bytes * size_t(d.N)));
    d.w = w;
    std::vector<float> scale, bias;
    std::vector<uint8_t> zero;
    if (d.paired) {
      // Both matrices in the device format on the host, then their rows (and per-row scales, zero points,
      // biases) alternated.
      std::vector<uint8_t> rows[2];
      std::vector<float> b2[2];
      for (int i = 0; i < 2; ++i) {
        const Linear* l = g[size_t(i)];
        const uint8_t* src = static_cast<const uint8_t*>(l->w->data);
        if (d.wf == WFmt::BF16 && l->w->dtype != DType::BF16) {
          const std::vector<uint16_t> conv = as_bf16(*l);
          const uint8_t* cb = reinterpret_cast<const uint8_t*>(conv.data());
          rows[i].assign(cb, cb + conv.size() * 2);
        } else {
          rows[i].assign(src, src + row_bytes * size_t(l->out));
        }
        b2[i] = l->bias.empty() ? std::vector<float>(size_t(l->out), 0.f) : l->bias;
      }
      const int64_t n = g[0]->out;
      codes = alternate_rows(rows[0].data(), rows[1].data(), n, row_bytes);
      if (!d.tiles) LLMQ_CUDA_CHECK(cudaMemcpy(w, codes.data(), codes.size(), cudaMemcpyHostToDevice));
      if (!g[0]->w_scale.empty())
        scale = alternate_rows(g[0]->w_scale.data(), g[1]->w_scale.data(), n, g[0]->w_scale.size() / size_t(n));
      if (!g[0]->w_zero.empty())
        zero = alternate_rows(g[0]->w_zero.data(), g[1]->w_zero.data(), n, g[0]->w_zero.size() / size_t(n));
      if (any_bias) bias = alternate_rows(b2[0].data(), b2[1].data(), n, 1);
    }
    for (const Linear* l : g) {
      if (d.paired) break;
      const size_t bytes = row_bytes * size_t(l->out);
      if (d.tiles) {
        const uint8_t* src = static_cast<const uint8_t*>(l->w->data);
        codes.insert(codes.end(), src, src + bytes);
      } else if (d.wf == WFmt::BF16 && l->w->dtype != DType::BF16) {
        const std::vector<uint16_t> conv = as_bf16(*l);
        LLMQ_CUDA_CHECK(cudaMemcpy(w, conv.data(), bytes, cudaMemcpyHostToDevice));
      } else {
        LLMQ_CUDA_CHECK(cudaMemcpy(w, l->w->data, bytes, cudaMemcpyHostToDevice));
      }
      if (w) w += bytes;
      scale.insert(scale.end(), l->w_scale.begin(), l->w_scale.end());
      zero.insert(zero.end(), l->w_zero.begin(), l->w_zero.end());
      if (any_bias) {
        if (l->bias.empty()) bias.insert(bias.end(), size_t(l->out), 0.f);
        else bias.insert(bias.end(), l->bias.begin(), l->bias.end());
      }
    }
    if (d.tiles) d.w = upload(pack::int4_mma_pack(codes.data(), d.N, K));
    if (!scale.empty()) d.scale = upload(scale);
    if (lt_alpha_ && d.wf == WFmt::FP8 && d.act == ActKind::Fp8Tensor && !scale.empty()) {
      std::vector<float> alpha(scale.size());
      for (size_t i = 0; i < alpha.size(); ++i) alpha[i] = scale[i] * d.act_scale;
      d.alpha = upload(alpha);
    }
    if (!zero.empty()) d.zero = upload(zero);
    if (d.tiles && !zero.empty() && scale.size() == zero.size())
      d.sz = upload(pack::int4_sz_pack(scale.data(), zero.data(), d.N, int64_t(zero.size()) / d.N));
    if (!bias.empty()) d.bias = upload(bias);
    if (d.wf != WFmt::BF16) max_wscratch_ = std::max(max_wscratch_, d.N * d.K);
    col += d.N;
    site.parts.push_back(d);
  }
  site.N = col;
  max_gemm_n_ = std::max(max_gemm_n_, site.N);
  return site;
}

CudaEngine::CudaEngine(const Model& m) : Engine(m) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0)
    throw Error(std::string("--device cuda: no usable CUDA device (") +
                (e != cudaSuccess ? cudaGetErrorString(e) : "no GPU found") + "); use --device cpu");
  LLMQ_CUDA_CHECK(cudaSetDevice(0));
  LLMQ_CUDA_CHECK(cudaGetDeviceProperties(&prop_, 0));
  sm_ = prop_.major * 10 + prop_.minor;
  if (env_flag("LLMQ_CUDA_TRACE")) trace_start();
  const ModelConfig& c = m.config();
  const QuantConfig& q = m.quant();
  if (c.head_dim > 256 || c.head_dim % 2)
    throw Error("--device cuda: head_dim " + std::to_string(c.head_dim) + " is not supported by the CUDA attention kernel (at most 256)");
  if (q.kv == KvFormat::Fp8) kv_type_ = KvType::FP8;
  else if (q.kv == KvFormat::Int8) kv_type_ = KvType::I8;
  {
    KvCacheView probe;
    probe.kv_heads = c.kv_heads;
    probe.head_dim = c.head_dim;
    fuse_rope_ = !env_flag("LLMQ_NO_FUSE_ROPE") && attention_rope_supports(probe, c.heads);
    const char* ms = std::getenv("LLMQ_ATTN_MAX_SPLITS");  // tests and comparisons: at most this many splits
    max_splits_ = ms && *ms ? std::clamp<int64_t>(std::atoll(ms), 1, kMaxAttentionSplits) : kMaxAttentionSplits;
    const char* tm = std::getenv("LLMQ_ATTN_TC_MIN");  // tests and comparisons: other thresholds (0: never)
    tc_min_positions_ = tm && *tm ? std::max<int64_t>(0, std::atoll(tm)) : kTcMinPositions;
    const char* tt = std::getenv("LLMQ_ATTN_TC_MIN_TOKENS");
    tc_min_tokens_ = tt && *tt ? std::max<int64_t>(1, std::atoll(tt)) : kTcMinTokens;
  }
  if (q.weights == WeightFormat::Fp8Channel && prop_.major * 10 + prop_.minor < 89)
    std::fprintf(stderr, "llmq: note: %s (sm_%d%d) has no FP8 tensor cores; FP8 weights run through FP32/BF16 kernels "
                 "(exact, slower)\n", prop_.name, prop_.major, prop_.minor);

  // Check the weights fit before allocating anything (their size on the device is their size on disk, with
  // dense F32/F16 halved or kept as BF16, and INT4's scales and zero points held twice).
  uint64_t need = 0;
  {
    auto lin = [&](const Linear& l) {
      need += l.fmt == WeightFormat::Dense ? uint64_t(l.in * l.out) * 2 : l.weight_bytes();
      need += uint64_t(l.w_zero.size()) * 5;  // INT4: the scale/zero-point records beside the checkpoint's arrays
    };
    need += uint64_t(c.vocab * c.hidden) * 2;
    if (m.lm_head().w != &m.embed()) lin(m.lm_head());
    for (auto& L : m.layers())
      for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) lin(*l);
    require_free(need, 256ull << 20, "the model's weights need",
                 "quantize it to a smaller format (w4a16-awq, fp8) or use --device cpu");
  }
  LLMQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  LLMQ_CUBLAS_CHECK(cublasCreate(&cublas_));
  LLMQ_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  cublas_ws_ = DevMem(size_t(32) << 20);  // NVIDIA's advice for Hopper
  LLMQ_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_ws_.p, cublas_ws_.n));
  lt_ = std::make_unique<LtGemm>();

  // Embeddings (and tied lm_head) as BF16.
  {
    Linear emb;
    emb.w = &m.embed();
    emb.in = c.hidden;
    emb.out = c.vocab;
    DevSite s = upload_site({&emb});
    embed_ = s.parts[0].w;
    if (m.lm_head().w == &m.embed()) lm_head_ = s.parts[0];
  }
  if (m.lm_head().w != &m.embed()) {
    // A quantized lm_head (llmq quantize --lm-head int8) runs on its own kernels in blocks of kWgemmMaxT tokens
    // (forward) rather than through a BF16 copy of the vocab x hidden matrix, where they serve it.
    const int64_t keep = max_wscratch_;
    lm_head_ = upload_site({&m.lm_head()}).parts[0];
    head_blocks_ = lm_head_.wf != WFmt::BF16 && path(lm_head_, kWgemmMaxT) != Path::Cublas;
    if (head_blocks_) max_wscratch_ = keep;
  }
  lm_head_.col = 0;
  final_norm_ = upload(m.final_norm());
  for (auto& L : m.layers()) {
    DevLayer d;
    d.attn_norm = upload(L.attn_norm);
    d.mlp_norm = upload(L.mlp_norm);
    d.qkv = upload_site({&L.q, &L.k, &L.v});
    d.o = upload_site({&L.o});
    d.gate_up = upload_site({&L.gate, &L.up}, true);
    d.down = upload_site({&L.down});
    if (!L.k_scale.empty()) {
      d.k_scale = upload(L.k_scale);
      d.v_scale = upload(L.v_scale);
    }
    layers_.push_back(std::move(d));
  }
  note_memory();
}

template <typename F>
void CudaEngine::op(const char* name, const char* suffix, F f) {
  // LLMQ_SKIP_OPS=name,name,...: those ops are not run at all (wrong results; for measuring, in a CUDA graph,
  // what an op costs the step: the step's time with and without it).
  static const std::vector<std::string> skip = [] {
    std::vector<std::string> v;
    const char* e = std::getenv("LLMQ_SKIP_OPS");
    for (std::string s = e ? e : ""; !s.empty();) {
      const size_t c = s.find(',');
      v.push_back(s.substr(0, c));
      s = c == std::string::npos ? "" : s.substr(c + 1);
    }
    return v;
  }();
  if (!skip.empty() && std::find(skip.begin(), skip.end(), std::string(name) + suffix) != skip.end()) return;
  if (!profile_) {
    f();
    return;
  }
  cudaEvent_t a, b;
  LLMQ_CUDA_CHECK(cudaEventCreate(&a));
  LLMQ_CUDA_CHECK(cudaEventCreate(&b));
  LLMQ_CUDA_CHECK(cudaEventRecord(a, stream_));
  f();
  LLMQ_CUDA_CHECK(cudaEventRecord(b, stream_));
  pending_.push_back({std::string(small_ ? "" : "prefill ") + name + suffix, {a, b}});
}

void CudaEngine::collect_profile() {
  for (auto& [name, ev] : pending_) {
    float ms = 0;
    cudaEventElapsedTime(&ms, ev.first, ev.second);
    auto& p = prof_[name];
    p.first += ms;
    p.second += 1;
    cudaEventDestroy(ev.first);
    cudaEventDestroy(ev.second);
  }
  pending_.clear();
}

CudaEngine::~CudaEngine() {
  if (env_flag("LLMQ_CUDA_TRACE")) trace_report();
  if (profile_ && !prof_.empty()) {
    double total = 0;
    for (auto& [n, p] : prof_) total += p.first;
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> v(prof_.begin(), prof_.end());
    std::sort(v.begin(), v.end(), [](auto& a, auto& b) { return a.second.first > b.second.first; });
    std::fprintf(stderr, "llmq: CUDA profile (eager launches; GPU time between events)\n%-28s %8s %10s %10s %6s\n", "op",
                 "calls", "total ms", "avg us", "%");
    for (auto& [n, p] : v)
      std::fprintf(stderr, "%-28s %8lld %10.2f %10.2f %5.1f%%\n", n.c_str(), (long long)p.second, p.first,
                   1e3 * p.first / double(p.second), 100 * p.first / total);
  }
  clear_graphs();
  if (cublas_) cublasDestroy(cublas_);
  if (stream_) cudaStreamDestroy(stream_);
}

void CudaEngine::clear_graphs() {
  for (auto& [k, g] : graphs_) cudaGraphExecDestroy(g);
  graphs_.clear();
}

void CudaEngine::reset(int64_t n_seq, int64_t capacity) {
  const ModelConfig& c = config();
  if (n_seq < 1 || capacity < 1) throw Error("engine: the KV cache needs at least one sequence and one position");
  LLMQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
  clear_graphs();
  for (auto& L : layers_) L.k_cache = DevMem(), L.v_cache = DevMem();
  pages_per_seq_ = (capacity + kPage - 1) / kPage;
  const int64_t pages = n_seq * pages_per_seq_;
  const uint64_t per_layer = uint64_t(pages * kPage * c.kv_heads * c.head_dim) * uint64_t(kv_bytes_per_value());
  require_free(2 * per_layer * uint64_t(c.layers), 256ull << 20,
               "the KV cache for " + std::to_string(n_seq) + " sequence(s) of " + std::to_string(capacity) + " positions needs",
               "use fewer or shorter sequences, or a KV-cache format of one byte (--kv-cache fp8 at quantization)");
  for (auto& L : layers_) {
    L.k_cache = DevMem(per_layer);
    L.v_cache = DevMem(per_layer);
    LLMQ_CUDA_CHECK(cudaMemsetAsync(L.k_cache.p, 0, per_layer, stream_));
    LLMQ_CUDA_CHECK(cudaMemsetAsync(L.v_cache.p, 0, per_layer, stream_));
  }
  // Every sequence owns pages_per_seq consecutive pages (the table makes any other assignment possible).
  std::vector<int32_t> table(static_cast<size_t>(pages));
  for (int64_t i = 0; i < pages; ++i) table[size_t(i)] = int32_t(i);
  block_table_ = DevMem(table.size() * 4);
  LLMQ_CUDA_CHECK(cudaMemcpy(block_table_.p, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  std::vector<float> cs, sn;
  model_.rope_tables(capacity, cs, sn);
  cos_ = DevMem(cs.size() * 4);
  sin_ = DevMem(sn.size() * 4);
  LLMQ_CUDA_CHECK(cudaMemcpy(cos_.p, cs.data(), cs.size() * 4, cudaMemcpyHostToDevice));
  LLMQ_CUDA_CHECK(cudaMemcpy(sin_.p, sn.data(), sn.size() * 4, cudaMemcpyHostToDevice));
  n_seq_ = n_seq;
  capacity_ = capacity;
  // Decode attention: split the positions so that a small batch still fills the GPU (flash-decoding), but no
  // split shorter than 32 positions, one round of the unrolled decode kernel's four warps (H200, one sequence
  // of 160 positions in a 256-position cache: 15.0 us with 8 splits against 17.4 with 16; session 9's results).
  const int64_t gch = (c.heads / c.kv_heads + 7) / 8;
  const int64_t blocks = c.kv_heads * gch;
  attention_blocks_ = blocks;
  splits_ = std::clamp<int64_t>((2 * prop_.multiProcessorCount + blocks - 1) / blocks, 1,
                                std::clamp<int64_t>(capacity / 32, 1, max_splits_));
  partial_ = DevMem(size_t(kWgemmMaxT * c.heads * splits_ * (c.head_dim + 2)) * 4);
  counters_ = DevMem(size_t(attention_counters(kWgemmMaxT, c.heads, c.kv_heads)) * 4);
  norm_counters_ = DevMem(4);
  LLMQ_CUDA_CHECK(cudaMemset(norm_counters_.p, 0, norm_counters_.n));
  LLMQ_CUDA_CHECK(cudaMemset(counters_.p, 0, counters_.n));
  note_memory();
}

void CudaEngine::ensure_workspace(int64_t T, int64_t n_out) {
  if (T <= t_cap_ && n_out <= out_cap_) return;
  LLMQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
  clear_graphs();
  const ModelConfig& c = config();
  const int64_t Tn = std::max(T, t_cap_), On = std::max<int64_t>(std::max(n_out, out_cap_), 1);
  const int64_t qd = c.heads * c.head_dim, kvd = c.kv_heads * c.head_dim;
  const int64_t widest_in = std::max({c.hidden, qd, c.intermediate});
  // gemm_out_ has at least kWgemmMaxT rows: it is also the tiled kernel's split-K workspace, whose splits a decode step
  // of few tokens (T small after short prompts) would otherwise cut (gemv_args; llama-3-8b at 16 tokens: 16 splits
  // of o and down, 4 of gate_up need 1-1.8 M floats, 16 rows of 28,672 give 0.46 M).
  const int64_t ws_rows = std::max<int64_t>(Tn, kWgemmMaxT);
  const uint64_t need = uint64_t(Tn) * uint64_t(c.hidden + qd + 2 * kvd + qd + 2 * c.intermediate + 1) * 4 +
                        uint64_t(ws_rows) * uint64_t(max_gemm_n_) * 4 +
                        uint64_t(Tn * widest_in) * 2 + uint64_t(std::min<int64_t>(Tn, kWgemmMaxT) * c.intermediate) * 2 +
                        uint64_t(std::min<int64_t>(Tn, kWgemmMaxT)) * uint64_t(c.hidden * 2 + 16 * layers_.size()) +
                        uint64_t(max_wscratch_) * 2 + uint64_t(On * c.vocab) * 4;
  require_free(need, 0, "activations for a batch of " + std::to_string(T) + " tokens need",
               "use a smaller batch or prompt");
  x_ = DevMem(size_t(Tn * c.hidden) * 4);
  qkv_ = DevMem(size_t(Tn * (qd + 2 * kvd)) * 4);
  att_ = DevMem(size_t(Tn * qd) * 4);
  gu_ = DevMem(size_t(Tn * 2 * c.intermediate) * 4);
  act_ = DevMem(size_t(Tn * widest_in) * 2);
  act2_ = DevMem(size_t(std::min<int64_t>(Tn, kWgemmMaxT) * c.intermediate) * 2);  // fused SwiGLU output [T, I]
  nrm_ = DevMem(size_t(std::min<int64_t>(Tn, kWgemmMaxT) * c.hidden) * 4);
  sumsq_ = DevMem(size_t(2 * int64_t(layers_.size()) * std::min<int64_t>(Tn, kWgemmMaxT)) * 8);
  row_scale_ = DevMem(size_t(Tn) * 4);
  row_scale2_ = DevMem(size_t(Tn) * 4);  // the row scales of the SwiGLU codes (fused, or from gate_up's accumulators)
  gemm_out_ = DevMem(size_t(ws_rows * max_gemm_n_) * 4);
  if (!tiled_counters_.p) {  // one per 128-row tile of the widest matmul (GemvArgs::tiled_counters), zero
    tiled_counters_ = DevMem(size_t((max_gemm_n_ + 127) / 128) * 4);
    LLMQ_CUDA_CHECK(cudaMemset(tiled_counters_.p, 0, tiled_counters_.n));
  }
  if (max_wscratch_ && !wscratch_.p) wscratch_ = DevMem(size_t(max_wscratch_) * 2);
  logits_ = DevMem(size_t(On * c.vocab) * 4);
  ints_ = DevMem(size_t(6 * Tn) * 4);  // tokens, sequences, positions, logit rows, prefill tiles (2 per token)
  h_ints_ = PinnedMem(size_t(6 * Tn) * 4);
  h_logits_ = PinnedMem(size_t(On * c.vocab) * 4);
  ids_ = DevMem(size_t(On) * 4);
  argmax_v_ = DevMem(size_t(On * kArgmaxParts) * 4);
  argmax_i_ = DevMem(size_t(On * kArgmaxParts) * 4);
  argmax_counters_ = DevMem(size_t(On) * 4);
  LLMQ_CUDA_CHECK(cudaMemset(argmax_counters_.p, 0, argmax_counters_.n));
  h_ids_ = PinnedMem(size_t(On) * 4);
  t_cap_ = Tn;
  out_cap_ = On;
  note_memory();
}

GemvArgs CudaEngine::gemv_args(const DevLinear& l, int64_t T, float* y, int64_t ldy, bool accumulate) const {
  GemvArgs a;
  a.wf = l.wf;
  a.xf = xfmt_of(l.act);
  a.w = l.w;
  a.w_scale = l.scale;
  a.w_zero = l.zero;
  a.i4_sz = l.sz;
  a.group = l.group;
  a.N = l.N;
  a.K = l.K;
  a.bias = l.bias;
  a.x = act_.p;
  a.ldx = l.K;
  a.x_scale = l.act != ActKind::None ? row_scale_.as<float>() : nullptr;
  a.M = int(T);
  a.y = y;
  a.ldy = ldy;
  a.accumulate = accumulate;
  // The tiled kernel's split-K partial sums (wgemm.cu, tiled_default; weight-only formats): gemm_out_, which
  // otherwise only the cuBLAS and cuBLASLt paths use (their raw accumulators are read by the next row kernel, before
  // any other matmul).
  // The last CTA of each tile adds the partial sums (GemvArgs::tiled_counters); LLMQ_WGEMM_SPLITK_PASS=1: a kernel
  // of their own after the GEMM, as before (comparisons).
  static const bool splitk_pass = env_flag("LLMQ_WGEMM_SPLITK_PASS");
  if (l.wf != WFmt::BF16 && l.act == ActKind::None) {
    a.tiled_ws = static_cast<float*>(gemm_out_.p), a.tiled_ws_floats = int64_t(gemm_out_.n / 4);
    if (!splitk_pass) a.tiled_counters = tiled_counters_.as<int32_t>(), a.tiled_counters_n = int64_t(tiled_counters_.n / 4);
  }
  return a;
}

GemvArgs CudaEngine::probe_args(const DevLinear& l, int64_t T) const {
  GemvArgs a = gemv_args(l, std::max<int64_t>(T, 1), reinterpret_cast<float*>(16), l.N, false);
  a.x = act_.p ? act_.p : reinterpret_cast<void*>(16);
  if (a.xf != XFmt::BF16) a.x_scale = reinterpret_cast<float*>(16);
  return a;
}

Path CudaEngine::path(const DevLinear& l, int64_t T) const {
  const GemvArgs a = probe_args(l, T);
  // Comparison switches: LLMQ_NO_WGEMM (GEMV or cuBLAS only), LLMQ_WGEMM_ALL (wgemm wherever it runs).
  static const bool no_wgemm = env_flag("LLMQ_NO_WGEMM"), wgemm_all = env_flag("LLMQ_WGEMM_ALL");
  // Row-major formats at T = 1: the GEMV reads more of the bandwidth than wgemm (H200, llama-3-8b shapes,
  // llmq-kbench: gate_up bf16 56.7 vs 69.5 us, fp8 33.1 vs 38.9, int8 30.1 vs 36.8, w8a16 36.9 vs 40.7;
  // bench/results/2026-12-01-nvidia-h200-kbench.txt). Past that the GEMV runs out of issue slots: it spends an
  // FFMA a weight and token, where wgemm's mma spends one instruction on 16 x 8 x 16 products. BF16 and INT8
  // weight-only rows keep the GEMV up to kGemvPreferT = 2 tokens; W8A8 codes only at one (wgemm wins there from two
  // tokens: the GEMV's 8-bit products take more instructions a weight, and each of its blocks also makes the
  // step's input codes itself, x_prep). H200,
  // llama-3-8b cut to 4 layers, ms a decode step with the GEMV up to 8 tokens against this rule
  // (bench/results/2026-12-04-nvidia-h200-session16.txt): bf16 batch 3 1.084 / 1.031, 4 1.213 / 1.045, 8 2.019 /
  // 1.083 (batch 2: the GEMV 0.883 against wgemm 1.006 for the graph's span); w8a16 8 1.765 / 0.839; fp8 batch 2
  // 0.808 / 0.715, 8 2.867 / 0.787; int8-sq 8 2.480 / 0.946; full-size llama-3-8b fp8 batch 8: 460 against 1,986
  // tok/s. With wgemm at 3 tokens and the GEMV at one, a sequence's logits decoded in a batch are no longer the
  // same to the last bit as decoded alone (CudaModel.SmallBatchDecodeEqualsOneAtATime bounds the difference).
  // LLMQ_GEMV_PREFER_T=N (0-8) sets the limit for every format (comparisons; 8 is the rule before session 16).
  // INT4 tiles always take wgemm.
  const int64_t prefer_t = forced_prefer_t_ >= 0 ? forced_prefer_t_ : l.act != ActKind::None ? 1 : kGemvPreferT;
  if (!wgemm_all && T <= prefer_t && !l.tiles && gemv_supports(a)) return Path::Gemv;
  // Past the GEMV's batches, wgemm serves only the formats cuBLAS cannot read as they are: BF16 and W8A8 go to
  // cuBLAS / cuBLASLt, which at 16-64 tokens read 60-87% of the copy bandwidth where wgemm read 11-59% (H200,
  // llama-3-8b shapes, bf16 gate_up at 16 tokens 63.5 vs 95.1 us, at 64 tokens 69.7 vs 265; fp8 35.3 vs 51.0 and
  // 41.0 vs 209; cuBLAS in bench/results/2026-12-02-nvidia-h200-session8.txt, wgemm in 2026-12-01-nvidia-h200-
  // kbench.txt; 4-layer bf16 at batch 64: 1.90 against 5.97 ms a step). INT8 weight-only and INT4 tiles would need
  // a dequantized copy for cuBLAS (more bytes than BF16) and stay on wgemm up to kWgemmMaxT.
  // LLMQ_WGEMM_MAX_T=N overrides the limit for every format (comparisons; INT4 past N is dequantized for cuBLAS).
  static const int64_t forced_max_t = [] {
    const char* e = std::getenv("LLMQ_WGEMM_MAX_T");
    return e && *e ? std::clamp<int64_t>(std::atoll(e), 0, kWgemmMaxT) : int64_t(-1);
  }();
  // (W8A8 codes through wgemm's tiled kernel at 9-64 tokens lost to cuBLASLt: decode TPOT 2.09x at batch 64, H200,
  // bench/results/2026-12-05-nvidia-h200-session23.txt; removed.)
  const bool own_format = l.tiles || (l.wf == WFmt::I8 && l.act == ActKind::None);
  const int64_t max_t = forced_max_t >= 0 ? forced_max_t : own_format ? kWgemmMaxT : kWgemmDenseMaxT;
  if (T <= max_t && !no_wgemm && wgemm_supports(a, sm_)) return Path::Wgemm;
  if (T <= kGemvMaxM && !l.tiles && gemv_supports(a)) return Path::Gemv;
  // W8A8 codes on the 8-bit tensor cores (LLMQ_NO_LT: through the BF16 GEMM instead, for comparisons).
  static const bool no_lt = env_flag("LLMQ_NO_LT");
  if (!no_lt && T > max_t) {
    if (l.wf == WFmt::FP8 && l.act == ActKind::Fp8Tensor && lt_->supports(LtKind::Fp8, l.N, T, l.K, sm_)) return Path::Lt;
    if (l.wf == WFmt::I8 && (l.act == ActKind::I8Token || l.act == ActKind::I8Tensor) &&
        lt_->supports(LtKind::Int8, l.N, T, l.K, sm_))
      return Path::Lt;
  }
  return Path::Cublas;
}

bool CudaEngine::swiglu_fused(const DevLayer& L, int64_t T) const {
  static const bool off = env_flag("LLMQ_NO_FUSE");
  if (off || T > kWgemmMaxT || L.gate_up.parts.size() != 1 || L.down.parts.size() != 1) return false;
  const DevLinear& gl = L.gate_up.parts[0];
  const DevLinear& dl = L.down.parts[0];
  // down_proj reads BF16 or the codes of a static scale (not per-token INT8: a row's absmax spans blocks).
  if (!gl.paired || dl.act == ActKind::I8Token) return false;
  const Path pg = path(gl, T), pd = path(dl, T);
  if ((pg != Path::Gemv && pg != Path::Wgemm) || (pd != Path::Gemv && pd != Path::Wgemm)) return false;
  GemvArgs a = probe_args(gl, T);
  a.swiglu_out = reinterpret_cast<void*>(16);
  a.swiglu_ld = gl.N / 2;
  a.swiglu_kind = dl.act;
  a.swiglu_scale = dl.act_scale;
  a.swiglu_row_scale = dl.act != ActKind::None ? reinterpret_cast<float*>(32) : nullptr;
  return pg == Path::Gemv ? gemv_supports(a) : wgemm_supports(a, sm_);
}

// W8A8 matmuls through cuBLASLt (or cuBLAS) whose output only the next row kernel reads leave their raw
// accumulators (Epilogue::raw_acc) and that kernel applies the scales itself: SwiGLU after gate_up (gate_up_raw),
// and the residual add before the next RMSNorm after o_proj and down_proj (residual_raw). The passes that wrote
// FP32 outputs only for the next kernel to read them back go; the values are the same to the bit (RawAcc). H200,
// llama-3-8b cut to 4 layers, batch 64, per layer: the epilogue passes took 9.2 us (gate_up) + 2.6 + 2.1 + 1.8 of a
// ~142 us fp8 layer, 9.5 + 2.3 + 1.8 + 2.1 of int8-sq's; ms a step with / without (LLMQ_NO_RAW_ACC=1): fp8 batch
// 64 0.869, 0.866 / 0.923, 0.925, batch 16 0.699, 0.713 / 0.722, 0.714; int8-sq batch 64 0.972 / 1.005
// (bench/results/2026-12-04-nvidia-h200-session17.txt).
// LLMQ_NO_RAW_ACC=1 (read when an engine is made): the epilogue passes (comparisons).
// A site whose one W8A8 linear without bias goes through cuBLASLt or cuBLAS at T tokens (what Epilogue::raw_acc
// asks of matmul()).
bool CudaEngine::raw_capable(const DevSite& s, int64_t T) const {
  if (no_raw_acc_ || s.parts.size() != 1) return false;
  const DevLinear& l = s.parts[0];
  if (l.act == ActKind::None || l.bias) return false;
  const Path p = path(l, T);
  return p == Path::Lt || p == Path::Cublas;
}

bool CudaEngine::gate_up_raw(const DevLayer& L, int64_t T) const { return !swiglu_fused(L, T) && raw_capable(L.gate_up, T); }

// The producer adds into the residual stream x (o_proj, down_proj) and the next kernel is a plain RMSNorm.
bool CudaEngine::residual_raw(const DevSite& s, int64_t T) const {
  return raw_capable(s, T) && s.parts[0].col == 0 && residual_rmsnorm_supported(config().hidden);
}

RawAcc CudaEngine::raw_acc(const DevLinear& l, int64_t T, const float* x_scale) const {
  RawAcc in;
  in.acc = gemm_out_.p;
  in.acc_int32 = path(l, T) == Path::Lt && l.wf != WFmt::FP8;  // the INT8 GEMM's INT32 sums
  in.ld = l.N;
  in.x_scale = x_scale ? x_scale : row_scale_.as<float>();
  in.w_scale = l.scale;
  return in;
}

bool CudaEngine::norm_fused(const DevSite& producer, const DevSite& consumer, int64_t T, PrepOut& o) const {
  // Opt-in (LLMQ_FUSE_NORM=1): measured slower than the separate rmsnorm kernel. H200, llama-3-8b cut to 4
  // layers, batch 1, tpot with / without: bf16 1.008 / 0.910 ms, w4a16 0.705 / 0.672, fp8 0.825 / 0.725
  // (bench/results/2026-12-01-nvidia-h200-session5.txt): the one block that normalizes after every other
  // block has finished costs more than the kernel launch it saves.
  static const bool on = env_flag("LLMQ_FUSE_NORM") && !env_flag("LLMQ_NO_FUSE");
  // One block normalizes all T rows: cheap for decode steps, not for 64.
  if (!on || T > kGemvMaxM || producer.parts.size() != 1) return false;
  const DevLinear& pl = producer.parts[0];
  const Path pp = path(pl, T);
  if (pp != Path::Gemv && pp != Path::Wgemm) return false;
  // The consumer must read one input (the same format for all its parts) that is not BF16-coded for cuBLAS.
  const DevLinear& cl = consumer.parts[0];
  for (const DevLinear& l : consumer.parts)
    if (l.act != cl.act || l.act_scale != cl.act_scale || l.K != cl.K || path(l, T) == Path::Cublas) return false;
  if (cl.K != pl.N) return false;
  o = PrepOut{};
  o.kind = cl.act;
  o.static_scale = cl.act_scale;
  o.out = act_.p;
  o.ld = cl.K;
  o.row_scale = row_scale_.as<float>();
  GemvArgs a = probe_args(pl, T);
  a.norm_counter = reinterpret_cast<int32_t*>(16);
  a.norm_w = reinterpret_cast<const float*>(16);
  a.norm_out = o;
  if (!a.norm_out.out) a.norm_out.out = reinterpret_cast<void*>(16);
  return pp == Path::Gemv ? gemv_supports(a) : wgemm_supports(a, sm_);
}

Split CudaEngine::rms_split(const DevSite& producer, const DevSite& consumer, int64_t T) const {
  static const bool off = env_flag("LLMQ_NO_RMS_SPLIT") || env_flag("LLMQ_NO_FUSE");
  // LLMQ_NO_PREP_SPLIT=1: W8A8 consumers take the RMSNorm kernel (comparisons).
  static const bool no_prep = env_flag("LLMQ_NO_PREP_SPLIT");
  if (off || T > kWgemmMaxT || producer.parts.size() != 1 || consumer.parts.empty()) return Split::None;
  const DevLinear& pl = producer.parts[0];
  const Path pp = path(pl, T);
  if (pp != Path::Gemv && pp != Path::Wgemm) return Split::None;
  // A W8A8 consumer (all parts) quantizes FP32 x o w itself in the GEMV; a BF16 one reads BF16 x o w.
  const bool prep = consumer.parts[0].act != ActKind::None;
  if (prep && no_prep) return Split::None;
  GemvArgs a = probe_args(pl, T);
  a.accumulate = true;
  a.rms_w = reinterpret_cast<const float*>(16);
  a.rms_out = reinterpret_cast<void*>(16);
  a.rms_ld = pl.N;
  a.rms_sumsq = reinterpret_cast<double*>(16);
  a.rms_out_f32 = prep;
  if (!(pp == Path::Gemv ? gemv_supports(a) : wgemm_supports(a, sm_))) return Split::None;
  for (const DevLinear& l : consumer.parts) {
    const Path p = path(l, T);
    if ((l.act != ActKind::None) != prep || l.K != pl.N) return Split::None;
    if (prep ? p != Path::Gemv : p != Path::Gemv && p != Path::Wgemm) return Split::None;
    GemvArgs b = probe_args(l, T);
    b.x_sumsq = reinterpret_cast<const double*>(16);
    b.x_inv_n = 1.f;
    if (prep) b.x_prep = l.act, b.x_prep_scale = l.act_scale, b.x_scale = nullptr;
    if (!(p == Path::Gemv ? gemv_supports(b) : wgemm_supports(b, sm_))) return Split::None;
  }
  return prep ? Split::Prep : Split::Bf16;
}

void CudaEngine::matmul(const DevLinear& l, Path p, int64_t T, float* y, int64_t ldy, bool accumulate, const void* x,
                        const Epilogue& ep) {
  const bool quant_act = l.act != ActKind::None;
  if (!x) x = act_.p;
  if (p == Path::Wgemm || p == Path::Gemv) {
    GemvArgs a = gemv_args(l, T, y, ldy, accumulate);
    a.x = x;
    if (ep.swiglu_out) {
      a.swiglu_out = ep.swiglu_out, a.swiglu_ld = l.N / 2, a.y = nullptr;
      a.swiglu_kind = ep.swiglu_kind, a.swiglu_scale = ep.swiglu_scale, a.swiglu_inv = 1.0f / ep.swiglu_scale;
      a.swiglu_row_scale = ep.swiglu_row_scale;
    }
    if (ep.x_scale) a.x_scale = ep.x_scale;
    if (ep.rms_w) {
      a.rms_w = ep.rms_w, a.rms_out = nrm_.p, a.rms_ld = config().hidden, a.rms_sumsq = ep.rms_sumsq;
      a.rms_out_f32 = ep.rms_f32;
    }
    if (ep.x_sumsq) {
      a.x_sumsq = ep.x_sumsq, a.x_inv_n = float(1.0 / double(config().hidden)), a.norm_eps = float(config().rms_eps);
      if (quant_act) a.x_prep = l.act, a.x_prep_scale = l.act_scale, a.x_scale = nullptr;  // Split::Prep
    }
    if (ep.norm_w) {
      a.norm_counter = norm_counters_.as<int32_t>();
      a.norm_w = ep.norm_w;
      a.norm_eps = float(config().rms_eps);
      a.norm_out = ep.norm_out;
    }
    return p == Path::Wgemm ? wgemm(a, stream_) : gemv(a, stream_);
  }
  if (ep.swiglu_out || ep.norm_w || ep.rms_w || ep.x_sumsq)
    throw Error("engine: fused epilogues run only in the GEMV and wgemm kernels");
  const float* xs = ep.x_scale ? ep.x_scale : row_scale_.as<float>();
  if (ep.raw_acc && (!quant_act || l.bias || (p != Path::Lt && p != Path::Cublas)))
    throw Error("engine: raw accumulators only from W8A8 without bias through cuBLASLt or cuBLAS");
  if (p == Path::Lt) {
    const bool fp8 = l.wf == WFmt::FP8;
    if (ep.raw_acc) {
      lt_->run(fp8 ? LtKind::Fp8 : LtKind::Int8, l.w, x, gemm_out_.p, l.N, T, l.K, stream_);
      return;
    }
    // LLMQ_LT_SCALED=1: FP8 with cuBLASLt's outer-vector scaling straight into y (no FP32 round trip through
    // gemm_epilogue); opt-in until measured on a GPU (written without one).
    static const bool lt_scaled = env_flag("LLMQ_LT_SCALED");
    // LLMQ_LT_ALPHA=1 (lt_alpha_): FP8 with a static input scale through cuBLASLt's alpha vector (every scale
    // in alpha[n] = w_scale[n] * x_scale), FP32 straight into y, added for the residual; opt-in until measured.
    // Either switch says once when its request cannot be met, rather than silently not.
    const bool direct_ok = fp8 && !l.bias && reinterpret_cast<uintptr_t>(y) % 16 == 0;
    auto unmet = [&](bool& told, const char* what) {
      if (!told)
        std::fprintf(stderr, "llmq: note: %s: no such cuBLASLt FP8 GEMM for N %lld, T %lld, K %lld%s; using the FP32 "
                     "epilogue\n", what, (long long)l.N, (long long)T, (long long)l.K, l.bias ? " (bias)" : "");
      told = true;
    };
    if (fp8 && l.alpha) {
      if (direct_ok && lt_->supports_fp8_alpha(l.N, T, l.K, ldy, accumulate, sm_)) {
        lt_->run_fp8_alpha(l.w, x, l.alpha, y, ldy, accumulate, l.N, T, l.K, stream_);
        return;
      }
      static bool told = false;
      unmet(told, "LLMQ_LT_ALPHA (alpha-vector scaling)");
    }
    if (fp8 && lt_scaled) {
      if (direct_ok && lt_->supports_fp8_scaled(l.N, T, l.K, ldy, accumulate, sm_)) {
        lt_->run_fp8_scaled(l.w, x, l.scale, xs, y, ldy, accumulate, l.N, T, l.K, stream_);
        return;
      }
      static bool told = false;
      unmet(told, "LLMQ_LT_SCALED (outer-vector scaling)");
    }
    lt_->run(fp8 ? LtKind::Fp8 : LtKind::Int8, l.w, x, gemm_out_.p, l.N, T, l.K, stream_);
    gemm_epilogue(gemm_out_.p, T, l.N, xs, l.scale, l.bias, y, ldy, accumulate, stream_, !fp8);
    return;
  }
  // cuBLAS: y[T, N] = x[T, K] . W[N, K]^T in column-major terms C[N, T] = W^T[N, K] x[K, T].
  const void* W = l.w;
  if (l.tiles) {
    int4_mma_to_bf16(l.w, l.scale, l.zero, l.group, l.N, l.K, wscratch_.p, stream_);
    W = wscratch_.p;
  } else if (l.wf != WFmt::BF16) {
    weight_to_bf16(l.wf, l.w, l.scale, l.zero, l.group, l.N, l.K, !quant_act, wscratch_.p, stream_);
    W = wscratch_.p;
  }
  const bool direct = !quant_act && !l.bias;
  const float alpha = 1.f, beta = direct && accumulate ? 1.f : 0.f;  // (raw_acc: quant_act, so not direct)
  float* C = direct ? y : gemm_out_.as<float>();
  const int64_t ldc = direct ? ldy : l.N;
  LLMQ_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, int(l.N), int(T), int(l.K), &alpha, W, CUDA_R_16BF,
                                 int(l.K), x, CUDA_R_16BF, int(l.K), &beta, C, CUDA_R_32F, int(ldc),
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (!direct && !ep.raw_acc)
    gemm_epilogue(C, T, l.N, quant_act ? xs : nullptr, quant_act ? l.scale : nullptr, l.bias, y, ldy, accumulate, stream_);
}

template <typename P>
void CudaEngine::site(const char* name, const DevSite& s, int64_t T, P produce, float* y, int64_t ldy, bool accumulate,
                      const void* x, const Epilogue& ep) {
  const DevLinear* prev = nullptr;
  bool prev_bf16 = false;
  for (const DevLinear& l : s.parts) {
    const Path p = path(l, T);
    // cuBLAS multiplies W8A8 codes as BF16 values (exact); the other paths read the codes.
    const bool as_bf16 = l.act != ActKind::None && p == Path::Cublas;
    if (!prev || prev->act != l.act || prev->act_scale != l.act_scale || prev->K != l.K || prev_bf16 != as_bf16) {
      PrepOut o;
      o.kind = l.act;
      o.codes_as_bf16 = as_bf16;
      o.static_scale = l.act_scale;
      o.out = act_.p;
      o.ld = l.K;
      o.row_scale = row_scale_.as<float>();
      op(name, " prep", [&] { produce(o); });
    }
    op(name, p == Path::Wgemm ? " wgemm" : p == Path::Gemv ? " gemv" : p == Path::Lt ? " lt" : " gemm",
       [&] { matmul(l, p, T, y + l.col, ldy, accumulate, x, ep); });
    prev = &l;
    prev_bf16 = as_bf16;
  }
}

// Decode attention's splits for this many tokens: enough blocks for two waves of the GPU, no more. With the
// batch-1 count at every batch (16 splits of 16 positions for a 256-position cache), a 64-token step ran 8,192
// blocks and wrote 17 MB of partial results a layer (llama-3-8b).
int64_t CudaEngine::decode_splits(int64_t T, const KvCacheView& kv_shape) const {
  const int64_t waves2 = 2 * int64_t(prop_.multiProcessorCount), per_split = T * attention_blocks_;
  int64_t att_splits = std::clamp<int64_t>((waves2 + per_split - 1) / per_split, 1, splits_);
  // No more splits than keep the launch inside one resident wave of the head-split kernel (several warps per
  // position range), where that still leaves a split per token and at most 256 positions a split. H200, 4-layer
  // llama-3-8b bf16, tpot with / without: 16 sequences at ~160 positions (1 split, 128 blocks, instead of 3 and
  // 384 blocks of the one-warp-per-range kernel) 0.915 / 0.926 ms, fp8 0.717 / 0.727; one sequence at ~2,080
  // positions (16 splits instead of 33) 0.815 / 0.841; but 16 sequences at ~2,080 positions in one split each
  // 1.469 / 1.234 (hence the bound). LLMQ_ATTN_NO_WAVE_SPLITS=1: the two-waves rule alone (comparisons).
  static const bool no_wave_splits = env_flag("LLMQ_ATTN_NO_WAVE_SPLITS");
  if (!no_wave_splits) {
    const int64_t wave = attention_decode_wave(kv_shape, config().heads);
    if (wave >= per_split) {
      const int64_t s1 = std::min(att_splits, wave / per_split);
      if ((capacity_ + s1 - 1) / s1 <= 256) att_splits = s1;
    }
  }
  return att_splits;
}

void CudaEngine::run(int64_t T, int64_t n_out, bool small, bool with_ids) {
  const ModelConfig& c = config();
  const int64_t H = c.hidden, qd = c.heads * c.head_dim, I = c.intermediate;
  const int32_t* tok = ints_.as<int32_t>();
  const int32_t* seq = tok + t_cap_;
  const int32_t* pos = seq + t_cap_;
  const int32_t* rows = pos + t_cap_;
  const int32_t* tiles = rows + t_cap_;
  float* x = x_.as<float>();
  small_ = small;
  const KvCacheView kv_shape = cache_shape();
  const int64_t att_splits = small ? decode_splits(T, kv_shape) : 1;
  // RoPE and the KV write inside decode attention when every sequence has one token in this step, else a
  // kernel of their own (H200, 4-layer llama-3-8b at batch 1: bf16 0.858 against 0.874 ms a step, fp8 0.716
  // against 0.733; bench/results/2026-12-02-nvidia-h200-session8.txt). LLMQ_NO_FUSE_ROPE=1: always the kernel.
  const bool rope_in_attention = small && one_per_seq_ && fuse_rope_;
  // Whether this step's decode attention kernel reads raw qkv accumulators (attention_decode_raw_q; see attn_raw).
  const bool attention_raw_q = rope_in_attention && qkv_raw_ && attention_decode_raw_q(kv_shape, c.heads, T, att_splits);
  // The distributed RMSNorms' sums of squares: slot 2l for layer l's gate_up, 2l + 1 for layer l + 1's qkv.
  const int64_t ts = std::min<int64_t>(T, kWgemmMaxT);
  double* sumsq = sumsq_.as<double>();
  // Per layer: o_proj -> gate_up, and down_proj -> the next layer's qkv (decided once per step).
  std::vector<Split> split_o(layers_.size()), split_d(layers_.size());
  bool any_split = false;
  for (size_t li = 0; li < layers_.size(); ++li) {
    split_o[li] = rms_split(layers_[li].o, layers_[li].gate_up, T);
    split_d[li] = li + 1 < layers_.size() ? rms_split(layers_[li].down, layers_[li + 1].qkv, T) : Split::None;
    any_split = any_split || split_o[li] != Split::None || split_d[li] != Split::None;
  }
  if (any_split)
    op("rms_zero", [&] { LLMQ_CUDA_CHECK(cudaMemsetAsync(sumsq, 0, size_t(2 * layers_.size() * ts) * 8, stream_)); });
  op("embed", [&] { embed_gather(embed_, tok, T, H, x, stream_); });
  bool normed = false;  // the previous matmul's epilogue wrote the RMSNorm of x into act_ (the next input)
  bool pending = false;  // the previous matmul left raw accumulators (pending_in) for the next RMSNorm to add to x
  RawAcc pending_in;
  const double* split = nullptr;  // the previous matmul's epilogue wrote x o w into nrm_ and these sums of squares
  for (size_t li = 0; li < layers_.size(); ++li) {
    DevLayer& L = layers_[li];
    const int64_t qkv_n = L.qkv.N;
    float* qkv = qkv_.as<float>();
    // The rope_kv kernel reads a W8A8 qkv GEMM's raw accumulators itself (no gemm_epilogue pass; LLMQ_QKV_RAW=0
    // brings the pass back). H200, 4-layer llama-3-8b, 2048-token prefill: fp8 297.4k -> 302.6k tok/s, int8-sq
    // 299.4k -> 305.0k (epilogue 61.5 + rope_kv 32.8 us a layer -> rope_kv 60.2 for fp8;
    // bench/results/2026-12-04-nvidia-h200-session20.txt). Not with RoPE fused into
    // decode attention: reading raw sums there (a run-time choice in every instance) changed the registers of
    // the tuned decode kernels (48 -> 56 .. 77 -> 121, 28 bytes of spill in some) for ~2.6 us a batch-64 step.
    const bool qkv_raw = qkv_raw_ && !rope_in_attention && raw_capable(L.qkv, T);
    // o_proj's input: written by attention itself (BF16 or the codes of a static scale, with the row scale), or
    // per-token INT8 by act_prep after it.
    const DevLinear& ol = L.o.parts[0];
    const bool direct = L.o.parts.size() == 1 && ol.act != ActKind::I8Token;
    // With RoPE fused, the decode kernel that batch 64 takes reads the raw sums itself (attention_decode_raw_q:
    // an instance of its own, so the tuned ones keep their registers), and the epilogue pass goes. Not where
    // attention writes o_proj's row scales: the same buffer holds the qkv input's, which its blocks read (so
    // int8-sq's per-token o_proj input, not fp8's static one). H100, full-size llama-3-8b int8-sq at batch 64,
    // prompt 128 + 128 generated, tok/s with LLMQ_QKV_RAW=0 / this, two rounds: 12,036, 12,007 / 12,166, 12,210
    // (+1.4%; bench/results/2026-12-06-nvidia-h100-session33.txt).
    const bool attn_raw = attention_raw_q && raw_capable(L.qkv, T) && !(direct && ol.act != ActKind::None);
    Epilogue eq;
    eq.x_sumsq = split;
    eq.raw_acc = qkv_raw || attn_raw;
    site("qkv", L.qkv, T, [&](const PrepOut& o) {
      if (normed || split) return;
      if (pending) residual_rmsnorm_prep(pending_in, x, T, H, L.attn_norm, float(c.rms_eps), o, stream_);
      else rmsnorm_prep(x, nullptr, T, H, L.attn_norm, float(c.rms_eps), o, stream_);
      pending = false;
    }, qkv, qkv_n, false, split ? nrm_.p : nullptr, eq);
    if (pending) throw Error("engine: the previous down_proj's accumulators were not added");
    KvCacheView kv;
    kv.type = kv_type_;
    kv.page_size = kPage;
    kv.pages_per_seq = pages_per_seq_;
    kv.block_table = block_table_.as<int32_t>();
    kv.kv_heads = c.kv_heads;
    kv.head_dim = c.head_dim;
    kv.k = L.k_cache.p;
    kv.v = L.v_cache.p;
    kv.k_scale = L.k_scale;
    kv.v_scale = L.v_scale;
    if (!rope_in_attention) {
      const RawAcc qin = qkv_raw ? raw_acc(L.qkv.parts[0], T, nullptr) : RawAcc{};
      op("rope_kv", [&] { rope_kv(qkv, qkv_n, T, pos, seq, cos_.as<float>(), sin_.as<float>(), c.heads, kv, stream_, &qin); });
    }
    AttentionArgs aa;
    aa.q = qkv;
    aa.ldq = qkv_n;
    aa.T = T;
    aa.heads = c.heads;
    aa.pos = pos;
    aa.seq = seq;
    aa.window = c.sliding_window;
    aa.out = att_.as<float>();
    aa.splits = att_splits;
    aa.chunk = (capacity_ + att_splits - 1) / att_splits;
    aa.partial = partial_.as<float>();
    aa.counters = counters_.as<int32_t>();
    if (rope_in_attention) aa.rope_cos = cos_.as<float>(), aa.rope_sin = sin_.as<float>(), aa.kv_col = qd;
    if (attn_raw) aa.q_raw = raw_acc(L.qkv.parts[0], T, nullptr);
    static const bool prewait = !env_flag("LLMQ_ATTN_NO_PREWAIT");  // comparisons: cache reads after the wait
    aa.prewait = prewait;
    aa.tensor_cores = tc_attention_;
    static const bool no_flash = env_flag("LLMQ_NO_FLASH");  // comparisons: the per-token prefill kernel
    if (!small && !no_flash) aa.tiles = tiles, aa.n_tiles = n_tiles_;
    // Attention writes o_proj's input directly (no act_prep kernel): BF16, or the codes of a static scale (FP8
    // W8A8, INT8 with --act-scale static) as site() would have them written; not per-token INT8 (a row's
    // absmax spans attention blocks: making the codes in the last block of each token, through per-token
    // counters, was measured 1-5% slower a step than this act_prep at batch 1-64, int8-sq, H100, session 32).
    if (direct) {
      aa.out_prep.kind = ol.act;
      aa.out_prep.codes_as_bf16 = ol.act != ActKind::None && path(ol, T) == Path::Cublas;
      aa.out_prep.static_scale = ol.act_scale;
      aa.out_prep.out = act_.p;
      aa.out_prep.ld = ol.K;
      aa.out_prep.row_scale = row_scale_.as<float>();
    }
    op("attention", [&] { attention(aa, kv, stream_); });
    // The MLP's RMSNorm in o_proj's epilogue, or as a kernel of its own.
    Epilogue eo;
    if (norm_fused(L.o, L.gate_up, T, eo.norm_out)) eo.norm_w = L.mlp_norm;
    else if (split_o[li] != Split::None)
      eo.rms_w = L.mlp_norm, eo.rms_sumsq = sumsq + int64_t(2 * li) * ts, eo.rms_f32 = split_o[li] == Split::Prep;
    eo.raw_acc = !eo.norm_w && !eo.rms_w && residual_raw(L.o, T);
    site("o", L.o, T, [&](const PrepOut& o) {
      if (!direct) act_prep(att_.as<float>(), qd, T, qd, o, stream_);
    }, x, H, true, nullptr, eo);
    if (eo.raw_acc) pending = true, pending_in = raw_acc(L.o.parts[0], T, eo.x_scale);
    normed = eo.norm_w != nullptr;
    split = eo.rms_sumsq;
    float* gu = gu_.as<float>();
    // SwiGLU in gate_up's epilogue (into act2_, which down reads), or as a kernel of its own.
    const bool fused = swiglu_fused(L, T);
    Epilogue eg;
    const DevLinear& dl = L.down.parts[0];
    if (fused) {
      eg.swiglu_out = act2_.p;
      eg.swiglu_kind = dl.act;
      eg.swiglu_scale = dl.act_scale;
      if (dl.act != ActKind::None) eg.swiglu_row_scale = row_scale2_.as<float>();
    }
    eg.x_sumsq = split;
    const bool raw = gate_up_raw(L, T);
    eg.raw_acc = raw;
    const bool paired = L.gate_up.parts.size() == 1 && L.gate_up.parts[0].paired;
    site("gate_up", L.gate_up, T, [&](const PrepOut& o) {
      if (normed || split) return;
      if (pending) residual_rmsnorm_prep(pending_in, x, T, H, L.mlp_norm, float(c.rms_eps), o, stream_);
      else rmsnorm_prep(x, nullptr, T, H, L.mlp_norm, float(c.rms_eps), o, stream_);
      pending = false;
    }, gu, L.gate_up.N, false, split ? nrm_.p : nullptr, eg);
    if (pending) throw Error("engine: o_proj's accumulators were not added");
    // The next layer's attention RMSNorm in down_proj's epilogue (the last layer's final norm stays a kernel:
    // it reads only the rows that want logits).
    Epilogue ed;
    // The SwiGLU codes' scales: row_scale2_ where SwiGLU is fused or reads gate_up's accumulators (whose input
    // row scales are still in row_scale_).
    if ((fused || raw) && dl.act != ActKind::None) ed.x_scale = row_scale2_.as<float>();
    if (li + 1 < layers_.size()) {
      if (norm_fused(L.down, layers_[li + 1].qkv, T, ed.norm_out)) ed.norm_w = layers_[li + 1].attn_norm;
      else if (split_d[li] != Split::None)
        ed.rms_w = layers_[li + 1].attn_norm, ed.rms_sumsq = sumsq + int64_t(2 * li + 1) * ts,
        ed.rms_f32 = split_d[li] == Split::Prep;
    }
    ed.raw_acc = li + 1 < layers_.size() && !ed.norm_w && !ed.rms_w && residual_raw(L.down, T);
    site("down", L.down, T, [&](const PrepOut& o) {
      if (raw) {
        PrepOut od = o;
        if (od.kind != ActKind::None) od.row_scale = row_scale2_.as<float>();
        swiglu_prep(raw_acc(L.gate_up.parts[0], T, nullptr), T, I, od, stream_, paired);
      } else if (!fused) {
        swiglu_prep(gu, L.gate_up.N, T, I, o, stream_, paired);
      }
    }, x, H, true, eg.swiglu_out, ed);
    if (ed.raw_acc) pending = true, pending_in = raw_acc(dl, T, ed.x_scale);
    normed = ed.norm_w != nullptr;
    split = ed.rms_sumsq;
  }
  if (n_out == 0) return;
  PrepOut o;
  o.out = act_.p;
  o.ld = H;
  op("final_norm", [&] { rmsnorm_prep(x, rows, n_out, H, final_norm_, float(c.rms_eps), o, stream_); });
  op("lm_head", [&] {
    const int64_t blk = head_blocks_ ? kWgemmMaxT : n_out;
    for (int64_t r0 = 0; r0 < n_out; r0 += blk) {
      const int64_t n = std::min(blk, n_out - r0);
      matmul(lm_head_, path(lm_head_, n), n, logits_.as<float>() + r0 * c.vocab, c.vocab, false,
             static_cast<const uint16_t*>(act_.p) + r0 * H);
    }
  });
  if (with_ids)
    op("argmax", [&] {
      argmax_rows(logits_.as<float>(), n_out, c.vocab, ids_.as<int32_t>(), argmax_v_.as<float>(), argmax_i_.as<int32_t>(),
                  argmax_counters_.as<int32_t>(), stream_);
    });
}

void CudaEngine::step(const std::vector<BatchToken>& batch, float* logits_out, int32_t* ids_out) {
  const ModelConfig& c = config();
  if (batch.empty()) return;
  if (capacity_ == 0) throw Error("engine: forward before reset");
  const int64_t T = int64_t(batch.size());
  model_.validate_batch(batch, n_seq_, capacity_);
  int64_t n_out = 0;
  for (auto& b : batch) n_out += b.logits;
  ensure_workspace(T, n_out);
  int32_t* h = static_cast<int32_t*>(h_ints_.p);
  int64_t r = 0;
  for (int64_t t = 0; t < T; ++t) {
    const BatchToken& b = batch[size_t(t)];
    h[t] = b.token;
    h[t_cap_ + t] = b.seq;
    h[2 * t_cap_ + t] = b.pos;
    if (b.logits) h[3 * t_cap_ + r++] = int32_t(t);
  }
  // Prefill and large batches: the attention tiles (runs of one sequence's tokens).
  n_tiles_ = T > kWgemmMaxT ? attention_tiles(h + t_cap_, T, h + 4 * t_cap_) : 0;
  LLMQ_CUDA_CHECK(cudaMemcpyAsync(ints_.p, h, size_t(6 * t_cap_) * 4, cudaMemcpyHostToDevice, stream_));
  // Decode steps and small batches: split attention, and one CUDA graph per shape (cuBLAS and cuBLASLt calls
  // included: their workspaces are fixed buffers, and they allocate nothing while captured).
  const bool small = T <= kWgemmMaxT;
  const bool with_ids = ids_out != nullptr;
  // One token per sequence (a decode step): RoPE and the KV write can run inside attention.
  one_per_seq_ = false;
  if (small && fuse_rope_) {
    std::vector<char> seen(static_cast<size_t>(n_seq_), 0);
    one_per_seq_ = true;
    for (const BatchToken& b : batch) {
      if (seen[size_t(b.seq)]) one_per_seq_ = false;
      seen[size_t(b.seq)] = 1;
    }
  }
  // Decode attention on the tensor cores in steps of many tokens where the longest sequence gives its blocks at
  // least tc_min_positions_ positions (kTcMinPositions: on short ranges the CUDA-core kernels are faster, and at 16
  // tokens they were at every length measured). The graph of a step shape is captured once for each choice.
  tc_attention_ = false;
  if (small && one_per_seq_ && tc_min_positions_ > 0 && T >= tc_min_tokens_) {
    const KvCacheView kv_shape = cache_shape();
    if (attention_decode_tc_supports(kv_shape, c.heads)) {
      int64_t longest = 0;
      for (const BatchToken& b : batch) longest = std::max<int64_t>(longest, int64_t(b.pos) + 1);
      const int64_t lo = c.sliding_window > 0 ? std::max<int64_t>(0, longest - c.sliding_window) : 0;
      const int64_t splits = decode_splits(T, kv_shape);
      tc_attention_ = std::min(longest - lo, (capacity_ + splits - 1) / splits) >= tc_min_positions_;
    }
  }
  const auto key = std::make_tuple(T, n_out, with_ids, one_per_seq_, tc_attention_);
  auto it = graphs_.find(key);  // a graph exists only for shapes that passed the checks below
  if (it != graphs_.end() || (small && !sync_each_launch() && !profile_)) {
    if (it == graphs_.end()) {
      cudaGraph_t g = nullptr;
      LLMQ_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      try {
        run(T, n_out, small, with_ids);
      } catch (...) {
        cudaStreamEndCapture(stream_, &g);
        if (g) cudaGraphDestroy(g);
        throw;
      }
      LLMQ_CUDA_CHECK(cudaStreamEndCapture(stream_, &g));
      cudaGraphExec_t exec = nullptr;
      const cudaError_t e = cudaGraphInstantiate(&exec, g, 0);
      cudaGraphDestroy(g);
      LLMQ_CUDA_CHECK(e);
      it = graphs_.emplace(key, exec).first;
    }
    LLMQ_CUDA_CHECK(cudaGraphLaunch(it->second, stream_));
  } else {
    run(T, n_out, small, with_ids);
  }
  if (n_out) {
    const size_t bytes = with_ids ? size_t(n_out) * 4 : size_t(n_out * c.vocab) * 4;
    void* host = with_ids ? h_ids_.p : h_logits_.p;
    LLMQ_CUDA_CHECK(cudaMemcpyAsync(host, with_ids ? ids_.p : logits_.p, bytes, cudaMemcpyDeviceToHost, stream_));
    LLMQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::memcpy(with_ids ? static_cast<void*>(ids_out) : static_cast<void*>(logits_out), host, bytes);
    if (with_ids)  // argmax_rows' -1: a NaN or +Inf logit in the row (the CPU engine's check_logits says the same)
      for (int64_t row = 0; row < n_out; ++row)
        if (ids_out[row] < 0)
          throw Error("the model produced a NaN or +Inf logit on the GPU (output row " + std::to_string(row) +
                      "): its weights or a kernel are broken; try `llmq eval` against the unquantized model, or "
                      "--device cpu");
  } else {
    LLMQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  if (profile_) collect_profile();
}

double CudaEngine::measure_peak_gbps() {
  const size_t bytes = size_t(1) << 30;
  DevMem a(bytes), b(bytes);
  cudaEvent_t e0, e1;
  LLMQ_CUDA_CHECK(cudaEventCreate(&e0));
  LLMQ_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> gbps;
  for (int i = 0; i < 6; ++i) {
    LLMQ_CUDA_CHECK(cudaEventRecord(e0, stream_));
    LLMQ_CUDA_CHECK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, stream_));
    LLMQ_CUDA_CHECK(cudaEventRecord(e1, stream_));
    LLMQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    LLMQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (i) gbps.push_back(2.0 * double(bytes) / (double(ms) * 1e-3) / 1e9);  // read + write
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(gbps.begin(), gbps.end());
  return gbps[gbps.size() / 2];
}

double CudaEngine::measure_peak_gflops() {
  const int n = 8192;
  DevMem a(size_t(n) * n * 2), b(size_t(n) * n * 2), cm(size_t(n) * n * 4);
  LLMQ_CUDA_CHECK(cudaMemsetAsync(a.p, 0, a.n, stream_));
  LLMQ_CUDA_CHECK(cudaMemsetAsync(b.p, 0, b.n, stream_));
  cudaEvent_t e0, e1;
  LLMQ_CUDA_CHECK(cudaEventCreate(&e0));
  LLMQ_CUDA_CHECK(cudaEventCreate(&e1));
  const float alpha = 1.f, beta = 0.f;
  std::vector<double> gf;
  for (int i = 0; i < 6; ++i) {
    LLMQ_CUDA_CHECK(cudaEventRecord(e0, stream_));
    LLMQ_CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.p, CUDA_R_16BF, n, b.p, CUDA_R_16BF,
                                   n, &beta, cm.p, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    LLMQ_CUDA_CHECK(cudaEventRecord(e1, stream_));
    LLMQ_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    LLMQ_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (i) gf.push_back(2.0 * double(n) * n * n / (double(ms) * 1e-3) / 1e9);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  std::sort(gf.begin(), gf.end());
  return gf[gf.size() / 2];
}

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const Model& model) { return std::make_unique<CudaEngine>(model); }

}  // namespace llmq::cuda
