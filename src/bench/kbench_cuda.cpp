// llmq-kbench: the CUDA kernels one at a time at the shapes of a real model (llama-3-8b by default), on random
// data, without a checkpoint: decode matmuls (wgemm, GEMV) in every weight format at several batch sizes,
// the cuBLAS GEMMs of a prefill, prefill attention (per-token vs tensor-core kernel) and one decode token's
// attention at contexts of 256-8192. For tuning runs on a
// GPU machine: each line is the median of several timed launches after a warm-up, against the device-copy
// bandwidth or the BF16 GEMM rate measured in the same run. Weight buffers rotate over more memory than the L2
// holds, so every launch reads its weights from HBM as a decode step does.
//
// Usage: llmq-kbench [--only matmul|gemm|attention|decode] [--t LIST] (e.g. --t 1,16,64) [--matrix NAME] [--format NAME]
//                    [--rotate-mb MB] (the decode matmuls' weights rotate over at least MB MiB; default 400: past the
//                    L2; larger values, e.g. the 8 GB of a quantized 8B model, put the page-table reach in play:
//                    fp8 GEMVs at T = 1 within 2-4% of 400 MB's on an H100, session 32)
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/check.hpp"
#include "backend/cuda/gemm_lt.hpp"
#include "backend/cuda/gemv.cuh"
#include "backend/cuda/wgemm.cuh"
#include "quant/pack/int4_mma.hpp"

using namespace llmq;
using namespace llmq::cuda;

namespace {

// n random values of the given kind, as bytes: "bf16" small normal-ish values, "code" any byte, "fp8" E4M3 codes
// of moderate magnitude (no NaN), "scale" positive floats, "zero" 0..15.
std::vector<uint8_t> host_random(size_t n, const char* kind, uint64_t seed) {
  std::vector<uint8_t> h;
  const std::string k = kind;
  if (k == "bf16") {
    h.resize(n * 2);
    for (size_t i = 0; i < n; ++i) {
      const float v = (float(splitmix64(seed + i) & 0xFFFF) / 65536.f - 0.5f) * 0.04f;
      uint32_t b;
      std::memcpy(&b, &v, 4);
      const uint16_t r = uint16_t(b >> 16);
      std::memcpy(&h[2 * i], &r, 2);
    }
  } else if (k == "scale") {
    h.resize(n * 4);
    for (size_t i = 0; i < n; ++i) {
      const float v = 0.001f + float(splitmix64(seed + i) & 0xFF) * 1e-5f;
      std::memcpy(&h[4 * i], &v, 4);
    }
  } else {
    h.resize(n);
    for (size_t i = 0; i < n; i += 8) {
      const uint64_t r = splitmix64(seed + i);
      for (size_t j = 0; j < 8 && i + j < n; ++j) {
        uint8_t b = uint8_t(r >> (8 * j));
        if (k == "fp8") b &= 0xB7;  // sign, exponent <= 6, mantissa: |x| < 2, never NaN
        if (k == "zero") b &= 0x0F;
        h[i + j] = b;
      }
    }
  }
  return h;
}

// A device copy of h.
void* upload(const std::vector<uint8_t>& h) {
  void* p = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&p, h.size()));
  LLMQ_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size(), cudaMemcpyHostToDevice));
  return p;
}

void* device_random(size_t n, const char* kind, uint64_t seed) { return upload(host_random(n, kind, seed)); }

// Median time of one call of f in microseconds: 3 warm-up calls, then 7 samples of `reps` calls.
double time_us(const std::function<void(int)>& f, int reps) {
  cudaEvent_t a, b;
  LLMQ_CUDA_CHECK(cudaEventCreate(&a));
  LLMQ_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f(i);
  std::vector<double> us;
  int call = 0;
  for (int s = 0; s < 7; ++s) {
    LLMQ_CUDA_CHECK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) f(call++);
    LLMQ_CUDA_CHECK(cudaEventRecord(b));
    LLMQ_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    LLMQ_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    us.push_back(double(ms) * 1e3 / reps);
  }
  LLMQ_CUDA_CHECK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(us.begin(), us.end());
  return us[us.size() / 2];
}

double copy_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a = device_random(bytes, "code", 1), *b = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&b, bytes));
  const double us = time_us([&](int) { LLMQ_CUDA_CHECK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); }, 3);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) / (us * 1e-6) / 1e9;
}

struct Mat {
  const char* name;
  int64_t N, K;
};

struct Fmt {
  const char* name;
  WFmt wf;
  XFmt xf;
};

// One weight matrix in a format, `copies` times (rotated so that the L2 never holds it), with inputs. Past the
// first kDistinct copies (random data made on the host), the copies are device clones of those.
constexpr int kDistinct = 16;
struct Weights {
  std::vector<void*> w, w_rowmajor;  // I4: tiles for wgemm, row-major for the GEMV
  std::vector<void*> sz;             // I4: the scale/zero-point records (GemvArgs::i4_sz)
  std::vector<float*> scale;
  std::vector<uint8_t*> zero;
  size_t bytes = 0;  // one copy, with scales
};

Weights make_weights(const Fmt& f, const Mat& m, int copies, uint64_t seed) {
  Weights W;
  const size_t nk = size_t(m.N * m.K);
  auto clone = [](const void* src, size_t n) {
    void* p = nullptr;
    LLMQ_CUDA_CHECK(cudaMalloc(&p, n));
    LLMQ_CUDA_CHECK(cudaMemcpy(p, src, n, cudaMemcpyDeviceToDevice));
    return p;
  };
  for (int c = 0; c < copies; ++c) {
    if (c >= kDistinct) {
      const size_t i = size_t(c % kDistinct);
      if (f.wf == WFmt::I4) {
        W.w.push_back(clone(W.w[i], nk / 2));
        W.w_rowmajor.push_back(clone(W.w_rowmajor[i], nk / 2));
      } else {
        W.w.push_back(clone(W.w[i], f.wf == WFmt::BF16 ? nk * 2 : nk));
      }
      // Scales, zero points and records are small: shared with the clone's source.
      if (!W.scale.empty()) W.scale.push_back(W.scale[i]);
      if (!W.zero.empty()) W.zero.push_back(W.zero[i]);
      if (!W.sz.empty()) W.sz.push_back(W.sz[i]);
      continue;
    }
    const uint64_t s = seed + uint64_t(c) * 1000003u;
    if (f.wf == WFmt::BF16) {
      W.w.push_back(device_random(nk, "bf16", s));
      W.bytes = nk * 2;
    } else if (f.wf == WFmt::I8 || f.wf == WFmt::FP8) {
      W.w.push_back(device_random(nk, f.wf == WFmt::FP8 ? "fp8" : "code", s));
      W.scale.push_back(static_cast<float*>(device_random(size_t(m.N), "scale", s + 1)));
      W.bytes = nk + size_t(m.N) * 4;
    } else {
      const int64_t ng = m.K / 128;
      std::vector<uint8_t> codes(nk / 2);
      for (size_t i = 0; i < codes.size(); ++i) codes[i] = uint8_t(splitmix64(s + i));
      W.w.push_back(upload(pack::int4_mma_pack(codes.data(), m.N, m.K)));
      W.w_rowmajor.push_back(upload(codes));
      const std::vector<uint8_t> hs = host_random(size_t(m.N * ng), "scale", s + 1);
      const std::vector<uint8_t> hz = host_random(size_t(m.N * ng), "zero", s + 2);
      W.scale.push_back(static_cast<float*>(upload(hs)));
      W.zero.push_back(static_cast<uint8_t*>(upload(hz)));
      W.sz.push_back(upload(pack::int4_sz_pack(reinterpret_cast<const float*>(hs.data()), hz.data(), m.N, ng)));
      W.bytes = nk / 2 + size_t(m.N * ng) * 5;
    }
  }
  return W;
}

void free_weights(Weights& W) {
  for (void* p : W.w) cudaFree(p);
  for (void* p : W.w_rowmajor) cudaFree(p);
  // Scales, zero points and records: the clones share those of the first kDistinct copies.
  for (size_t i = 0; i < W.sz.size() && i < size_t(kDistinct); ++i) cudaFree(W.sz[i]);
  for (size_t i = 0; i < W.scale.size() && i < size_t(kDistinct); ++i) cudaFree(W.scale[i]);
  for (size_t i = 0; i < W.zero.size() && i < size_t(kDistinct); ++i) cudaFree(W.zero[i]);
}

void bench_matmuls(const std::vector<int>& Ts, double peak, int sm, const std::string& only_mat, const std::string& only_fmt,
                   size_t rotate_mb) {
  const Mat mats[] = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336},
                      {"lm_head", 128256, 4096}};
  const Fmt fmts[] = {{"bf16", WFmt::BF16, XFmt::BF16},
                      {"w8a16", WFmt::I8, XFmt::BF16},
                      {"fp8", WFmt::FP8, XFmt::FP8},
                      {"int8", WFmt::I8, XFmt::I8},
                      {"w4a16", WFmt::I4, XFmt::BF16}};
  const int64_t maxT = *std::max_element(Ts.begin(), Ts.end());
  void* xb = device_random(size_t(maxT * 14336), "bf16", 7);
  void* xc = device_random(size_t(maxT * 14336), "fp8", 8);  // also fine as INT8 codes
  float* xs = static_cast<float*>(device_random(size_t(maxT), "scale", 9));
  float* y = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&y, size_t(maxT * 128256) * 4));
  // The tiled kernel's split-K workspace: up to K / 256 splits of every row block's tokens, for the largest
  // quantized matrix (lm_head stays BF16).
  // With it, GemvArgs::tiled_counters: one per 128 rows of the widest quantized matrix, zero.
  int64_t ws_floats = 0, n_counters = 1;
  for (const Mat& m : mats)
    if (std::strcmp(m.name, "lm_head") != 0) {
      ws_floats = std::max<int64_t>(ws_floats, (m.K / 256 + 1) * ((m.N + 15) / 16 * 16) * ((maxT + 7) / 8 * 8));
      n_counters = std::max<int64_t>(n_counters, (m.N + 127) / 128);
    }
  float* ws = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&ws, size_t(ws_floats) * 4));
  int32_t* tile_counters = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&tile_counters, size_t(n_counters) * 4));
  LLMQ_CUDA_CHECK(cudaMemset(tile_counters, 0, size_t(n_counters) * 4));
  // The distributed RMSNorm's producer half (o and down in the engine, up to 64 tokens): rms_w, FP32 x o w and the
  // sums of squares, 64 doubles (zeroed once: the sums only grow, which the timing ignores).
  float* rms_w = static_cast<float*>(device_random(4096, "scale", 10));
  float* rms_out = nullptr;
  double* sumsq = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&rms_out, size_t(maxT * 4096) * 4));
  LLMQ_CUDA_CHECK(cudaMalloc(&sumsq, size_t(64) * 8));
  LLMQ_CUDA_CHECK(cudaMemset(sumsq, 0, size_t(64) * 8));
  std::printf("\n(weights rotated over >= %zu MiB)\n%-8s %-7s %3s %-7s %9s %8s %6s\n", rotate_mb, "matrix", "format", "T",
              "kernel", "us", "GB/s", "%copy");
  for (const Mat& m : mats)
    for (const Fmt& f : fmts) {
      if (std::strcmp(m.name, "lm_head") == 0 && f.wf != WFmt::BF16) continue;
      if ((!only_mat.empty() && only_mat != m.name) || (!only_fmt.empty() && only_fmt != f.name)) continue;
      const size_t one = f.wf == WFmt::BF16 ? size_t(m.N * m.K) * 2 : f.wf == WFmt::I4 ? size_t(m.N * m.K) / 2 : size_t(m.N * m.K);
      const int copies = int(std::clamp<size_t>((rotate_mb << 20) / one + 1, 2, rotate_mb > 400 ? 100000 : kDistinct));
      Weights W = make_weights(f, m, copies, 100);
      const int reps = std::max(10, copies / 7 + 1);  // the 7 timed samples go through every copy
      for (int T : Ts) {
        GemvArgs a;
        a.wf = f.wf;
        a.xf = f.xf;
        a.group = f.wf == WFmt::I4 ? 128 : 0;
        a.N = m.N;
        a.K = m.K;
        a.x = f.xf == XFmt::BF16 ? xb : xc;
        a.ldx = m.K;
        a.x_scale = f.xf == XFmt::BF16 ? nullptr : xs;
        a.M = T;
        a.y = y;
        a.ldy = m.N;
        bool no_sz = false;  // INT4: the one-token kernel without its scale/zero-point records (the "i4-ldg" row)
        auto set = [&](int c, bool rowmajor) {
          const int i = c % copies;
          a.w = rowmajor ? W.w_rowmajor[size_t(i)] : W.w[size_t(i)];
          a.w_scale = W.scale.empty() ? nullptr : W.scale[size_t(i)];
          a.w_zero = W.zero.empty() ? nullptr : W.zero[size_t(i)];
          a.i4_sz = W.sz.empty() || rowmajor || no_sz ? nullptr : W.sz[size_t(i)];
        };
        auto row = [&](const char* kernel, double us) {
          const double gbps = double(W.bytes) / (us * 1e-6) / 1e9;
          std::printf("%-8s %-7s %3d %-7s %9.2f %8.0f %5.1f%%\n", m.name, f.name, T, kernel, us, gbps, 100.0 * gbps / peak);
        };
        set(0, false);
        if (wgemm_supports(a, sm)) row("wgemm", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
        if (f.wf == WFmt::I4 && T <= 16 && wgemm_supports(a, sm)) {
          no_sz = true;
          row("i4-ldg", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
          no_sz = false;
        }
        if (f.wf != WFmt::BF16) {  // the tiled kernel (GemvArgs::tiled; weight-only): K unsplit, then split through ws
          a.tiled = 1;
          if (wgemm_supports(a, sm)) {
            row("tiled", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
            // Split K: the partial sums added by a second kernel ("tiled/ws"), then by each tile's last CTA (the
            // engine's way, "tiled/c"); where the launcher adds them in a thread-block cluster instead
            // (LLMQ_WGEMM_TILED_CLUSTER, default 4 splits or fewer), both rows time that.
            a.tiled_ws = ws, a.tiled_ws_floats = ws_floats;
            row("tiled/ws", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
            a.tiled_counters = tile_counters, a.tiled_counters_n = n_counters;
            row("tiled/c", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
            // With the epilogue o and down have in the engine: the residual add into y and the distributed
            // RMSNorm's producer half (BF16 x o w and the sums of squares).
            if (m.N == 4096 && T <= 64) {
              a.accumulate = true;
              a.rms_w = rms_w, a.rms_out = rms_out, a.rms_ld = m.N, a.rms_sumsq = sumsq;
              if (wgemm_supports(a, sm)) row("tiled/c+r", time_us([&](int c) { set(c, false); wgemm(a, nullptr); }, reps));
              a.accumulate = false;
              a.rms_w = nullptr, a.rms_out = nullptr, a.rms_ld = 0, a.rms_sumsq = nullptr;
            }
            a.tiled_ws = nullptr, a.tiled_ws_floats = 0, a.tiled_counters = nullptr, a.tiled_counters_n = 0;
          }
          a.tiled = 0;
        }
        set(0, f.wf == WFmt::I4);
        if (T <= kGemvMaxM && gemv_supports(a)) {
          row("gemv", time_us([&](int c) { set(c, f.wf == WFmt::I4); gemv(a, nullptr); }, reps));
          // The K split forced (the row above is the launcher's choice).
          for (int ks : {1, 2, 4}) {
            a.ksplit = ks;
            const std::string name = "gemv/k" + std::to_string(ks);
            row(name.c_str(), time_us([&](int c) { set(c, f.wf == WFmt::I4); gemv(a, nullptr); }, reps));
          }
          a.ksplit = 0;
          // The same with the producer half of the distributed RMSNorm (H100, session 28: fp8 o 9.64 -> 11.27 us,
          // down 23.33 -> 24.62; sums of squares spread over 8 slots gained 0.8 us in kbench and lost 0.5-1.9% of a
          // batch-1 step in the graph, so not kept).
          if (m.N == 4096 && T <= 64) {
            a.rms_w = rms_w, a.rms_out = rms_out, a.rms_ld = m.N, a.rms_sumsq = sumsq, a.rms_out_f32 = true;
            if (gemv_supports(a)) row("gemv+rms", time_us([&](int c) { set(c, f.wf == WFmt::I4); gemv(a, nullptr); }, reps));
            a.rms_w = nullptr, a.rms_out = nullptr, a.rms_ld = 0, a.rms_sumsq = nullptr, a.rms_out_f32 = false;
          }
        }
      }
      free_weights(W);
    }
  cudaFree(xb);
  cudaFree(xc);
  cudaFree(xs);
  cudaFree(y);
  cudaFree(ws);
  cudaFree(tile_counters);
  cudaFree(rms_w);
  cudaFree(rms_out);
  cudaFree(sumsq);
}

// The prefill GEMMs as the engine runs them (cuBLAS, BF16 inputs, FP32 output) for T tokens.
// bw: the copy bandwidth (GB/s) for the weight-read rate of skinny T (decode batches); weights rotate over
// > 400 MB as in bench_matmuls, so that they come from HBM.
void bench_gemm(int64_t T, double peak_tflops, double bw, int sm) {
  LtGemm lt;
  const Mat mats[] = {{"qkv", 6144, 4096}, {"o", 4096, 4096}, {"gate_up", 28672, 4096}, {"down", 4096, 14336}};
  cublasHandle_t h;
  LLMQ_CUBLAS_CHECK(cublasCreate(&h));
  std::printf("\n%-8s %5s %-16s %9s %8s %6s %8s %6s\n", "matrix", "T", "gemm", "us", "TFLOP/s", "%peak", "GB/s", "%copy");
  for (const Mat& m : mats) {
    const int copies = int(std::clamp<size_t>((size_t(400) << 20) / size_t(m.N * m.K) + 1, 2, 16));  // of the 8-bit size
    auto row = [&](const char* name, double us, double wbytes) {
      const double tf = 2.0 * double(m.N) * double(m.K) * double(T) / (us * 1e-6) / 1e12;
      const double gbps = wbytes / (us * 1e-6) / 1e9;
      std::printf("%-8s %5lld %-16s %9.1f %8.1f %5.1f%% %8.0f %5.1f%%\n", m.name, (long long)T, name, us, tf,
                  100.0 * tf / peak_tflops, gbps, 100.0 * gbps / bw);
    };
    std::vector<void*> w;
    for (int i = 0; i < copies; ++i) w.push_back(device_random(size_t(m.N * m.K), "bf16", 3 + uint64_t(i)));
    void* x = device_random(size_t(T * m.K), "bf16", 4);
    void* c = nullptr;
    LLMQ_CUDA_CHECK(cudaMalloc(&c, size_t(T * m.N) * 4));
    for (int out_bf16 = 0; out_bf16 < 2; ++out_bf16) {
      const float alpha = 1.f, beta = 0.f;
      const double us = time_us([&](int i) {
        LLMQ_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(m.N), int(T), int(m.K), &alpha, w[size_t(i % copies)],
                                       CUDA_R_16BF, int(m.K), x, CUDA_R_16BF, int(m.K), &beta, c,
                                       out_bf16 ? CUDA_R_16BF : CUDA_R_32F, int(m.N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }, 5);
      row(out_bf16 ? "bf16 -> bf16" : "bf16 -> f32", us, 2.0 * double(m.N * m.K));
    }
    for (void* p : w) cudaFree(p);
    cudaFree(x);
    // 8-bit operands through cuBLASLt (FP32 / INT32 accumulators out; scales go to the epilogue).
    for (LtKind k : {LtKind::Fp8, LtKind::Int8}) {
      const char* name = k == LtKind::Fp8 ? "lt fp8 -> f32" : "lt int8 -> i32";
      std::vector<void*> w8;
      for (int i = 0; i < copies; ++i) w8.push_back(device_random(size_t(m.N * m.K), "fp8", 13 + uint64_t(i)));
      void* x8 = device_random(size_t(T * m.K), "fp8", 14);
      if (!lt.supports(k, m.N, T, m.K, sm)) {
        std::printf("%-8s %5lld %-16s   not supported\n", m.name, (long long)T, name);
      } else {
        const double us = time_us([&](int i) { lt.run(k, w8[size_t(i % copies)], x8, c, m.N, T, m.K, nullptr); }, 5);
        row(name, us, double(m.N * m.K));
      }
      for (void* p : w8) cudaFree(p);
      cudaFree(x8);
    }
    cudaFree(c);
  }
  cublasDestroy(h);
}

double gemm_peak_tflops() {
  const int n = 8192;
  cublasHandle_t h;
  LLMQ_CUBLAS_CHECK(cublasCreate(&h));
  void* a = device_random(size_t(n) * n, "bf16", 5);
  void* b = device_random(size_t(n) * n, "bf16", 6);
  void* c = nullptr;
  LLMQ_CUDA_CHECK(cudaMalloc(&c, size_t(n) * n * 2));
  const float alpha = 1.f, beta = 0.f;
  const double us = time_us([&](int) {
    LLMQ_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta,
                                   c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }, 3);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  cublasDestroy(h);
  return 2.0 * double(n) * n * n / (us * 1e-6) / 1e12;
}

// T tokens of one sequence, llama-3-8b heads, their K/V in a BF16 paged cache (written by rope_kv).
struct AttentionSetup {
  static constexpr int64_t heads = 32, nkv = 8, hd = 128, qd = heads * hd, kvd = nkv * hd, ld = qd + 2 * kvd, page = 16;
  int64_t T, n_tiles = 0;
  std::vector<void*> owned;
  int32_t *dseq = nullptr, *dpos = nullptr, *dtiles = nullptr;
  float* dq = nullptr;
  float* out = nullptr;
  KvCacheView kv;

  template <typename V>
  auto up(const std::vector<V>& v) {
    void* p = nullptr;
    LLMQ_CUDA_CHECK(cudaMalloc(&p, v.size() * sizeof(V)));
    LLMQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(V), cudaMemcpyHostToDevice));
    owned.push_back(p);
    return static_cast<V*>(p);
  }
  void* zeros(size_t bytes) {
    void* p = nullptr;
    LLMQ_CUDA_CHECK(cudaMalloc(&p, bytes));
    LLMQ_CUDA_CHECK(cudaMemset(p, 0, bytes));
    owned.push_back(p);
    return p;
  }
  explicit AttentionSetup(int64_t t) : T(t) {
    const int64_t pps = (T + page - 1) / page;
    std::vector<int32_t> table(static_cast<size_t>(pps)), seq(static_cast<size_t>(T), 0), pos(static_cast<size_t>(T));
    for (int64_t i = 0; i < pps; ++i) table[size_t(i)] = int32_t(i);
    for (int64_t i = 0; i < T; ++i) pos[size_t(i)] = int32_t(i);
    std::vector<int32_t> tiles(static_cast<size_t>(2 * T));
    n_tiles = attention_tiles(seq.data(), T, tiles.data());
    int32_t* dtab = up(table);
    dseq = up(seq), dpos = up(pos), dtiles = up(tiles);
    std::vector<float> qkv(static_cast<size_t>(T * ld));
    for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = float(int64_t(splitmix64(i) % 2001) - 1000) * 1e-3f;
    dq = up(qkv);
    out = static_cast<float*>(zeros(size_t(T * qd) * 4));
    std::vector<float> cs(static_cast<size_t>(T * hd / 2), 1.f), sn(static_cast<size_t>(T * hd / 2), 0.f);
    kv.page_size = page;
    kv.pages_per_seq = pps;
    kv.block_table = dtab;
    kv.kv_heads = nkv;
    kv.head_dim = hd;
    kv.k = zeros(size_t(pps * page * kvd) * 2);
    kv.v = zeros(size_t(pps * page * kvd) * 2);
    rope_kv(dq, ld, T, dpos, dseq, up(cs), up(sn), heads, kv, nullptr);
  }
  ~AttentionSetup() {
    for (void* p : owned) cudaFree(p);
  }
  AttentionArgs args() const {
    AttentionArgs a;
    a.q = dq;
    a.ldq = ld;
    a.T = T;
    a.heads = heads;
    a.pos = dpos;
    a.seq = dseq;
    a.out = out;
    return a;
  }
};

// Prefill attention: T tokens at once, per-token kernel and flash kernel.
void bench_attention(int64_t T, double peak_tflops) {
  AttentionSetup st(T);
  AttentionArgs a = st.args();
  const double flops = 4.0 * double(st.heads * st.hd) * double(T) * double(T + 1) / 2;
  std::printf("\n%-22s %6s %10s %8s %6s\n", "attention prefill", "T", "us", "TFLOP/s", "%peak");
  for (int flash = 0; flash < 2; ++flash) {
    if (flash) a.tiles = st.dtiles, a.n_tiles = st.n_tiles;
    const double us = time_us([&](int) { attention(a, st.kv, nullptr); }, 2);
    const double tf = flops / (us * 1e-6) / 1e12;
    std::printf("%-22s %6lld %10.1f %8.1f %5.1f%%\n", flash ? "flash (tensor cores)" : "per token", (long long)T, us, tf,
                100.0 * tf / peak_tflops);
  }
}

// Decode attention: the last of `ctx` cached positions attends to all of them, split as the engine splits a
// decode step on this card (flash-decoding; the last block of each head group merges). Which kernel runs is
// the engine's default (LLMQ_ATTN_V1=1: the per-token one); GB/s counts the K and V bytes read, which at these
// sizes (1-32 MB) stay in the L2 between launches: a kernel comparison, not what a step reading HBM sees.
void bench_decode_attention(const std::vector<int64_t>& ctxs, double peak_gbps, int sms) {
  std::printf("\n%-22s %6s %6s %10s %8s %6s\n", "attention decode", "ctx", "splits", "us", "GB/s", "%copy");
  for (int64_t ctx : ctxs) {
    AttentionSetup st(ctx);
    AttentionArgs a = st.args();
    const int64_t blocks = st.nkv;  // 4 query heads a KV head: one head group each
    a.splits = std::clamp<int64_t>((2 * sms + blocks - 1) / blocks, 1, std::clamp<int64_t>(ctx / 16, 1, kMaxAttentionSplits));
    a.chunk = (ctx + a.splits - 1) / a.splits;
    a.T = 1;
    a.q = st.dq + (ctx - 1) * st.ld;
    a.pos = st.dpos + (ctx - 1);
    a.seq = st.dseq + (ctx - 1);
    a.partial = static_cast<float*>(st.zeros(size_t(st.heads * a.splits * (st.hd + 2)) * 4));
    a.counters = static_cast<int32_t*>(st.zeros(size_t(attention_counters(1, st.heads, st.nkv)) * 4));
    const double us = time_us([&](int) { attention(a, st.kv, nullptr); }, 20);
    const double gbps = 2.0 * double(ctx * st.kvd) * 2 / (us * 1e-6) / 1e9;
    std::printf("%-22s %6lld %6lld %10.2f %8.0f %5.1f%%\n", "1 token", (long long)ctx, (long long)a.splits, us, gbps,
                100.0 * gbps / peak_gbps);
  }
}

// Decode attention of a batch: B sequences with `ctx` cached positions each (own pages of a BF16 cache, random
// values), one new token each at position ctx - 1, chunks cut from a cache capacity of `cap` positions as the
// engine cuts them. Splits: the engine's rule (two waves of blocks, at most cap / 16), then half and twice
// that, and one. GB/s counts the K and V bytes read (at B = 64, ~40 MB: mostly from HBM).
void bench_batch_decode_attention(const std::vector<int64_t>& batches, int64_t ctx, int64_t cap, double peak_gbps, int sms) {
  constexpr int64_t heads = 32, nkv = 8, hd = 128, kvd = nkv * hd, page = 16, ld = heads * hd + 2 * kvd;
  std::printf("\n%-22s %6s %6s %6s %10s %8s %6s\n", "attention decode batch", "B", "ctx", "splits", "us", "GB/s", "%copy");
  for (int64_t B : batches) {
    const int64_t pps = (cap + page - 1) / page;
    std::vector<int32_t> table(static_cast<size_t>(B * pps)), seq(static_cast<size_t>(B)), pos(static_cast<size_t>(B), int32_t(ctx - 1));
    for (size_t i = 0; i < table.size(); ++i) table[i] = int32_t(i);
    for (int64_t s = 0; s < B; ++s) seq[size_t(s)] = int32_t(s);
    std::vector<void*> owned;
    auto up = [&](const auto& v) {
      void* p = nullptr;
      LLMQ_CUDA_CHECK(cudaMalloc(&p, v.size() * sizeof(v[0])));
      LLMQ_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(v[0]), cudaMemcpyHostToDevice));
      owned.push_back(p);
      return p;
    };
    KvCacheView kv;
    kv.page_size = page;
    kv.pages_per_seq = pps;
    kv.block_table = static_cast<int32_t*>(up(table));
    kv.kv_heads = nkv;
    kv.head_dim = hd;
    kv.k = device_random(size_t(B * pps * page * kvd), "bf16", 11);
    kv.v = device_random(size_t(B * pps * page * kvd), "bf16", 12);
    owned.push_back(kv.k);
    owned.push_back(kv.v);
    AttentionArgs a;
    a.q = static_cast<float*>(device_random(size_t(B * ld), "scale", 13));
    owned.push_back(const_cast<float*>(a.q));
    a.ldq = ld;
    a.T = B;
    a.heads = heads;
    a.pos = static_cast<int32_t*>(up(pos));
    a.seq = static_cast<int32_t*>(up(seq));
    LLMQ_CUDA_CHECK(cudaMalloc(&a.out, size_t(B * heads * hd) * 4));
    owned.push_back(a.out);
    const int64_t max_sp = std::clamp<int64_t>(cap / 16, 1, kMaxAttentionSplits);
    const int64_t one = std::clamp<int64_t>((2 * sms + nkv - 1) / nkv, 1, std::max<int64_t>(1, cap / 32));  // the engine's splits_
    const int64_t rule = std::clamp<int64_t>((2 * sms + B * nkv - 1) / (B * nkv), 1, one);
    LLMQ_CUDA_CHECK(cudaMalloc(&a.partial, size_t(B * heads * max_sp * (hd + 2)) * 4));
    owned.push_back(a.partial);
    LLMQ_CUDA_CHECK(cudaMalloc(&a.counters, size_t(attention_counters(B, heads, nkv)) * 4));
    LLMQ_CUDA_CHECK(cudaMemset(a.counters, 0, size_t(attention_counters(B, heads, nkv)) * 4));
    owned.push_back(a.counters);
    std::vector<int64_t> variants = {rule, std::max<int64_t>(1, rule / 2), std::min(max_sp, rule * 2), 1};
    std::sort(variants.begin(), variants.end());
    variants.erase(std::unique(variants.begin(), variants.end()), variants.end());
    for (int64_t sp : variants) {
      a.splits = sp;
      a.chunk = (cap + sp - 1) / sp;
      const double us = time_us([&](int) { attention(a, kv, nullptr); }, 20);
      const double gbps = double(B) * 2.0 * double(ctx * kvd) * 2 / (us * 1e-6) / 1e9;
      std::printf("%-22s %6lld %6lld %6lld %10.2f %8.0f %5.1f%%%s\n", "", (long long)B, (long long)ctx, (long long)sp, us,
                  gbps, 100.0 * gbps / peak_gbps, sp == rule ? "  (engine)" : "");
    }
    for (void* p : owned) cudaFree(p);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // Line-buffered even into a pipe or file: a run killed by a timeout keeps the rows it printed.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::string only, only_mat, only_fmt;
  size_t rotate_mb = 400;
  std::vector<int> Ts = {1, 16, 64};
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--only" && i + 1 < argc) only = argv[++i];
    else if (s == "--matrix" && i + 1 < argc) only_mat = argv[++i];
    else if (s == "--format" && i + 1 < argc) only_fmt = argv[++i];
    else if (s == "--rotate-mb" && i + 1 < argc && std::atol(argv[i + 1]) > 0) rotate_mb = size_t(std::atol(argv[++i]));
    else if (std::vector<int64_t> t; s == "--t" && i + 1 < argc && parse_positive_list(argv[i + 1], t)) {
      Ts.assign(t.begin(), t.end());
      ++i;
    } else {
      std::fprintf(stderr, "usage: llmq-kbench [--only matmul|gemm|attention|decode] [--t 1,16,64] [--matrix qkv|o|gate_up|down|lm_head]\n"
                           "                   [--format bf16|w8a16|fp8|int8|w4a16] [--rotate-mb MB]\n");
      return 2;
    }
  }
  try {
    cudaDeviceProp p{};
    LLMQ_CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
    const double bw = copy_gbps(), tf = gemm_peak_tflops();
    std::printf("%s, %d SMs: device copy %.0f GB/s, BF16 GEMM 8192^3 %.0f TFLOP/s\n", p.name, p.multiProcessorCount, bw, tf);
    if (only.empty() || only == "matmul") bench_matmuls(Ts, bw, p.major * 10 + p.minor, only_mat, only_fmt, rotate_mb);
    if (only.empty() || only == "gemm") {
      // The decode batches of --t from 8 tokens (where the engine may choose cuBLAS over wgemm), then prefill.
      for (int T : Ts)
        if (T >= 8 && T < 2048) bench_gemm(T, tf, bw, p.major * 10 + p.minor);
      bench_gemm(2048, tf, bw, p.major * 10 + p.minor);
    }
    if (only.empty() || only == "attention") {
      bench_attention(2048, tf);
      bench_decode_attention({256, 2048, 8192}, bw, p.multiProcessorCount);
    }
    if (only.empty() || only == "attention" || only == "decode") {
      bench_batch_decode_attention({1, 16, 64}, 160, 256, bw, p.multiProcessorCount);
      bench_batch_decode_attention({16, 64}, 400, 512, bw, p.multiProcessorCount);    // longer contexts
      bench_batch_decode_attention({16, 64}, 1000, 1024, bw, p.multiProcessorCount);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "llmq-kbench: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
