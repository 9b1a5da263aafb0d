// llmq-kbench-cpu: the CPU matmul kernels one at a time at the shapes of a real model (llama-2-7b's by default),
// on random data, without a checkpoint: every weight format the CPU engine reads (BF16, FP8, INT8 weight-only,
// INT4 groups, INT8 x INT8) at a few token counts. The full-model `llmq bench` on a shared 2-core VM moves by
// 1.5x between runs; a kernel timed alone many times, its fastest run against the machine's read bandwidth
// measured in the same process, tells a kernel change from the noise. Weights rotate over more memory than the
// caches hold (--rotate-mb), so every call reads them from DRAM as a decode step does.
//
// Usage: llmq-kbench-cpu [--t LIST] (default 1,16) [--format bf16|fp8|i8|q4|i8i8] [--matrix qkv|o|gate_up|down]
//                        [--reps N] (default 40) [--rotate-mb MB] (default 512)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/kernels.hpp"
#include "common.hpp"

using namespace llmq;

namespace {

struct Matrix {
  const char* name;
  int64_t N, K;
};

// Bytes of one copy of an N x K matrix in the format (codes plus scales and zero points where it has them).
double format_bytes(const std::string& f, int64_t N, int64_t K) {
  const double nk = double(N) * double(K);
  if (f == "bf16") return 2 * nk;
  if (f == "q4") return nk / 2 + double(N) * double(K / 128) * 5;
  return nk;  // fp8, i8, i8i8
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> ts = {1, 16};
  std::string only_format, only_matrix;
  int reps = 40;
  int64_t rotate_mb = 512;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--t" && v && parse_positive_list(v, ts)) ++i;
    else if (a == "--format" && v) only_format = v, ++i;
    else if (a == "--matrix" && v) only_matrix = v, ++i;
    else if (a == "--reps" && v) reps = std::max(1, std::atoi(v)), ++i;
    else if (a == "--rotate-mb" && v) rotate_mb = std::max<int64_t>(1, std::atoll(v)), ++i;
    else {
      std::fprintf(stderr,
                   "usage: llmq-kbench-cpu [--t 1,16] [--format bf16|fp8|i8|q4|i8i8] [--matrix qkv|o|gate_up|down] "
                   "[--reps 40] [--rotate-mb 512]\n");
      return 2;
    }
  }
  const Matrix matrices[] = {{"qkv", 12288, 4096}, {"o", 4096, 4096}, {"gate_up", 22016, 4096}, {"down", 4096, 11008}};
  const char* formats[] = {"bf16", "fp8", "i8", "q4", "i8i8"};
  const double peak = cpu::measure_peak_read_gbps();
  std::printf("cpu: %d threads, %s; read peak %.1f GB/s; min and median of %d calls after a warm-up\n", num_threads(),
              cpu::isa_name(cpu::active_isa()), peak, reps);
  std::printf("%-6s %-8s %4s %10s %10s %8s %6s %9s\n", "format", "matrix", "T", "min us", "median us", "GB/s", "%peak",
              "GFLOP/s");
  std::mt19937 rng(7);
  for (const char* fmt : formats) {
    if (!only_format.empty() && only_format != fmt) continue;
    const std::string f = fmt;
    for (const Matrix& mx : matrices) {
      if (!only_matrix.empty() && only_matrix != mx.name) continue;
      const int64_t N = mx.N, K = mx.K;
      const double bytes = format_bytes(f, N, K);
      const int copies = int(std::max<double>(1, std::ceil(double(rotate_mb << 20) / bytes)));
      // Weights: `copies` matrices back to back, random codes (FP8: no NaN; INT4: any nibble).
      const size_t wsz = f == "bf16" ? size_t(N * K) * 2 : f == "q4" ? size_t(N * K / 2) : size_t(N * K);
      std::vector<uint8_t> w(wsz * size_t(copies));
      for (size_t i = 0; i < w.size(); ++i) w[i] = uint8_t(rng());
      if (f == "bf16")
        for (size_t i = 1; i < w.size(); i += 2) w[i] = uint8_t(0x3c + (w[i] & 1)) | (w[i] & 0x80);  // |v| ~ 0.01-0.03
      if (f == "fp8")
        for (auto& b : w) b &= 0xbf;  // exponent below the top: finite, |v| < 2
      const size_t groups = size_t(N * (K / 128));  // INT4 groups of 128 in one copy
      std::vector<float> scale(groups * size_t(copies), 0.01f);
      std::vector<uint8_t> zero(scale.size(), 8);
      for (int64_t T : ts) {
        std::vector<float> x(size_t(T * K)), y(size_t(T * N));
        for (auto& v : x) v = float(int(rng() % 2001) - 1000) / 1000.f;
        std::vector<int8_t> xi(size_t(T * K));
        for (auto& v : xi) v = int8_t(int(rng() % 255) - 127);
        std::vector<int32_t> yi(size_t(T * N));
        auto call = [&](int c) {
          const uint8_t* wc = w.data() + size_t(c) * wsz;
          if (f == "q4") {
            const cpu::Q4Matrix q{wc, scale.data() + size_t(c) * groups, zero.data() + size_t(c) * groups, K, 128};
            cpu::matmul_q4(x.data(), K, T, q, N, y.data(), N, nullptr);
          } else if (f == "i8i8") {
            cpu::matmul_i8(xi.data(), K, T, K, reinterpret_cast<const int8_t*>(wc), K, N, yi.data(), N);
          } else {
            const DType dt = f == "bf16" ? DType::BF16 : f == "fp8" ? DType::F8E4M3 : DType::I8;
            cpu::matmul(x.data(), K, T, K, wc, dt, K, N, y.data(), N, nullptr);
          }
        };
        std::vector<double> t;
        for (int r = -1; r < reps; ++r) {
          const auto t0 = std::chrono::steady_clock::now();
          call((r + 1) % copies);
          const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
          if (r >= 0) t.push_back(s);
        }
        std::sort(t.begin(), t.end());
        const double mn = t.front(), med = t[t.size() / 2];
        std::printf("%-6s %-8s %4lld %10.1f %10.1f %8.1f %6.1f %9.1f\n", fmt, mx.name, (long long)T, mn * 1e6, med * 1e6,
                    bytes / mn / 1e9, 100 * bytes / mn / 1e9 / peak, 2.0 * double(T) * double(N) * double(K) / mn / 1e9);
      }
    }
  }
  return 0;
}
