// LLMQ_CUDA_TRACE=1: every kernel's start and end on the GPU, recorded through CUPTI's activity API, kernels
// launched inside CUDA graphs included (LLMQ_CUDA_PROFILE times eager launches with events, which counts host
// time into cuBLAS ops and cannot see inside the decode graphs). The report says where a decode step's time
// goes: each kernel of a graph replayed many times, in order, with its median duration, the median gap from
// the end of the kernel before it (negative: the two overlapped, as PDL lets them) and the median time it adds
// to the step (its end minus the previous kernel's end: the critical path's share, which the duration of a
// kernel that started early and waited overstates).
#pragma once

namespace llmq::cuda {

// Starts recording (once per process; libcupti.so is loaded then). Without CUPTI (its header missing at build
// time, the library not found or refusing at run time) says so on stderr and records nothing.
void trace_start();

// Flushes the records and prints the report to stderr: every graph replayed at least 8 times (its kernels by
// node, and per kernel name the time a replay spends in it), then the kernels launched outside graphs by name.
// Clears the records.
void trace_report();

}  // namespace llmq::cuda
