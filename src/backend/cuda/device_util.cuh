// Device helpers shared by the CUDA kernels (nvcc only): value decoding, warp/block reductions, and the
// device side of programmatic dependent launch (launch.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "backend/cuda/fp8_sw.hpp"

namespace llmq::cuda {

// Programmatic dependent launch (sm_90+; no-ops below, and when the kernel was launched without it). A kernel
// started by launch() may run while the previous kernel of the stream is still finishing: pdl_wait() blocks
// until that kernel has completed and its writes are visible, so every kernel calls it before it reads
// anything an earlier kernel wrote and before its first global write (reading weights before it is fine).
// pdl_trigger() lets the next kernel start launching (its blocks then wait in their own pdl_wait()).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// Starts bringing `bytes` (a multiple of 16, from a 16-byte aligned address) of read-only data into the L2
// (sm_90+: one bulk-prefetch instruction; nothing below). Used before pdl_wait() on a kernel's weights.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  (void)p, (void)bytes;
#endif
}

// cp.async (sm_80+): 16 bytes from global to shared memory without passing through registers, bypassing L1
// (cp_async8: 8 bytes, through L1). smem: a shared-memory address (__cvta_generic_to_shared); both addresses
// aligned to the size.
__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async8(uint32_t smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(smem), "l"(gmem) : "memory");
}
// Closes this thread's group of cp.async copies issued since the last commit (an empty group if none).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// mbarrier helpers (sm_80+): a barrier object in shared memory that completes a phase when `count` arrivals have
// been made, whichever threads make them; arrive has release and the wait acquire semantics (CTA scope).
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared.b64 _, [%0];" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(bar))) : "memory");
}
// Waits until the phase of the given parity (0 for the barrier's first phase, 1 for its second, 0 again for the
// third, ...) has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(bar));
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// The threadFenceReduction pattern: every thread of every block of a launch calls it once, after its last
// global write that the reduction reads. Returns true (in all threads) only in the last of `total` blocks to
// arrive at *counter, which then sees every other block's writes when it reads them through the L2 (__ldcg);
// that block also resets *counter to zero for the next launch (CUDA graph replays).
__device__ __forceinline__ bool last_block(int32_t* counter, int total) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1) == total - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// SwiGLU of one gate/up pair: silu(gate) * up.
__device__ __forceinline__ float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

__device__ __forceinline__ float bf16lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

// E4M3FN codes to floats: in hardware on sm_89+, below it by fp8_sw.hpp (the library's software path took NVVM
// minutes per file for compute_80).
__device__ __forceinline__ float fp8_to_float(uint8_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return fp8x2_to_float2_sw(b).x;
#else
  __half_raw h = __nv_cvt_fp8_to_halfraw(b, __NV_E4M3);
  return __half2float(__half(h));
#endif
}
// Two E4M3 codes (low byte first) to two floats.
__device__ __forceinline__ float2 fp8x2_to_float2(uint16_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return fp8x2_to_float2_sw(b);
#else
  __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(b, __NV_E4M3);
  return __half22float2(__half2(h));
#endif
}
// Round to nearest even, saturating at +-448 (the CPU reference quant::f32_to_fp8).
__device__ __forceinline__ uint8_t float_to_fp8(float x) { return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3); }
// quant::quant_int8: nearest even, clamped to [-127, 127].
__device__ __forceinline__ int8_t float_to_int8(float x) {
  float q = rintf(x);
  q = fminf(127.f, fmaxf(-127.f, q));
  return int8_t(q);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ int warp_sum(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum, or max of non-negative values, over a block of blockDim.x threads (a multiple of 32, at most 1024);
// every thread gets the result.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v) {
  __shared__ float part[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();  // part[] may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = lane < nw ? part[lane] : 0.f;  // 0: identity of the sum and of the max of non-negatives
  v = kMax ? warp_max(v) : warp_sum(v);
  return v;
}

}  // namespace llmq::cuda
