// Error checks for CUDA and cuBLAS calls: a failure becomes an llmq::Error naming the statement (or the
// kernel), the file and the line. Host-only; included by .cpp and .cu files.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.hpp"

namespace llmq::cuda {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  throw Error(std::string("CUDA error in ") + what + " (" + file + ":" + std::to_string(line) +
              "): " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* what, const char* file, int line) {
  throw Error(std::string("cuBLAS error in ") + what + " (" + file + ":" + std::to_string(line) +
              "): " + cublasGetStatusString(s));
}

// Whether every launch is followed by a synchronize (LLMQ_CUDA_SYNC=1): an asynchronous fault is then
// reported with the name of the kernel that caused it, at the cost of speed.
bool sync_each_launch();

// An environment switch (the LLMQ_* comparison switches): set and not "0". Defined in engine.cpp.
bool env_flag(const char* name);
// A default-on switch turned off: set to exactly "0" (LLMQ_FLASH_PIPE=0 and the like). Defined in engine.cpp.
bool env_off(const char* name);

// Whether p may be read or written 16 bytes at a time (the 16-byte kernels' precondition).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the current device is sm_90 or newer (Hopper: PDL, thread-block clusters); false where it cannot be told.
bool device_sm90();

// Whether kernels are launched with programmatic dependent launch (launch.cuh): on sm_90+ unless LLMQ_NO_PDL=1.
bool pdl_enabled();

// After a kernel launch: a launch error (bad configuration), or with LLMQ_CUDA_SYNC=1 an execution error,
// is thrown naming the kernel.
void check_launch(const char* kernel, cudaStream_t stream);

}  // namespace llmq::cuda

#define LLMQ_CUDA_CHECK(stmt)                                                              \
  do {                                                                                     \
    cudaError_t llmq_e_ = (stmt);                                                          \
    if (llmq_e_ != cudaSuccess) ::llmq::cuda::throw_cuda(llmq_e_, #stmt, __FILE__, __LINE__); \
  } while (0)

#define LLMQ_CUBLAS_CHECK(stmt)                                                              \
  do {                                                                                       \
    cublasStatus_t llmq_s_ = (stmt);                                                         \
    if (llmq_s_ != CUBLAS_STATUS_SUCCESS) ::llmq::cuda::throw_cublas(llmq_s_, #stmt, __FILE__, __LINE__); \
  } while (0)
