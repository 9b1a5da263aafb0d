// Kernel launches with programmatic dependent launch (PDL; nvcc only). On Hopper a launch marked so may
// start while the previous kernel of the stream is finishing: its blocks get resident, prefetch their weights
// and wait in pdl_wait() (device_util.cuh) for that kernel's results, which hides the launch latency and the
// ramp-up of one kernel behind the tail of the other. Inside a CUDA graph the marks become programmatic edges.
// Every kernel launched this way calls pdl_wait() before it reads what an earlier kernel wrote and before its
// first global write; blocks that return early without doing either need not call it.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "backend/cuda/check.hpp"

namespace llmq::cuda {

// kernel<<<grid, block, smem, s>>>(args...), with PDL where pdl_enabled(); errors name the kernel. cluster.x > 0:
// thread-block clusters of cluster.x x cluster.y x cluster.z blocks (sm_90+; each grid dimension a multiple of its
// cluster dimension).
template <typename... P, typename... A>
void launch_clustered(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                      dim3 cluster, A&&... args) {
  cudaLaunchAttribute attr[2]{};
  unsigned n = 0;
  if (pdl_enabled()) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  if (cluster.x > 0) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n].val.clusterDim.z = cluster.z;
    ++n;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
  if (e != cudaSuccess) {
    // Clear the error this launch left behind, or the next launch's check_launch reports it under its own name
    // (seen: a refused gemv launch failed the next test's wgemm_kernel).
    cudaGetLastError();
    throw Error(std::string("CUDA kernel ") + name + " failed to launch: " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
  check_launch(name, s);
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, A&&... args) {
  launch_clustered(name, kernel, grid, block, smem, s, dim3(0u), std::forward<A>(args)...);
}

}  // namespace llmq::cuda
