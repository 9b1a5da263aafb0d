#include "backend/cuda/gemm_lt.hpp"

#include <cublasLt.h>

#include <cstdlib>
#include <cstring>

#include "backend/cuda/check.hpp"

namespace llmq::cuda {

struct LtGemm::Plan {
  bool ok = false;
  float beta = 0.f;  // scaled plans: 1 adds into the output
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

LtGemm::LtGemm() {
  cublasLtHandle_t h = nullptr;
  LLMQ_CUBLAS_CHECK(cublasLtCreate(&h));
  handle_ = h;
  workspace_bytes_ = size_t(32) << 20;
  LLMQ_CUDA_CHECK(cudaMalloc(&workspace_, workspace_bytes_));
}

LtGemm::~LtGemm() {
  for (auto& [key, p] : plans_) {
    if (p->desc) cublasLtMatmulDescDestroy(p->desc);
    for (cublasLtMatrixLayout_t l : {p->a, p->b, p->c})
      if (l) cublasLtMatrixLayoutDestroy(l);
    delete p;
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

LtGemm::Plan* LtGemm::plan(LtKind kind, int64_t N, int64_t T, int64_t K, Scaling scaling, int64_t ldc, bool accumulate) {
  const bool scaled = scaling != Scaling::None;
  const auto key = std::make_tuple(int(kind), N, T, K, int(scaling), ldc, accumulate);
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  Plan* p = new Plan;
  plans_[key] = p;
  const bool fp8 = kind == LtKind::Fp8;
  const cudaDataType_t in = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_8I, out = fp8 ? CUDA_R_32F : CUDA_R_32I;
  const cublasComputeType_t compute = fp8 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32I;
  const cudaDataType_t scale = fp8 ? CUDA_R_32F : CUDA_R_32I;
  // Column-major view: C[N, T] = W^T[N, K] x[K, T]; W is [K, N] with ld K (transposed), x [K, T] with ld K.
  if (cublasLtMatmulDescCreate(&p->desc, compute, scale) != CUBLAS_STATUS_SUCCESS) return p;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  // LLMQ_LT_FAST_ACCUM=1 (FP8, for measuring): the tensor cores' own accumulation throughout, without cuBLASLt's
  // periodic promotion to FP32 (faster, less exact over long K).
  static const bool fast_accum = [] {
    const char* e = std::getenv("LLMQ_LT_FAST_ACCUM");
    return e && *e == '1';
  }();
  if (fp8 && fast_accum) {
    const int8_t one = 1;
    cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &one, sizeof(one));
  }
  if (scaling == Scaling::AlphaVec) {  // alpha: a device vector over M (= N, the output channels); beta: host
    const int32_t pm = CUBLASLT_POINTER_MODE_ALPHA_DEVICE_VECTOR_BETA_HOST;
    if (cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_POINTER_MODE, &pm, sizeof(pm)) != CUBLAS_STATUS_SUCCESS)
      return p;
  }
  if (scaling == Scaling::OuterVec) {  // A (the weights, M = N rows of C) and B (the tokens) each scaled by a vector
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    if (cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)) != CUBLAS_STATUS_SUCCESS)
      return p;
  }
  if (cublasLtMatrixLayoutCreate(&p->a, in, uint64_t(K), uint64_t(N), K) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatrixLayoutCreate(&p->b, in, uint64_t(K), uint64_t(T), K) != CUBLAS_STATUS_SUCCESS ||
      cublasLtMatrixLayoutCreate(&p->c, out, uint64_t(N), uint64_t(T), scaled ? ldc : N) != CUBLAS_STATUS_SUCCESS)
    return p;
  p->beta = scaled && accumulate ? 1.f : 0.f;
  cublasLtMatmulPreference_t pref = nullptr;
  if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return p;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace_bytes_,
                                       sizeof(workspace_bytes_));
  if (scaled) {  // y may be a column offset into a wider row (a fused site's part): 16-byte alignment only
    const uint32_t align = 16;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof(align));
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof(align));
  }
  // LLMQ_LT_ALGO=k (comparisons): the k-th of cuBLASLt's heuristic answers instead of its first, where it gives
  // that many (else the first), and LLMQ_LT_ALGO_KIND=int8|fp8 limits that to one kind.
  static const int want = [] {
    const char* e = std::getenv("LLMQ_LT_ALGO");
    const int k = e && *e ? std::atoi(e) : 0;
    return k >= 0 && k < 16 ? k : 0;
  }();
  static const int want_kind = [] {
    const char* e = std::getenv("LLMQ_LT_ALGO_KIND");
    return !e ? -1 : std::strcmp(e, "int8") == 0 ? int(LtKind::Int8) : std::strcmp(e, "fp8") == 0 ? int(LtKind::Fp8) : -1;
  }();
  const int k = want_kind < 0 || want_kind == int(kind) ? want : 0;
  cublasLtMatmulHeuristicResult_t res[16]{};
  int found = 0;
  const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(static_cast<cublasLtHandle_t>(handle_), p->desc, p->a, p->b,
                                                           p->c, p->c, pref, k + 1, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    p->algo = res[k < found ? k : 0].algo;
    p->ok = true;
  }
  return p;
}

bool LtGemm::supports(LtKind kind, int64_t N, int64_t T, int64_t K, int sm) {
  if (kind == LtKind::Fp8 && sm < 89) return false;
  if (N < 1 || T < 1 || K < 16 || K % 16 || N % 4) return false;
  return plan(kind, N, T, K)->ok;
}

void LtGemm::run(LtKind kind, const void* w, const void* x, void* acc, int64_t N, int64_t T, int64_t K, cudaStream_t s) {
  Plan* p = plan(kind, N, T, K);
  if (!p->ok) throw Error("cuBLASLt has no 8-bit GEMM for N " + std::to_string(N) + ", T " + std::to_string(T) + ", K " + std::to_string(K));
  const float alpha_f = 1.f, beta_f = 0.f;
  const int32_t alpha_i = 1, beta_i = 0;
  const void* alpha = kind == LtKind::Fp8 ? static_cast<const void*>(&alpha_f) : static_cast<const void*>(&alpha_i);
  const void* beta = kind == LtKind::Fp8 ? static_cast<const void*>(&beta_f) : static_cast<const void*>(&beta_i);
  LLMQ_CUBLAS_CHECK(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, alpha, w, p->a, x, p->b, beta, acc, p->c,
                                   acc, p->c, &p->algo, workspace_, workspace_bytes_, s));
}

namespace {
// The shapes the FP8 plans writing straight into a strided y take (sm_89+, y rows 16-byte aligned).
bool fp8_direct_shape_ok(int64_t N, int64_t T, int64_t K, int64_t ldy, int sm) {
  return sm >= 89 && ldy >= N && N >= 1 && T >= 1 && K >= 16 && K % 16 == 0 && N % 4 == 0 && ldy % 4 == 0;
}
}  // namespace

bool LtGemm::supports_fp8_scaled(int64_t N, int64_t T, int64_t K, int64_t ldy, bool accumulate, int sm) {
  return fp8_direct_shape_ok(N, T, K, ldy, sm) && plan(LtKind::Fp8, N, T, K, Scaling::OuterVec, ldy, accumulate)->ok;
}

void LtGemm::run_fp8_scaled(const void* w, const void* x, const float* w_scale, const float* x_scale, float* y,
                            int64_t ldy, bool accumulate, int64_t N, int64_t T, int64_t K, cudaStream_t s) {
  Plan* p = plan(LtKind::Fp8, N, T, K, Scaling::OuterVec, ldy, accumulate);
  if (reinterpret_cast<uintptr_t>(y) % 16) throw Error("cuBLASLt scaled FP8 GEMM: output not 16-byte aligned");
  if (!p->ok) throw Error("cuBLASLt has no scaled FP8 GEMM for N " + std::to_string(N) + ", T " + std::to_string(T) + ", K " + std::to_string(K));
  // The scale pointers belong to this call (the plan is shared by every layer of the shape): set each time, on
  // the host, before the launch (inside a graph capture too: nothing here synchronizes or allocates).
  const void* as = w_scale;
  const void* bs = x_scale;
  LLMQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &as, sizeof(as)));
  LLMQ_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &bs, sizeof(bs)));
  const float alpha = 1.f, beta = p->beta;
  LLMQ_CUBLAS_CHECK(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, &alpha, w, p->a, x, p->b, &beta, y, p->c,
                                   y, p->c, &p->algo, workspace_, workspace_bytes_, s));
}

bool LtGemm::supports_fp8_alpha(int64_t N, int64_t T, int64_t K, int64_t ldy, bool accumulate, int sm) {
  return fp8_direct_shape_ok(N, T, K, ldy, sm) && plan(LtKind::Fp8, N, T, K, Scaling::AlphaVec, ldy, accumulate)->ok;
}

void LtGemm::run_fp8_alpha(const void* w, const void* x, const float* alpha, float* y, int64_t ldy, bool accumulate,
                           int64_t N, int64_t T, int64_t K, cudaStream_t s) {
  Plan* p = plan(LtKind::Fp8, N, T, K, Scaling::AlphaVec, ldy, accumulate);
  if (reinterpret_cast<uintptr_t>(y) % 16) throw Error("cuBLASLt alpha-vector FP8 GEMM: output not 16-byte aligned");
  if (!p->ok) throw Error("cuBLASLt has no alpha-vector FP8 GEMM for N " + std::to_string(N) + ", T " + std::to_string(T) + ", K " + std::to_string(K));
  const float beta = p->beta;  // host (pointer mode ALPHA_DEVICE_VECTOR_BETA_HOST); alpha is the device vector
  LLMQ_CUBLAS_CHECK(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), p->desc, alpha, w, p->a, x, p->b, &beta, y, p->c,
                                   y, p->c, &p->algo, workspace_, workspace_bytes_, s));
}

}  // namespace llmq::cuda
