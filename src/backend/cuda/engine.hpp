// The CUDA engine: the model's weights uploaded once in their quantized formats, a paged KV cache, and the
// forward pass as kernels on one stream. Decode batches of up to 8 tokens run through the GEMV kernels and
// are replayed as CUDA graphs (no host synchronization or allocation per layer or per token); larger batches
// (prefill) run cuBLAS BF16 GEMMs, with quantized weights expanded to BF16 one matrix at a time.
#pragma once

#include <memory>

#include "runtime/engine.hpp"

namespace llmq::cuda {

// Throws llmq::Error when no CUDA device is usable, or the weights do not fit its free memory (with the
// numbers).
std::unique_ptr<Engine> make_cuda_engine(const Model& model);

// The name and compute capability of device 0, or an empty string when there is none.
std::string device_summary();

}  // namespace llmq::cuda
